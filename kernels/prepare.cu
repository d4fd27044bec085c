// Fused prepare: QKV bias + RoPE + K/V cache write (quantizing for int8/fp8) + Q out (K/V out too
// when given pointers for them; the runtime passes null: the cache holds them).
//
// One pass over qkv [T, (H + 2·KV)·D]: block (token, g) takes heads [g·hpb, (g+1)·hpb) of the
// token; each thread handles channel PAIRS of those heads (the two channels a rotation mixes; plain
// adjacent pairs elsewhere), so the rotation needs no communication; the token's cos/sin are
// computed once per block (shared memory) for all its heads. Memory-bound: qkv read once; q/k/v
// written once, K/V also into the cache. The launcher picks hpb (heads_per_block): all heads
// when the tokens alone fill the GPU (prefill), fewer at decode, where one block per token would
// leave most SMs idle while it walks every head of a wide model.
//
// Numerics follow tp_runtime.backends.reference.prepare exactly:
//   x = T(qkv + bias)                       (fp32 add, rounded to the activation type T)
//   angle = fp32(t · inv_freq[seq, i])      (fp64 product; t = position, divided by the linear
//                                            factor in fp64; inv_freq = 1 / base^(2i/rot) computed
//                                            in fp64 on the host per sequence: dynamic NTK base)
//   x' = T(x·cos − y·sin), y' = T(y·cos + x·sin)   (fp32, no FMA contraction, as torch)
// GPT-J pairs channels (2i, 2i+1); NeoX pairs (i, i + rot/2); channels >= rot pass through.
#include "common.cuh"
#include "kv_access.cuh"

namespace tp {

struct RopeNone {
  static constexpr int kind = 0;
};
struct RopeGptj {
  static constexpr int kind = 1;
};
struct RopeNeox {
  static constexpr int kind = 2;
};

template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float<T>(from_float<T>(x));
}

// Params layout (built by tp_runtime/backends/cuda_prepare.py:_args, same order):
//   qkv        [T, (H + 2KV)·D]  activations (row stride qkv_stride elements)
//   bias       [(H + 2KV)·D] or null
//   q_out      [T, H, D];  k_out, v_out [T, KV, D] (contiguous), or null: not written
//   cache      layer's cache data (contiguous or paged pool), storage per Cache
//   addr       block table / heads / length / head size (see kv_access.cuh)
//   positions  [T] int32 absolute positions; token_seq [T] int32; slots [B] int32
//   inv_freq   [B, rot/2] fp64 (RoPE only)
//   pos_div    linear scaling factor (1.0 otherwise), fp64
//   num_tokens, H, KV, D, rot, qkv_stride; heads_per_block (grid.y · hpb >= H + 2KV);
//   quant_scale (fp32, int8/fp8 caches)
template <typename T, typename Cache, typename Layout, typename Rope>
__global__ void __launch_bounds__(256, 4) prepare_kernel(
    const T* __restrict__ qkv, const T* __restrict__ bias, T* __restrict__ q_out, T* __restrict__ k_out,
    T* __restrict__ v_out, void* __restrict__ cache, const int* __restrict__ block_table, int bt_stride,
    int cache_len, int log2_cache_len, const int* __restrict__ positions, const int* __restrict__ token_seq,
    const int* __restrict__ slots, const double* __restrict__ inv_freq, double pos_div, int num_tokens,
    int num_heads, int num_kv_heads, int head_size, int rot, int qkv_stride, int heads_per_block,
    float quant_scale) {
  const int D = head_size;
  const int half_d = D >> 1, half_rot = rot >> 1;
  const int heads = num_heads + 2 * num_kv_heads;
  const int head0 = blockIdx.y * heads_per_block;
  const int pairs = (min(heads, head0 + heads_per_block) - head0) * half_d;  // this block's
  const KVAddr addr{block_table, bt_stride, num_kv_heads, cache_len, log2_cache_len, D};
  // The rotation angles depend on (token, pair) only, not on the head: compute cos/sin of the
  // rot/2 angles once into shared memory, then every head of the block uses them.
  extern __shared__ float trig[];  // [2][rot/2]: cos, then sin
  const int tok = blockIdx.x;
  if (tok >= num_tokens) return;
  const int seq = token_seq[tok];
  const int pos = positions[tok];
  if constexpr (Rope::kind != 0) {
    const double t = __ddiv_rn((double)pos, pos_div);
#pragma unroll 1
    for (int j = threadIdx.x; j < half_rot; j += blockDim.x) {
      const float angle = (float)__dmul_rn(t, inv_freq[(i64)seq * half_rot + j]);
      sincosf(angle, &trig[half_rot + j], &trig[j]);
    }
    __syncthreads();
  }
  const int slot = Layout::kHasCache ? slots[seq] : 0;
  const T* src_tok = qkv + (i64)tok * qkv_stride;
#pragma unroll 2
  for (int rem = threadIdx.x; rem < pairs; rem += blockDim.x) {
    const int local = rem / half_d;
    const int hh = head0 + local;  // head among [Q heads | K heads | V heads]
    const int j = rem - local * half_d;
    const bool rotate = Rope::kind != 0 && hh < num_heads + num_kv_heads && j < half_rot;
    // NeoX rotated pair (j, j + rot/2); otherwise adjacent channels (2j, 2j + 1): for GPT-J that is
    // the rotated pair, past rot (j >= rot/2) it covers channels rot..D-1, and V heads take all.
    const int e0 = (rotate && Rope::kind == 2) ? j : 2 * j;
    const int e1 = (rotate && Rope::kind == 2) ? j + half_rot : 2 * j + 1;
    const T* src = src_tok + hh * D;
    float x0 = to_float<T>(src[e0]), x1 = to_float<T>(src[e1]);
    if (bias != nullptr) {
      x0 = __fadd_rn(x0, to_float<T>(bias[hh * D + e0]));
      x1 = __fadd_rn(x1, to_float<T>(bias[hh * D + e1]));
    }
    x0 = round_to<T>(x0);
    x1 = round_to<T>(x1);
    if (rotate) {
      const float c = trig[j], sn = trig[half_rot + j];
      const float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, sn));
      const float y1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, sn));
      x0 = round_to<T>(y0);
      x1 = round_to<T>(y1);
    }
    const T t0 = from_float<T>(x0), t1 = from_float<T>(x1);
    if (hh < num_heads) {
      T* dst = q_out + ((i64)tok * num_heads + hh) * D;
      dst[e0] = t0;
      dst[e1] = t1;
      continue;
    }
    const int kv01 = hh < num_heads + num_kv_heads ? 0 : 1;
    const int kvh = hh - num_heads - kv01 * num_kv_heads;
    if (k_out != nullptr) {
      T* dst = (kv01 ? v_out : k_out) + ((i64)tok * num_kv_heads + kvh) * D;
      dst[e0] = t0;
      dst[e1] = t1;
    }
    if constexpr (Layout::kHasCache) {
      const i64 row = Layout::row(addr, slot, kv01, kvh, pos);
      if (row < 0) continue;  // paged: no block allocated (block id -1); never write outside the pool
      if constexpr (Cache::kQuantized) {
        u8* c8 = reinterpret_cast<u8*>(cache) + row;
        c8[e0] = Cache::encode(x0, quant_scale);
        c8[e1] = Cache::encode(x1, quant_scale);
      } else {
        T* ct = reinterpret_cast<T*>(cache) + row;
        ct[e0] = t0;
        ct[e1] = t1;
      }
    }
  }
}

}  // namespace tp
