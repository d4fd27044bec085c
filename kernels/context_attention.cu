// Context (prefill) attention, FlashAttention-2 style, over a packed variable-length batch.
//
// One thread block per (head, query tile of BM rows of one sequence); the tile -> (sequence,
// first row) map is built once per step on the host (tp_runtime/backends/cuda_plan.py) and sorted by
// descending work so the longest tiles start first. Each warp owns 16 query rows. K/V tiles of BN
// keys are streamed from the KV cache (contiguous or paged, fp16/bf16 or int8/fp8) through shared
// memory, double buffered with cp.async; fragments come from ldmatrix (.trans for V), products
// from mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate). Softmax is online, in fp32, in log2
// units; P stays in registers as the A operand of P·V. S×S is never materialised.
//
// Queries of sequence i sit at positions past_i .. past_i + new_i - 1; keys at 0 .. n_keys_i - 1
// (self attention: n_keys = past + new, the cache already holds the new tokens; cross attention:
// n_keys = encoder length). Causal: key k visible to query q iff k <= q. Key tiles wholly above
// the diagonal are skipped; only tiles crossing it (or the length edge) are masked. Iteration runs
// from the last key tile down, so the masked tiles come first.
//
// Quantized caches: the stored int8 / e4m3 values are converted EXACTLY to the activation type
// while filling the shared-memory tile; the per-tensor dequant scale is folded into the softmax
// scale (K) and into the final normalisation (V).
//
// Shared memory rows are padded by 16 bytes (D + 8 elements): the 8 rows an ldmatrix phase reads
// then fall into 8 different 16-byte bank groups for every supported D (64, 80, 96, 128, 256).
#include "common.cuh"
#include "kv_access.cuh"

namespace tp {

struct MaskCausal {
  static constexpr int kind = 0;
};
struct MaskPadding {
  static constexpr int kind = 1;
};
struct MaskBidirectional {  // ChatGLM-6B: -10000 on the last key column for every earlier query
  static constexpr int kind = 2;
};
struct BiasNone {
  static constexpr int kind = 0;
};
struct BiasAlibi {  // slope_h · (k − q), slopes already effective (alibi_with_scale pre-multiplied)
  static constexpr int kind = 1;
};
struct BiasTable {  // table[h·sh + q·sq + k·sk + off] (explicit T5 table, or per-distance bucket table)
  static constexpr int kind = 2;
};

// Tile shapes are template parameters (kWarps, kMT, BN), chosen per head size by ONE table in
// Python (TILES in tp_runtime/backends/cuda_context.py, checked by compile.FAMILIES):
//   kWarps warps per block, each owning kMT m-tiles of 16 query rows (BM = 16·kWarps·kMT rows);
//   BN keys per K/V tile. With kMT = 2 every K/V fragment read from shared memory feeds two
//   MMAs (half the shared-memory traffic per flop); Q fragments stay in registers only when
//   kMT·D <= 128 (else they are re-read with ldmatrix every tile).

namespace ctx {

[[maybe_unused]] constexpr float kLog2e = 1.4426950408889634f;
[[maybe_unused]] constexpr float kLn2 = 0.6931471805599453f;
[[maybe_unused]] constexpr float kBidirectionalMask = -10000.0f;  // reference.BIDIRECTIONAL_MASK_VALUE

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16-byte global -> shared copy; src_bytes = 0 writes zeros (and reads nothing).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static u32 pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<u32*>(&h);
  }
};
template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static u32 pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&h);
  }
};

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 16 stored cache bytes (int8 / e4m3) -> 16 activation values, exactly.
template <typename T, typename Cache>
__device__ __forceinline__ void convert16(const uint4& raw, uint4 (&dst)[2]) {
  const u8* b = reinterpret_cast<const u8*>(&raw);
  u32* w = reinterpret_cast<u32*>(dst);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    w[i] = Mma<T>::pack(Cache::decode(b[2 * i]), Cache::decode(b[2 * i + 1]));
  }
}

}  // namespace ctx

// Params layout (built by tp_runtime/backends/cuda_context.py:_args, same order):
//   q [T, H, D] (token stride q_stride), out [T, H, D] (token stride out_stride), lse [T, H] fp32
//   kv          the layer's cache data; addressing per Layout (block table, stride, length, log2)
//   tiles       [num_tiles, 2] int32 (sequence, first query row of the tile)
//   cu_seqlens [B+1], past [B], n_keys [B], slots [B]   int32
//   num_heads, num_kv_heads                             query head h reads KV head h / (H / KV)
//   scale_log2  softmax_scale · log2(e) · k_dequant;  v_scale  V dequant (1 unless int8/fp8)
//   alibi [H] fp32 slopes;  table, tab_h, tab_q, tab_k, tab_off (BiasTable)
template <typename T, int D, typename Mask, typename Bias, typename Layout, typename Cache, int kWarps, int kMT, int BN>
__global__ void __launch_bounds__(kWarps * 32, kWarps <= 4 ? 2 : 1) context_attention_kernel(
    const T* __restrict__ q, int q_stride, T* __restrict__ out, int out_stride, float* __restrict__ lse,
    const void* __restrict__ kv, const int* __restrict__ block_table, int bt_stride, int cache_len,
    int log2_cache_len, const int* __restrict__ tiles, const int* __restrict__ cu_seqlens,
    const int* __restrict__ past, const int* __restrict__ n_keys, const int* __restrict__ slots, int num_heads,
    int num_kv_heads, float scale_log2, float v_scale, const float* __restrict__ alibi,
    const float* __restrict__ table, long long tab_h, long long tab_q, long long tab_k, long long tab_off) {
  using namespace ctx;
  constexpr int kWarpRows = 16 * kMT;
  constexpr int BM = kWarpRows * kWarps;
  constexpr int kThreads = kWarps * 32;
  constexpr int kStride = D + 8;   // shared-memory row stride (elements)
  constexpr int kChunks = D / 8;   // 16-byte chunks per row
  constexpr int kNT = BN / 8;      // n-tiles of S (8 keys each)
  constexpr int kKS = D / 16;      // k-steps of Q·Kᵀ
  constexpr int kDT = D / 8;       // n-tiles of O
  constexpr bool kQRegs = kMT * D <= 128;  // keep Q fragments in registers (else re-read from shared memory)
  // Scores kept raw until the exp (one FFMA per element) when nothing is added to them.
  constexpr bool kScaleLate = Bias::kind == 0 && Mask::kind != 2;
  static_assert(D % 16 == 0 && BN % 16 == 0 && (kMT == 1 || kMT == 2), "tile shapes");

  extern __shared__ uint4 smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * kStride;       // [2][BN][kStride]
  T* sV = sK + 2 * BN * kStride;   // [2][BN][kStride]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int h = blockIdx.x;
  const int seq = tiles[2 * blockIdx.y], m0 = tiles[2 * blockIdx.y + 1];
  const int tok0 = cu_seqlens[seq];
  const int new_len = cu_seqlens[seq + 1] - tok0;
  const int qpos0 = past[seq] + m0;
  const int nk = n_keys[seq];
  const int slot = slots[seq];
  const int kvh = h / (num_heads / num_kv_heads);
  const int rows = min(BM, new_len - m0);
  const int k_end = Mask::kind == 0 ? min(nk, qpos0 + rows) : nk;  // keys any row of the tile may see
  // keys [0, no_mask_end) need no mask for any row of the tile
  const int no_mask_end = Mask::kind == 0 ? min(nk, qpos0 + 1) : (Mask::kind == 2 ? nk - 1 : nk);
  const int n_kb = k_end > 0 ? (k_end + BN - 1) / BN : 0;
  const KVAddr addr{block_table, bt_stride, num_kv_heads, cache_len, log2_cache_len, D};
  const int wrow0 = warp * kWarpRows;  // this warp's first row in the tile

  // ---- tile loaders -----------------------------------------------------------------------
  auto load_q = [&]() {
    constexpr int kN = BM * kChunks;
#pragma unroll
    for (int i = 0; i < (kN + kThreads - 1) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      if (kN % kThreads != 0 && c >= kN) break;
      const int r = c / kChunks, ch = c % kChunks;
      const bool ok = m0 + r < new_len;
      const T* src = ok ? q + (i64)(tok0 + m0 + r) * q_stride + h * D + ch * 8 : q;
      cp_async16(smem_u32(sQ + r * kStride + ch * 8), src, ok ? 16 : 0);
    }
  };
  // contiguous caches: the rows of this sequence's K (V) are consecutive, one base pointer each
  const T* kv_seq[2] = {nullptr, nullptr};
  if constexpr (Layout::kLinear && !Cache::kQuantized) {
    kv_seq[0] = reinterpret_cast<const T*>(kv) + Layout::row(addr, slot, 0, kvh, 0);
    kv_seq[1] = reinterpret_cast<const T*>(kv) + Layout::row(addr, slot, 1, kvh, 0);
  }
  auto load_kv = [&](int kv01, int kb, T* dst_tile) {
    if constexpr (!Cache::kQuantized) {
      const T* base = reinterpret_cast<const T*>(kv);
      constexpr int kN = BN * kChunks;
#pragma unroll
      for (int i = 0; i < (kN + kThreads - 1) / kThreads; ++i) {
        const int c = tid + i * kThreads;
        if (kN % kThreads != 0 && c >= kN) break;
        const int r = c / kChunks, ch = c % kChunks;
        const int j = kb * BN + r;
        const bool ok = j < k_end;
        const T* src = base;
        if constexpr (Layout::kLinear) {
          if (ok) src = kv_seq[kv01] + (i64)j * D + ch * 8;
        } else {
          if (ok) src = base + Layout::row(addr, slot, kv01, kvh, j) + ch * 8;
        }
        cp_async16(smem_u32(dst_tile + r * kStride + ch * 8), src, ok ? 16 : 0);
      }
    } else {
      const u8* base = reinterpret_cast<const u8*>(kv);
      constexpr int kQChunks = D / 16;  // 16 stored bytes -> 16 values (two 16-byte shared chunks)
      constexpr int kN = BN * kQChunks;
#pragma unroll
      for (int i = 0; i < (kN + kThreads - 1) / kThreads; ++i) {
        const int c = tid + i * kThreads;
        if (kN % kThreads != 0 && c >= kN) break;
        const int r = c / kQChunks, ch = c % kQChunks;
        const int j = kb * BN + r;
        uint4 raw = make_uint4(0, 0, 0, 0);
        if (j < k_end) raw = __ldg(reinterpret_cast<const uint4*>(base + Layout::row(addr, slot, kv01, kvh, j) + ch * 16));
        uint4 vals[2];
        convert16<T, Cache>(raw, vals);
        uint4* d = reinterpret_cast<uint4*>(dst_tile + r * kStride + ch * 16);
        d[0] = vals[0];
        d[1] = vals[1];
      }
    }
  };
  // Q fragment (A operand) of m-tile mt, k-step ks, from shared memory
  auto q_frag = [&](u32(&a)[4], int mt, int ks) {
    ldsm_x4(a, smem_u32(sQ + (wrow0 + mt * 16 + (lane & 15)) * kStride + ks * 16 + (lane >> 4) * 8));
  };

  // ---- prologue: Q and the first (last-in-sequence) K tile, then its V tile ---------------
  load_q();
  if (n_kb > 0) load_kv(0, n_kb - 1, sK);
  cp_async_commit();
  if (n_kb > 0) load_kv(1, n_kb - 1, sV);
  cp_async_commit();

  float o[kMT][kDT][4];
  float m_r[kMT][2], l_r[kMT][2];  // running max (log2 units, scaled) and sum (own columns only)
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < kDT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    m_r[mt][0] = m_r[mt][1] = -INFINITY;
    l_r[mt][0] = l_r[mt][1] = 0.f;
  }
  u32 qf[kQRegs ? kMT : 1][kQRegs ? kKS : 1][4];
  const int qrow0 = qpos0 + wrow0 + g;  // position of this thread's first row (others: +8, +16, +24)
  const float slope_log2 = Bias::kind == 1 ? alibi[h] * kLog2e : 0.f;

  for (int it = 0; it < n_kb; ++it) {
    const int kb = n_kb - 1 - it;
    const int buf = it & 1;
    const T* k_tile = sK + buf * BN * kStride;
    const T* v_tile = sV + buf * BN * kStride;
    cp_async_wait<1>();
    __syncthreads();  // K[kb] (and Q) visible to every warp; buffer buf^1 free
    if constexpr (kQRegs) {
      if (it == 0) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int ks = 0; ks < kKS; ++ks) q_frag(qf[kQRegs ? mt : 0][kQRegs ? ks : 0], mt, ks);
      }
    }
    if (kb > 0) load_kv(0, kb - 1, sK + (buf ^ 1) * BN * kStride);
    cp_async_commit();

    // ---- S = Q·Kᵀ (kMT·16 rows × BN keys per warp); each K fragment feeds kMT MMAs ----
    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int i = 0; i < kNT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKS; ++ks) {
      u32 a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if constexpr (kQRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[mt][i] = qf[kQRegs ? mt : 0][kQRegs ? ks : 0][i];
        } else {
          q_frag(a[mt], mt, ks);
        }
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        u32 b[4];
        ldsm_x4(b, smem_u32(k_tile + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * kStride + ks * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Mma<T>::run(s[mt][2 * np], a[mt], b[0], b[1]);
          Mma<T>::run(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // ---- scores: scale, bias, mask ----
    const bool masked = (kb + 1) * BN > no_mask_end;
    const int kcol0 = kb * BN + 2 * t4;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kpos = kcol0 + n * 8 + (e & 1);
          const int qp = qrow0 + mt * 16 + (e >> 1) * 8;
          float x = s[mt][n][e];
          if constexpr (!kScaleLate) {
            float b = 0.f;
            if constexpr (Bias::kind == 1) b = slope_log2 * (float)(kpos - qp);
            if constexpr (Bias::kind == 2) {
              // clamp: rows past the sequence and keys past n_keys are discarded / masked anyway,
              // but must not index outside the table
              const int qc = min(qp, qpos0 + rows - 1), kc = min(kpos, nk - 1);
              b = __ldg(table + (h * tab_h + qc * tab_q + kc * tab_k + tab_off)) * kLog2e;
            }
            x = fmaf(x, scale_log2, b);
          }
          if (masked) {
            if (kpos >= nk || (Mask::kind == 0 && kpos > qp)) x = -INFINITY;
            if (Mask::kind == 2 && kpos == nk - 1 && qp < nk - 1) x += kBidirectionalMask * kLog2e;
          }
          s[mt][n][e] = x;
        }
      }
    }

    // ---- online softmax (fp32, log2 units); P becomes the A operand of P·V ----
    u32 pa[kMT][kNT / 2][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mt][n][0], s[mt][n][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mt][n][2], s[mt][n][3]));
      }
      float m_use[2], alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        if constexpr (kScaleLate) mx[r] *= scale_log2;  // scale_log2 > 0 keeps the order (and -inf)
        const float m_new = fmaxf(m_r[mt][r], mx[r]);
        m_use[r] = m_new == -INFINITY ? 0.f : m_new;
        alpha[r] = ex2(m_r[mt][r] - m_use[r]);
        m_r[mt][r] = m_new;
        l_r[mt][r] *= alpha[r];
      }
      // rescale O only when some row's max grew (warp-uniform branch; alpha == 1 is a no-op)
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int i = 0; i < kDT; ++i) {
          o[mt][i][0] *= alpha[0];
          o[mt][i][1] *= alpha[0];
          o[mt][i][2] *= alpha[1];
          o[mt][i][3] *= alpha[1];
        }
      }
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        float p[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float mu = m_use[e >> 1];
          p[e] = kScaleLate ? ex2(fmaf(s[mt][n][e], scale_log2, -mu)) : ex2(s[mt][n][e] - mu);
        }
        l_r[mt][0] += p[0] + p[1];
        l_r[mt][1] += p[2] + p[3];
        pa[mt][n >> 1][(n & 1) * 2 + 0] = Mma<T>::pack(p[0], p[1]);
        pa[mt][n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(p[2], p[3]);
      }
    }

    cp_async_wait<1>();
    __syncthreads();  // V[kb] visible
    if (kb > 0) load_kv(1, kb - 1, sV + (buf ^ 1) * BN * kStride);
    cp_async_commit();

    // ---- O += P·V; each V fragment feeds kMT MMAs ----
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        u32 b[4];
        ldsm_x4_t(b, smem_u32(v_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + dp * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Mma<T>::run(o[mt][2 * dp], pa[mt][kk], b[0], b[1]);
          Mma<T>::run(o[mt][2 * dp + 1], pa[mt][kk], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: normalise, stage through this warp's rows of sQ, 16-byte stores ----
  __syncwarp();  // each warp reads (Q fragments) and now writes only its own rows of sQ
  T* stage = sQ + wrow0 * kStride;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_r[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const bool any = l > 0.f;
      inv[r] = any ? v_scale / l : 0.f;
      const int row = m0 + wrow0 + mt * 16 + g + 8 * r;
      if (t4 == 0 && row < new_len)
        lse[(i64)(tok0 + row) * num_heads + h] = any ? (m_r[mt][r] + log2f(l)) * kLn2 : -INFINITY;
    }
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      const int col = i * 8 + 2 * t4;
      T* r0 = stage + (mt * 16 + g) * kStride + col;
      *reinterpret_cast<u32*>(r0) = Mma<T>::pack(o[mt][i][0] * inv[0], o[mt][i][1] * inv[0]);
      *reinterpret_cast<u32*>(r0 + 8 * kStride) = Mma<T>::pack(o[mt][i][2] * inv[1], o[mt][i][3] * inv[1]);
    }
  }
  __syncwarp();
  for (int c = lane; c < kWarpRows * kChunks; c += 32) {
    const int r = c / kChunks, ch = c % kChunks;
    const int row = m0 + wrow0 + r;
    if (row < new_len)
      *reinterpret_cast<uint4*>(out + (i64)(tok0 + row) * out_stride + h * D + ch * 8) =
          *reinterpret_cast<const uint4*>(stage + r * kStride + ch * 8);
  }
}

}  // namespace tp
