"""What the CUDA launchers (``cuda_prepare``, ``cuda_context``, ``cuda_decode``, ``cuda_fp8``) share:
CuPy access, raw pointers and typed scalars, launching on torch's current stream, the checks of
activations and caches, and the dense bias table both attention kernels read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..batch.kv_cache import CacheLayout, LayerKV
from ..batch.step import Step
from .base import AttentionSpec
from .capabilities import HALF_DTYPES
from .cuda_plan import relative_buckets


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


def new(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output buffer of the launchers comes from here (the GPU tests replace it with a
    NaN-filled allocator, so an element a kernel fails to write shows up)."""
    return torch.empty(shape, dtype=dtype, device=device)


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


@dataclass(frozen=True)
class CacheGeometry:
    """How the kernels address one layer's cache (checked against the layer's head layout)."""

    length: int  # contiguous: S_max; paged: P, the tokens per block
    log2_length: int  # paged: log2(P) (the kernels shift, not divide); contiguous: 0
    block_table: torch.Tensor | None  # paged: [max_seqs, max_blocks] int32
    table_stride: int  # paged: the block table's row stride; contiguous: 0


NO_CACHE = CacheGeometry(0, 0, None, 0)


def cache_geometry(kv: LayerKV, kv_heads: int, head_size: int, dtype: torch.dtype) -> CacheGeometry:
    """The cache's geometry, after checking its shape, dtype and block table."""
    data = kv.data
    if data.dim() != 5 or data.shape[1] != 2 or data.shape[2] != kv_heads or data.shape[4] != head_size:
        raise ValueError(
            f"kv.data: expected [rows, 2, {kv_heads} (KV heads on this rank), len, {head_size}], "
            f"got {tuple(data.shape)}"
        )
    if not data.is_contiguous():
        raise ValueError("kv.data: the CUDA backend needs a contiguous cache tensor")
    expected = kv.cache_dtype.storage_dtype(dtype)
    if data.dtype != expected:
        raise ValueError(
            f"kv.data: a {kv.cache_dtype.value} cache for {dtype} activations stores {expected}, got {data.dtype}"
        )
    length = data.shape[3]
    if kv.cache_layout is CacheLayout.paged:
        table = kv.block_table
        if table is None or table.dtype != torch.int32 or table.dim() != 2 or not table.is_contiguous():
            raise ValueError("kv.block_table: a paged cache needs a contiguous int32 [max_seqs, max_blocks] table")
        if length & (length - 1):
            raise ValueError(f"kv: paged block size must be a power of two, got {length}")
        return CacheGeometry(length, length.bit_length() - 1, table, table.shape[1])
    return CacheGeometry(length, 0, None, 0)


def check_reach(kv: LayerKV, geometry: CacheGeometry, max_keys: int, max_slot: int) -> None:
    """A contiguous cache must hold every position and slot a launch touches (a paged one holds
    whatever its block table names; unallocated blocks are skipped by the kernels)."""
    if kv.cache_layout is not CacheLayout.contiguous:
        return
    if max_keys > geometry.length:
        raise ValueError(f"kv: a sequence reaches {max_keys} positions, the cache holds {geometry.length}")
    if max_slot >= kv.data.shape[0]:
        raise ValueError(f"kv: slot {max_slot} is outside the cache's {kv.data.shape[0]} rows")


def checked_alibi(spec: AttentionSpec, heads: int, device: torch.device) -> torch.Tensor | None:
    """The effective ALiBi slopes as the kernels read them: ``[H_r]`` fp32 on the device, or None."""
    if spec.alibi_slopes is None:
        return None
    alibi = spec.alibi_slopes.to(device=device, dtype=torch.float32).contiguous()
    if alibi.numel() != heads:
        raise ValueError(f"alibi_slopes: expected {heads} slopes (heads on this rank), got {alibi.numel()}")
    return alibi


@dataclass(frozen=True)
class BiasTable:
    """The kernels' table operand: ``bias(h, q, k) = table[h·head_stride + q·q_stride + k·k_stride + offset]``."""

    table: torch.Tensor | None  # fp32 on the device; None: no table bias
    head_stride: int = 0
    q_stride: int = 0
    k_stride: int = 0
    offset: int = 0

    def args(self) -> tuple:
        """The five kernel parameters, in the kernels' order."""
        return (ptr(self.table), i64(self.head_stride), i64(self.q_stride), i64(self.k_stride), i64(self.offset))


NO_BIAS_TABLE = BiasTable(None)


def bias_table(spec: AttentionSpec, step: Step, ids, n_keys: tuple[int, ...]) -> BiasTable:
    """The relative-attention bias of sequences ``ids`` as the kernels read it."""
    q_max = max(step.total_lens[i] for i in ids)  # query positions < q_max
    k_max = max(max(n_keys[i] for i in ids), 1)
    if spec.relative_bias is not None:
        rb = spec.relative_bias
        if rb.dim() != 3 or rb.shape[1] < q_max or rb.shape[2] < k_max:
            raise ValueError(
                f"relative_bias: expected [H_r, >= {q_max} query positions, >= {k_max} keys], got {tuple(rb.shape)}"
            )
        rb = rb.to(device=step.device, dtype=torch.float32).contiguous()
        return BiasTable(rb, rb.shape[1] * rb.shape[2], rb.shape[2], 1, 0)
    # implicit T5 buckets: the [H_r, num_buckets] table expanded to one value per distance k − q,
    # through the reference's bucket function (the bucket index per distance is planned once per step)
    buckets = relative_buckets(step, q_max, k_max, spec.bidirectional_buckets, spec.num_buckets, spec.max_distance)
    dense = spec.relative_table.to(device=step.device, dtype=torch.float32)[:, buckets].contiguous()
    return BiasTable(dense, dense.shape[1], -1, 1, q_max - 1)
