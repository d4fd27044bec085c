"""Compiling and caching the CUDA kernels of ``kernels/`` (NVRTC through ``cupy.RawModule``).

Every compile-time variant of every kernel family is named in ONE table, ``FAMILIES``: the source
file, the C++ template the variant instantiates, and the values each template parameter may take
(with the reason each variant exists). ``get_kernel(family, **params)`` checks the request
against the table (an unsupported combination raises ``NotImplementedError`` listing what is
supported), compiles the one instantiation it names and returns its ``cupy.RawKernel``.

Caching, two levels:
  * in-process: one ``RawKernel`` per (family, params), kept for the life of the process;
  * on disk: CuPy's own kernel cache, keyed by source + options + name expression + NVRTC
    version. Its folder is ``$CUPY_CACHE_DIR``; when that is unset we set it (before CuPy reads
    it) to CuPy's per-user default ``~/.cupy/kernel_cache``, so every process of one user on a
    node -- MPI ranks and the compile workers of ``precompile`` -- shares one cache. The
    ``*.cuh`` headers a source includes are hashed into the compiled text, so editing a header
    invalidates the cached binaries that might include it.

Under ``mpirun``: call ``precompile(variants, local_comm)`` with the node-local communicator (the
shared-memory split). Node-local rank 0 compiles everything (in parallel worker processes),
then the node barriers, then every rank loads the binaries from the disk cache.

Public API (the launchers and launch/check_kernels use it):
  ``FAMILIES``, ``Family``, ``get_kernel(family, **params)``, ``kernel_options()``,
  ``precompile(families_and_params, local_comm=None, workers=None)``, ``KernelCompileError``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

os.environ.setdefault("CUPY_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache"))

from ..resources import kernels_dir  # noqa: E402
from .capabilities import CAPABILITIES  # noqa: E402


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel variant; the message names the variant, the options and the log."""


@dataclass(frozen=True)
class Family:
    """One kernel family: a source file and the template instantiations it may be asked for.

    ``template`` is a ``str.format`` pattern over the parameter names producing the NVRTC name
    expression (e.g. ``"tp::foo<{dtype}, {head_size}>"``). ``params`` maps each parameter to
    ``{python value: C++ token}``; the python values are what callers pass to ``get_kernel``
    (torch dtypes and enums are accepted and normalised to their names/values). ``rule``
    optionally rejects combinations the per-parameter lists cannot express: it returns a
    message (unsupported) or None (fine). ``arch`` replaces the device's ``-arch=sm_XY``
    (arch-specific features such as wgmma and setmaxnreg exist only on ``sm_90a``).
    """

    source: str
    template: str
    params: Mapping[str, Mapping[object, str]]
    rule: Callable[[dict], str | None] | None = None
    # the target when the family needs one other than the device's own (e.g. "sm_90a" for wgmma)
    arch: str | None = None


_HALF_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}


def _head_sizes(family: str) -> dict[int, str]:
    """The head sizes ``capabilities`` says the family serves, as template arguments."""
    return {d: str(d) for d in CAPABILITIES[family].head_sizes}


# Cache storage: what the K/V of the cache are stored as; int8/fp8 are dequantized on load.
_CACHE_TYPES = {"auto": "tp::CacheAuto", "int8": "tp::CacheInt8", "fp8": "tp::CacheFp8"}


def _context_tile_rule(p: dict) -> str | None:
    """Tile shapes whose accumulators fit the register file without spilling (ptxas, sm_90)."""
    d, w, mt, bn = p["head_size"], p["warps"], p["m_tiles"], p["block_n"]
    regs = mt * d // 2 + mt * bn // 2 + (mt * d // 4 if mt * d <= 128 else 0)  # O + S + Q fragments
    if regs > 192:
        return f"tile warps={w}, m_tiles={mt}, block_n={bn} needs ~{regs} accumulator registers per thread at D={d}"
    if (16 * w * mt + 4 * bn) * (d + 8) * 2 > 227 * 1024:
        return f"tile warps={w}, m_tiles={mt}, block_n={bn} needs more than 227 KB of shared memory at D={d}"
    return None


FAMILIES: dict[str, Family] = {
    # Fused bias + RoPE + cache write + Q out (kernels/prepare.cu). Memory-bound, so only the
    # variants that change the inner loop's types are compile-time; everything else is a
    # runtime argument.
    "prepare": Family(
        source="prepare.cu",
        template="tp::prepare_kernel<{dtype}, {cache}, {layout}, {rope}>",
        params={
            # activation dtype: fp16 and bf16 (fp32 stays on the reference backend)
            "dtype": _HALF_TYPES,
            # cache storage: the quantizing store differs per type
            "cache": _CACHE_TYPES,
            # where a token's K/V row lives: batch row + position, or block table lookup
            "layout": {"contiguous": "tp::LayoutContiguous", "paged": "tp::LayoutPaged", "none": "tp::LayoutNone"},
            # pairing of rotated channels: none, GPT-J (2i, 2i+1), NeoX (i, i + rot/2)
            "rope": {"none": "tp::RopeNone", "gptj": "tp::RopeGptj", "neox": "tp::RopeNeox"},
        },
    ),
    # FlashAttention-2-style context (prefill) attention (kernels/context_attention.cu).
    "context": Family(
        source="context_attention.cu",
        template="tp::context_attention_kernel<{dtype}, {head_size}, {mask}, {bias}, {layout}, {cache}, "
        "{warps}, {m_tiles}, {block_n}>",
        params={
            # mma.sync m16n8k16 takes fp16 or bf16 operands (fp32 accumulate in both)
            "dtype": _HALF_TYPES,
            # fragment counts and shared-memory tiles are sized by D at compile time
            "head_size": _head_sizes("context"),
            # causal skips tiles above the diagonal; bidirectional adds ChatGLM's -10000 column;
            # padding: every key of the sequence (encoders, cross attention)
            "mask": {
                "causal": "tp::MaskCausal",
                "padding": "tp::MaskPadding",
                "bidirectional": "tp::MaskBidirectional",
            },
            # additive score bias computed inside the loop: none; ALiBi from the per-head slopes;
            # "table": a bias read from an fp32 table at h·sh + q·sq + k·sk + off -- one variant
            # serves both T5 forms: the explicit [H, Q, K] table, and the implicit bucket table
            # expanded on the host into a per-distance table (so the buckets, bidirectional or
            # causal, come from the same function as the reference's)
            "bias": {"none": "tp::BiasNone", "alibi": "tp::BiasAlibi", "table": "tp::BiasTable"},
            # K/V addressing: contiguous [B, 2, KV, S_max, D] or paged pool + block table
            "layout": {"contiguous": "tp::LayoutContiguous", "paged": "tp::LayoutPaged"},
            # K/V storage; int8/fp8 are dequantized while filling the shared-memory tile
            "cache": _CACHE_TYPES,
            # tile shape, picked per head size by cuda_context.TILES (measured, see
            # kernels/NOTES_context.md): warps per block; m-tiles of 16 query rows per warp (2: each
            # K/V fragment feeds two MMAs, half the shared-memory traffic); keys per K/V tile
            "warps": {4: "4", 8: "8"},
            "m_tiles": {1: "1", 2: "2"},
            "block_n": {32: "32", 64: "64", 128: "128"},
        },
        rule=lambda p: _context_tile_rule(p),
    ),
    # Hopper context attention (kernels/context_hopper.cu): wgmma + TMA + warp specialisation, on
    # sm_90a only (its wgmma/setmaxnreg are arch-specific). Serves capabilities "context_hopper".
    "context_hopper": Family(
        source="context_hopper.cu",
        template="tp::context_hopper_kernel<{dtype}, {head_size}, {mask}, {bias}>",
        params={
            # wgmma .f16 / .bf16 operands, fp32 accumulators
            "dtype": _HALF_TYPES,
            # accumulator registers and shared-memory tiles are sized by D
            "head_size": _head_sizes("context_hopper"),
            # causal: keys up to the query's position; padding: every key of the sequence;
            # bidirectional: padding plus ChatGLM's -10000 on the last key for earlier queries
            "mask": {
                "causal": "tp::HopperMaskCausal",
                "padding": "tp::HopperMaskPadding",
                "bidirectional": "tp::HopperMaskBidirectional",
            },
            # additive score bias inside the softmax: none; ALiBi from the per-head slopes; a
            # relative table (T5 buckets expanded per distance, or an explicit [H, q, k] bias)
            "bias": {"none": "tp::HopperBiasNone", "alibi": "tp::HopperBiasAlibi", "table": "tp::HopperBiasTable"},
        },
        arch="sm_90a",
    ),
    # Generation-phase attention (kernels/decode_attention.cu): one query token per sequence,
    # flash-decoding with key splits merged by log-sum-exp in the same launch.
    "decode": Family(
        source="decode_attention.cu",
        template="tp::decode_attention_kernel<{dtype}, {cache}, {layout}, {head_size}, {heads}>",
        params={
            # activation dtype of q and out (fp32 accumulate inside)
            "dtype": _HALF_TYPES,
            # K/V storage; int8/fp8 are dequantized in registers inside the dot product
            "cache": _CACHE_TYPES,
            # K/V addressing: contiguous rows, or a block table (its row slice kept in shared memory)
            "layout": {"contiguous": "tp::LayoutContiguous", "paged": "tp::LayoutPaged"},
            # the registers holding q and the output accumulators are sized by D
            "head_size": _head_sizes("decode"),
            # query heads one block serves from one KV head (GQA packing: K/V read once for all):
            # the group rounded up to a power of two, at most 32 (8 for D 256; larger groups use
            # several chunks); 16 and 32 only on the tensor-core path (D <= 128: the MMA's 16 rows)
            "heads": {1: "1", 2: "2", 4: "4", 8: "8", 16: "16", 32: "32"},
        },
        rule=lambda p: "16 or 32 heads per block need D <= 128" if p["heads"] > 8 and p["head_size"] > 128 else None,
    ),
    # The decode split merge as a launch of its own (decode_attention.cu), for blocks of 16 or 32
    # heads (cuda_decode.SEPARATE_MERGE_HEADS), whose in-kernel merge by one block is slow.
    "decode_merge": Family(
        source="decode_attention.cu",
        template="tp::decode_merge_kernel<{dtype}, {head_size}>",
        params={"dtype": _HALF_TYPES, "head_size": _head_sizes("decode")},
    ),
    # Per-tensor FP8 quantization of a projection's input (kernels/fp8_quant.cu): max |x|, then
    # x / scale rounded to e4m3. Elementwise and memory-bound: only the input type is compile-time.
    "fp8_amax": Family(
        source="fp8_quant.cu",
        template="tp::fp8_amax_kernel<{dtype}>",
        params={"dtype": _HALF_TYPES},
    ),
    "fp8_quantize": Family(
        source="fp8_quant.cu",
        template="tp::fp8_quantize_kernel<{dtype}>",
        params={"dtype": _HALF_TYPES},
    ),
}

_lock = threading.Lock()
_kernels: dict[tuple, object] = {}
_header_digest: dict[str, str] = {}


def _normalise(value):
    """torch dtypes -> 'float16' etc., enums -> their value; everything else unchanged."""
    if isinstance(value, Enum):
        return value.value
    mod = type(value).__module__
    if mod.startswith("torch") and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    return value


def _resolve(family: str, params: dict) -> tuple[Family, dict, str]:
    """Check a request against ``FAMILIES``; return the family, normalised params, name expression."""
    if family not in FAMILIES:
        raise NotImplementedError(f"kernel family {family!r}: not in FAMILIES; supported families: {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    params = {k: _normalise(v) for k, v in params.items()}
    missing, extra = set(fam.params) - set(params), set(params) - set(fam.params)
    if missing or extra:
        raise TypeError(
            f"get_kernel({family!r}): expected parameters {sorted(fam.params)}, "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for name, allowed in fam.params.items():
        if params[name] not in allowed:
            raise NotImplementedError(
                f"kernel family {family!r}: {name}={params[name]!r} is not supported; supported {name} values: "
                f"{list(allowed)}. Supported combinations: " + _describe(fam)
            )
    if fam.rule is not None:
        why = fam.rule(params)
        if why:
            raise NotImplementedError(f"kernel family {family!r} {params}: {why}. Supported: " + _describe(fam))
    expr = fam.template.format(**{k: fam.params[k][v] for k, v in params.items()})
    return fam, params, expr


def _describe(fam: Family) -> str:
    return "; ".join(f"{k} in {list(v)}" for k, v in fam.params.items())


def _arch() -> str:
    import cupy

    cc = cupy.cuda.Device().compute_capability  # e.g. "90"
    return cc


def kernel_options(arch: str | None = None) -> tuple[str, ...]:
    """NVRTC options: ``-arch=`` ``arch`` (default: the current device's ``sm_<cc>``), C++17, the
    kernels folder on the include path. CuPy adds ``-ftz=true``."""
    return (f"-arch={arch or 'sm_' + _arch()}", "-std=c++17", f"-I{kernels_dir()}", "-DTP_NVRTC=1")


def _source(fam: Family) -> str:
    """The source text, stamped with a digest of the headers in kernels/ (so CuPy's cache key,
    which covers only this text, changes when an included header changes)."""
    folder = kernels_dir()
    path = folder / fam.source
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found")
    key = str(folder)
    if key not in _header_digest:
        h = hashlib.sha256()
        for header in sorted(folder.glob("*.cuh")):
            h.update(header.name.encode())
            h.update(header.read_bytes())
        _header_digest[key] = h.hexdigest()[:16]
    return f"// tp_runtime headers {_header_digest[key]}\n" + path.read_text()


def get_kernel(family: str, **params):
    """The ``cupy.RawKernel`` of one variant, compiled on first use (then cached in process and on disk).

    Raises ``NotImplementedError`` for an unsupported variant (listing the supported values) and
    ``KernelCompileError`` (variant, options, NVRTC log) when compilation fails.
    """
    try:
        key = (family, tuple(sorted((k, _normalise(v)) for k, v in params.items())))
        kernel = _kernels.get(key)
    except TypeError:  # unhashable or unsortable values: let _resolve say what is wrong
        key, kernel = None, None
    if kernel is not None:
        return kernel  # fast path: every launch after the first
    fam, params, expr = _resolve(family, params)
    key = (family, tuple(sorted(params.items())))
    with _lock:
        kernel = _kernels.get(key)
        if kernel is None:
            kernel = _compile(family, fam, params, expr)
            _kernels[key] = kernel
    return kernel


def _compile(family: str, fam: Family, params: dict, expr: str):
    import cupy
    from cupy.cuda.compiler import CompileException

    options = kernel_options(fam.arch)
    code = _source(fam)
    try:
        module = cupy.RawModule(code=code, options=options, name_expressions=[expr])
        return module.get_function(expr)
    except CompileException as e:
        raise KernelCompileError(
            f"compiling kernel family {family!r} variant {params} ({expr}) from {fam.source} with options "
            f"{options} failed:\n{e}"
        ) from e


def _worker(device: int, family: str, params: dict) -> str:
    """Compile one variant in a worker process (fills the shared disk cache)."""
    import cupy

    cupy.cuda.Device(device).use()
    get_kernel(family, **params)
    return family


def _rank(comm) -> int:
    return comm.Get_rank() if hasattr(comm, "Get_rank") else int(comm.rank)


def _barrier(comm) -> None:
    (comm.Barrier if hasattr(comm, "Barrier") else comm.barrier)()


def precompile(families_and_params: Iterable[tuple[str, Mapping]], local_comm=None, workers: int | None = None) -> list:
    """Compile many variants, filling the disk cache, then load them all in this process.

    ``families_and_params``: ``[(family, {param: value, ...}), ...]``. Every request is checked
    first (unsupported ones raise before anything compiles). With ``local_comm`` (the node-local
    communicator: mpi4py ``Barrier``/``Get_rank`` or ``barrier``/``rank``) only node-local rank 0
    compiles, the node barriers, then every rank loads from the disk cache. Compilation runs in
    up to ``workers`` processes (default: CPU count, at most 16); ``workers=1`` compiles here.
    Returns the kernels in request order.
    """
    requests = [(f, dict(p)) for f, p in families_and_params]
    for f, p in requests:
        _resolve(f, p)
    error = None
    if local_comm is None or _rank(local_comm) == 0:
        try:
            _compile_parallel(requests, workers)
        except BaseException as e:  # keep the barrier: the others must not wait forever
            error = e
    if local_comm is not None:
        _barrier(local_comm)
    if error is not None:
        raise error
    return [get_kernel(f, **p) for f, p in requests]


def _compile_parallel(requests: list, workers: int | None) -> None:
    todo, seen = [], set()
    for f, p in requests:
        fam, p2, _ = _resolve(f, p)
        key = (f, tuple(sorted(p2.items())))
        if key not in _kernels and key not in seen:
            seen.add(key)
            todo.append((f, p2))
    n = min(workers or min(os.cpu_count() or 1, 16), len(todo))
    if n <= 1:
        for f, p in todo:
            get_kernel(f, **p)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import cupy

    device = cupy.cuda.Device().id
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, device, f, p) for f, p in todo]
        for fut in futures:
            fut.result()  # re-raises a worker's KernelCompileError here
