// Per-tensor FP8 (e4m3fn) quantization of the activations entering an FP8 projection
// (tp_runtime/layers/fp8.py, tp_runtime/backends/cuda_fp8.py). Two passes over x, instead of the six or
// seven elementwise torch kernels the same arithmetic takes (abs, amax, float, divide, clamp,
// convert, each a full read and write):
//
//   fp8_amax_kernel      amax_bits = bits(max |x|). For non-negative floats the unsigned order
//                        of the bit patterns is the numeric order, and NaN patterns sort above
//                        +inf, so one atomicMax per block gives max |x| and propagates a NaN the
//                        way torch.amax does. amax_bits must be zero on entry.
//   fp8_quantize_kernel  scale = the static scale if given, else (amax > 0 ? amax * fp32(1/448) : 1);
//                        xq = e4m3(clip(x / scale, -448, 448)), NaN kept; block 0 stores scale.
//
// The same arithmetic as tp_runtime.quant.scale_from_amax / quantize_e4m3 (fp32, correctly rounded
// division, round-to-nearest-even conversion), so the two agree bit for bit.
//
// Elements are visited 8 at a time (16-byte loads of fp16/bf16) when x is 16-byte aligned, then
// the tail (or everything, when unaligned) one at a time, in grid-stride loops.
#include "common.cuh"
#include "kv_access.cuh"  // fp8_e4m3_from_float

namespace tp {

constexpr int kQuantThreads = 256;

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&v)[8]) {
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = to_float(h[j]);
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    fp8_amax_kernel(const T* __restrict__ x, long long n, int aligned, unsigned int* __restrict__ amax_bits) {
  unsigned int m = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long n8 = aligned ? n / 8 : 0;
  for (long long i = first; i < n8; i += stride) {
    float v[8];
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x) + i), v);
#pragma unroll
    for (int j = 0; j < 8; ++j) m = max(m, __float_as_uint(v[j]) & 0x7fffffffu);
  }
  for (long long i = n8 * 8 + first; i < n; i += stride) m = max(m, __float_as_uint(to_float(x[i])) & 0x7fffffffu);

  m = __reduce_max_sync(0xffffffffu, m);
  __shared__ unsigned int warp_max[kQuantThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < kQuantThreads / 32 ? warp_max[threadIdx.x] : 0u;
    m = __reduce_max_sync(0xffffffffu, m);
    if (threadIdx.x == 0 && m) atomicMax(amax_bits, m);
  }
}

__device__ __forceinline__ unsigned char quantize_e4m3(float v, float scale) {
  float y = __fdiv_rn(v, scale);
  if (!isnan(y)) y = fminf(fmaxf(y, -448.0f), 448.0f);  // torch.clamp keeps NaN; fminf would not
  return fp8_e4m3_from_float(y);
}

// static_scale: a 1-element fp32 device tensor, or null for dynamic scaling (then amax_bits).
template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    fp8_quantize_kernel(const T* __restrict__ x, long long n, int aligned, const float* __restrict__ static_scale,
                        const unsigned int* __restrict__ amax_bits, unsigned char* __restrict__ out,
                        float* __restrict__ scale_out) {
  float scale;
  if (static_scale != nullptr) {
    scale = *static_scale;
  } else {
    const float amax = __uint_as_float(*amax_bits);
    // amax * fp32(1/448), as scale_from_amax (not a division); NaN amax: 1, as torch.where(amax > 0, ...)
    scale = amax > 0.0f ? __fmul_rn(amax, (float)(1.0 / 448.0)) : 1.0f;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;

  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long n8 = aligned ? n / 8 : 0;
  for (long long i = first; i < n8; i += stride) {
    float v[8];
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x) + i), v);
    unsigned int lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      lo |= (unsigned int)quantize_e4m3(v[j], scale) << (8 * j);
      hi |= (unsigned int)quantize_e4m3(v[j + 4], scale) << (8 * j);
    }
    reinterpret_cast<uint2*>(out)[i] = make_uint2(lo, hi);  // out is 8-byte aligned (a fresh allocation)
  }
  for (long long i = n8 * 8 + first; i < n; i += stride) out[i] = quantize_e4m3(to_float(x[i]), scale);
}

}  // namespace tp
