"""What one step carries: the batch (Step), the KV caches it reads and writes, graph replay of decode steps."""
