"""What the CUDA launchers (``cuda.py``: prepare and context; ``cuda_decode.py``: decode) share:
CuPy access, raw pointers and typed scalars, launching on torch's current stream, the checks of
activations and caches, and the dense bias table both attention kernels read.
"""

from __future__ import annotations

import warnings

import torch

from ..batch.kv_cache import CacheLayout, LayerKV
from ..batch.step import Step
from ..position import relative_bucket
from .base import AttentionSpec

HALF_DTYPES = (torch.float16, torch.bfloat16)


def cupy_module():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("backend='cuda' needs CuPy (pip install cupy-cuda12x or cupy-cuda13x)") from e
    return cupy


def ptr(t: torch.Tensor | None):
    return cupy_module().uint64(0 if t is None else t.data_ptr())


i32 = lambda v: cupy_module().int32(int(v))  # noqa: E731
i64 = lambda v: cupy_module().int64(int(v))  # noqa: E731
f32 = lambda v: cupy_module().float32(float(v))  # noqa: E731
f64 = lambda v: cupy_module().float64(float(v))  # noqa: E731

_smem_set: set = set()


_streams: dict = {}


def stream(device: torch.device):
    """torch's current stream on ``device`` as a CuPy stream (one wrapper per torch stream)."""
    ptr = torch.cuda.current_stream(device).cuda_stream
    key = (device.index, ptr)
    s = _streams.get(key)
    if s is None:
        cupy = cupy_module()
        with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external; this form works in 12-14
            warnings.simplefilter("ignore", DeprecationWarning)
            s = _streams[key] = cupy.cuda.ExternalStream(ptr, device.index)
    return s


def launch(kernel, grid, block, args, device: torch.device, shared_mem: int = 0) -> None:
    """Launch on torch's current stream of ``device``."""
    cupy = cupy_module()
    with cupy.cuda.Device(device.index):
        key = (id(kernel), device.index)
        if shared_mem > 48 * 1024 and key not in _smem_set:
            kernel.max_dynamic_shared_size_bytes = shared_mem
            _smem_set.add(key)
        with stream(device):
            kernel(tuple(grid), tuple(block), args, shared_mem=shared_mem)


_sm_counts: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (asked once per device: launchers size grids by it)."""
    if device.index not in _sm_counts:
        _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device.index]


def check_activation(t: torch.Tensor, what: str) -> None:
    if t.dtype == torch.float32:
        raise TypeError(
            f"{what}: the CUDA backend runs fp16 and bf16 activations, got float32; "
            "use backend='reference' for fp32 (or a half-precision config dtype)"
        )
    if t.dtype not in HALF_DTYPES:
        raise TypeError(f"{what}: expected dtype float16 or bfloat16, got {t.dtype}")
    if not t.is_cuda:
        raise ValueError(f"{what}: the CUDA backend needs CUDA tensors, got device {t.device}")


def cache_geometry(kv: LayerKV, kv_heads: int, head_size: int, dtype: torch.dtype):
    """(cache_len, log2_cache_len, block_table, bt_stride) after checking the cache's shape."""
    data = kv.data
    if data.dim() != 5 or data.shape[1] != 2 or data.shape[2] != kv_heads or data.shape[4] != head_size:
        raise ValueError(
            f"kv.data: expected [rows, 2, {kv_heads} (KV heads on this rank), len, {head_size}], "
            f"got {tuple(data.shape)}"
        )
    if not data.is_contiguous():
        raise ValueError("kv.data: the CUDA backend needs a contiguous cache tensor")
    expected = kv.kind.storage_dtype(dtype)
    if data.dtype != expected:
        raise ValueError(
            f"kv.data: a {kv.kind.value} cache for {dtype} activations stores {expected}, got {data.dtype}"
        )
    length = data.shape[3]
    if kv.layout is CacheLayout.paged:
        table = kv.block_table
        if table is None or table.dtype != torch.int32 or table.dim() != 2 or not table.is_contiguous():
            raise ValueError("kv.block_table: a paged cache needs a contiguous int32 [max_seqs, max_blocks] table")
        if length & (length - 1):
            raise ValueError(f"kv: paged block size must be a power of two, got {length}")
        return length, length.bit_length() - 1, table, table.shape[1]
    return length, 0, None, 0


def bias_table(spec: AttentionSpec, step: Step, ids: list[int], n_keys: tuple[int, ...]):
    """(table, sh, sq, sk, off): the BiasTable operand, so bias(h, q, k) = table[h·sh + q·sq + k·sk + off]."""
    q_max = max(step.total_lens[i] for i in ids)  # query positions < q_max
    k_max = max(max(n_keys[i] for i in ids), 1)
    if spec.relative_bias is not None:
        rb = spec.relative_bias
        if rb.dim() != 3 or rb.shape[1] < q_max or rb.shape[2] < k_max:
            raise ValueError(
                f"relative_bias: expected [H_r, >= {q_max} query positions, >= {k_max} keys], got {tuple(rb.shape)}"
            )
        rb = rb.to(device=step.device, dtype=torch.float32).contiguous()
        return rb, rb.shape[1] * rb.shape[2], rb.shape[2], 1, 0
    # implicit T5 buckets: expand the [H_r, num_buckets] table to one value per distance k − q,
    # using the reference's bucket function itself
    bidir = spec.bidirectional_buckets

    def build():
        rel = torch.arange(-(q_max - 1), k_max, dtype=torch.long)
        b = relative_bucket(rel, bidirectional=bidir, num_buckets=spec.num_buckets, max_distance=spec.max_distance)
        return b.to(step.device)

    buckets = step.memo(("cuda.rel_buckets", q_max, k_max, bidir, spec.num_buckets, spec.max_distance), build)
    dense = spec.relative_table.to(device=step.device, dtype=torch.float32)[:, buckets].contiguous()
    return dense, dense.shape[1], -1, 1, q_max - 1
