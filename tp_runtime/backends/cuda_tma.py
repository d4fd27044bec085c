"""Tensor maps for the Hopper kernels' TMA loads (``cp.async.bulk.tensor``), encoded on the host.

``tiled_map(...)`` calls the driver's ``cuTensorMapEncodeTiled`` (package ``cuda-bindings``, the
GPU extra; imported only when called, so CPU CI never needs it) and returns the 128-byte map as a
one-element numpy ``V128`` array: CuPy passes a size-one numpy array BY VALUE (its bytes become
the kernel parameter), which is how a ``const __grid_constant__ tp::hopper::TensorMap`` parameter
receives it. Every map here uses 128-byte swizzle (the layout ``kernels/hopper.cuh`` describes),
zero fill outside the tensor and 256-byte L2 promotion.
"""

from __future__ import annotations

import numpy as np
import torch

_DTYPES = {torch.float16: "CU_TENSOR_MAP_DATA_TYPE_FLOAT16", torch.bfloat16: "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16"}
SWIZZLE_BYTES = 128  # the box's innermost extent in bytes must not exceed the swizzle span


def tiled_map(
    address: int,
    dtype: torch.dtype,
    dims: tuple[int, ...],
    strides: tuple[int, ...],
    box: tuple[int, ...],
) -> np.ndarray:
    """The tensor map of a ``len(dims)``-D global tensor at ``address``.

    ``dims``: extents in elements, innermost (contiguous) first; ``strides``: byte strides of dims
    1.. (multiples of 16); ``box``: the tile one TMA load copies, innermost first, its innermost
    extent times the element size at most 128 bytes.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"tiled_map: dtype {dtype} is not supported (expected one of {list(_DTYPES)})")
    rank = len(dims)
    if not 1 <= rank <= 5 or len(strides) != rank - 1 or len(box) != rank:
        raise ValueError(f"tiled_map: expected 1-5 dims, rank-1 strides, rank box; got {dims}, {strides}, {box}")
    elem = torch.tensor([], dtype=dtype).element_size()
    if box[0] * elem > SWIZZLE_BYTES or any(not 1 <= b <= 256 for b in box):
        raise ValueError(f"tiled_map: box {box} (innermost at most {SWIZZLE_BYTES // elem} elements, each <= 256)")
    if address % 16 or any(s % 16 for s in strides):
        raise ValueError(f"tiled_map: address and strides must be multiples of 16 bytes, got {address}, {strides}")
    from cuda.bindings import driver

    u64, u32 = driver.cuuint64_t, driver.cuuint32_t  # the binding's own integer types, accepted by every version
    err, tmap = driver.cuTensorMapEncodeTiled(
        getattr(driver.CUtensorMapDataType, _DTYPES[dtype]),
        rank,
        address,
        [u64(x) for x in dims],
        [u64(x) for x in strides],
        [u32(x) for x in box],
        [u32(1)] * rank,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(
            f"cuTensorMapEncodeTiled failed ({err}) for dims={dims}, strides={strides}, box={box}, dtype={dtype}"
        )
    return np.array(tmap.opaque, dtype=np.uint64).view(np.dtype((np.void, 128)))  # shape (1,): by value
