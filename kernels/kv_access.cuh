// Where a token's K/V row lives in the cache, and how cache storage converts to and from the
// activation type. Shared by prepare.cu (writes) and context_attention.cu (reads).
//
// Layouts (template tags; tp_runtime/backends/compile.py FAMILIES names them):
//   LayoutContiguous  data [B, 2, KV, S_max, D]: row (slot, kv01, head, pos)
//   LayoutPaged       pool [N, 2, KV, P, D] + block_table [max_seqs, max_blocks] int32:
//                     block = table[slot, pos / P], row (block, kv01, head, pos % P); P a power of two
//   LayoutNone        no cache (prepare for cross-attention queries writes nothing)
// Cache storage (per-tensor scale, see tp_runtime/kv_cache.py):
//   CacheAuto  the activation type itself
//   CacheInt8  clip(round_half_even(x * quant_scale), -128, 127)
//   CacheFp8   e4m3fn(RN(clip(x * quant_scale, -448, 448)))
// Reads convert the stored integer / fp8 value to the activation type EXACTLY (int8 and e4m3 are
// subsets of fp16 and bf16); the dequant scale is applied by the caller in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace tp {

using i64 = long long;
using u32 = unsigned int;
using u8 = unsigned char;

// Addressing arguments every layout needs (unused ones are ignored).
struct KVAddr {
  const int* block_table;  // paged: [max_seqs, bt_stride]
  int bt_stride;           // paged: max blocks per sequence
  int kv_heads;            // KV_r
  int len;                 // contiguous: S_max; paged: P (tokens per block)
  int log2_len;            // paged: log2(P)
  int head_size;           // D
};

struct LayoutNone {
  static constexpr bool kHasCache = false;
  static constexpr bool kLinear = false;
  __device__ __forceinline__ static i64 row(const KVAddr&, int, int, int, int) { return 0; }
};

struct LayoutContiguous {
  static constexpr bool kHasCache = true;
  static constexpr bool kLinear = true;  // positions of one (slot, kv01, head) are consecutive rows
  // Element offset of element 0 of the row of (slot, kv01 = 0 for K / 1 for V, head, position).
  __device__ __forceinline__ static i64 row(const KVAddr& a, int slot, int kv01, int head, int pos) {
    return ((i64)((slot * 2 + kv01) * a.kv_heads + head) * a.len + pos) * a.head_size;
  }
};

struct LayoutPaged {
  static constexpr bool kHasCache = true;
  static constexpr bool kLinear = false;
  __device__ __forceinline__ static i64 row(const KVAddr& a, int slot, int kv01, int head, int pos) {
    const int block = __ldg(a.block_table + (i64)slot * a.bt_stride + (pos >> a.log2_len));
    const int off = pos & (a.len - 1);
    return ((i64)(((i64)block * 2 + kv01) * a.kv_heads + head) * a.len + off) * a.head_size;
  }
};

// ---- fp8 e4m3fn <-> fp32 (round to nearest even; inputs already clamped to +-448) ----------
__device__ __forceinline__ u8 fp8_e4m3_from_float(float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(y));
  return (u8)(r & 0xff);
#else
  const u32 sign = (__float_as_uint(y) >> 24) & 0x80;
  const float a = fabsf(y);
  if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (8 rounds up to the smallest normal)
    return (u8)(sign | (u32)__float2int_rn(a * 512.0f));
  }
  u32 b = __float_as_uint(a);
  b += 0x7FFFFu + ((b >> 20) & 1u);  // keep 3 mantissa bits, ties to even
  const u32 e = (b >> 23) - 120u;    // rebias 127 -> 7
  return (u8)(sign | (e << 3) | ((b >> 20) & 7u));
#endif
}

__device__ __forceinline__ float fp8_e4m3_to_float(u8 v) {
  const u32 e = (v >> 3) & 0xFu, m = v & 7u;
  const float f = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f;
  return __uint_as_float(__float_as_uint(f) | ((u32)(v & 0x80u) << 24));
}

// ---- cache storage types ----------------------------------------------------------------
struct CacheAuto {
  static constexpr bool kQuantized = false;
  static constexpr int kBytes = 0;  // same as the activation type
};
struct CacheInt8 {
  static constexpr bool kQuantized = true;
  static constexpr int kBytes = 1;
  // x: the activation value (already rounded to the activation type), in fp32.
  __device__ __forceinline__ static u8 encode(float x, float quant_scale) {
    int r = __float2int_rn(__fmul_rn(x, quant_scale));  // round half to even, as torch.round
    r = r < -128 ? -128 : (r > 127 ? 127 : r);
    return (u8)(signed char)r;
  }
  __device__ __forceinline__ static float decode(u8 v) { return (float)(signed char)v; }
};
struct CacheFp8 {
  static constexpr bool kQuantized = true;
  static constexpr int kBytes = 1;
  __device__ __forceinline__ static u8 encode(float x, float quant_scale) {
    const float y = fminf(fmaxf(__fmul_rn(x, quant_scale), -448.0f), 448.0f);
    return fp8_e4m3_from_float(y);
  }
  __device__ __forceinline__ static float decode(u8 v) { return fp8_e4m3_to_float(v); }
};

}  // namespace tp
