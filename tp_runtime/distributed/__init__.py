"""The world and its communication: MPI/NCCL start-up, communicators, collective deadlines, cross-rank checks."""
