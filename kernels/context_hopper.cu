// Hopper (sm_90a) context (prefill) attention: wgmma + TMA + warp specialisation.
//
// Serves what capabilities.CAPABILITIES["context_hopper"] lists (fp16/bf16; D 64 and 128; causal
// or padding mask; no position bias; contiguous fp16/bf16 cache; GQA/MQA by head mapping; cached
// past allowed); every other case stays on kernels/context_attention.cu (mma.sync). Same
// semantics as that kernel: out [T, H, D] and lse [T, H] (natural log, -inf for a row with no
// key) at the rows of the tiles' sequences only.
//
// Grid (num_heads, num_tiles): one CTA per (128-query-row tile, head); the tile list comes from
// cuda_plan.context_tiles, heaviest causal work first. CTA = 3 warpgroups (384 threads, 1 per SM):
//   WG0 producer: gives its registers away (setmaxnreg.dec 24); one thread issues the TMA loads:
//       the Q tile once, then each K/V block of BN keys into a 2-stage ring (full barriers carry
//       the TMA byte counts, empty barriers the consumers' releases).
//   WG1, WG2 consumers (setmaxnreg.inc 240): 64 query rows each. Per K/V block:
//       S = Q·Kᵀ (SS wgmma, D/16 k steps), mask + online softmax in registers (log2 domain),
//       P packed to fp16/bf16 in registers = the A operand of O += P·V (RS wgmma, V MN-major).
// This first version is correct-first: the softmax of block j does not yet overlap the wgmma of
// block j+1, and the two consumers do not ping-pong (kernels/NOTES_context.md, "Hopper kernel").
//
// Shared memory (dynamic, aligned up to 1024 bytes in the kernel; layouts of kernels/hopper.cuh):
//   sQ [2 consumers][D/64][64 rows][128 B]      128·D·2 bytes
//   sK [2 stages][D/64][BN rows][128 B]         2·BN·D·2
//   sV [2 stages][D/64][BN rows][128 B]         2·BN·D·2
//   barriers: q_full, k_full[2], v_full[2], kv_empty[2]
// Tensor maps (tp_runtime/backends/cuda_context_hopper.py):
//   map_q  over q  [T, H, D] as 3-D {D, H, T}, box {64, 1, 64}: one consumer's 64 rows of one head
//   map_kv over the contiguous cache [B, 2, KV, S_max, D] as 3-D {D, S_max, B·2·KV}, box {64, BN, 1}
// Keys past n_keys inside the last block hold whatever the cache holds there (possibly NaN): their
// scores are replaced by -inf and their V rows zeroed in shared memory before P·V.
#include "common.cuh"
#include "hopper.cuh"

namespace tp {

struct HopperMaskCausal {
  static constexpr bool kCausal = true;
};
struct HopperMaskPadding {
  static constexpr bool kCausal = false;
};

template <typename T, int D, typename Mask>
__global__ void __launch_bounds__(384, 1) context_hopper_kernel(
    const __grid_constant__ hopper::TensorMap map_q, const __grid_constant__ hopper::TensorMap map_kv,
    T* __restrict__ out, int out_stride, float* __restrict__ lse, const int* __restrict__ tiles,
    const int* __restrict__ cu_seqlens, const int* __restrict__ past, const int* __restrict__ n_keys,
    const int* __restrict__ slots, int num_heads, int num_kv_heads, float scale_log2) {
#if TP_HOPPER_ENABLED
  using namespace hopper;
  constexpr int BN = 128;          // keys per K/V block
  constexpr int kChunks = D / 64;  // 64-element (128-byte) column tiles per row
  constexpr int kQBytes = 64 * D * 2;        // one consumer's Q rows
  constexpr int kKVBytes = BN * D * 2;       // one K or V block
  constexpr float kLn2 = 0.6931471805599453f;
  static_assert(D == 64 || D == 128, "the Hopper context kernel serves D 64 and 128");

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* sQ = align_smem(smem_raw);
  unsigned char* sK = sQ + 2 * kQBytes;
  unsigned char* sV = sK + 2 * kKVBytes;
  u64* bars = reinterpret_cast<u64*>(sV + 2 * kKVBytes);
  u64* q_full = bars;
  u64* k_full = bars + 1;    // [2]
  u64* v_full = bars + 3;    // [2]
  u64* kv_empty = bars + 5;  // [2]

  const int h = blockIdx.x;
  const int seq = tiles[2 * blockIdx.y], m0 = tiles[2 * blockIdx.y + 1];
  const int tok0 = cu_seqlens[seq];
  const int new_len = cu_seqlens[seq + 1] - tok0;
  const int qpos0 = past[seq] + m0;
  const int nk = n_keys[seq];
  const int kvh = h / (num_heads / num_kv_heads);
  const int rows = min(128, new_len - m0);
  const int k_end = Mask::kCausal ? min(nk, qpos0 + rows) : nk;  // keys any row of the tile may see
  const int n_kb = k_end > 0 ? (k_end + BN - 1) / BN : 0;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < 2; ++s) {
      mbar_init(&k_full[s], 1);
      mbar_init(&v_full[s], 1);
      mbar_init(&kv_empty[s], 256);  // every consumer thread releases after its P·V has retired
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {  // ---------------------------------------------------------------- producer
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      tma_prefetch_map(&map_q);
      tma_prefetch_map(&map_kv);
      mbar_arrive_expect_tx(q_full, 2 * kQBytes);
      for (int c = 0; c < 2; ++c) {
        for (int k = 0; k < kChunks; ++k) {
          tma_load_3d(sQ + c * kQBytes + k * 64 * 128, &map_q, q_full, 64 * k, h, tok0 + m0 + 64 * c);
        }
      }
      const int k_plane = (slots[seq] * 2) * num_kv_heads + kvh;  // (slot, K, head) row block
      const int v_plane = k_plane + num_kv_heads;                 // (slot, V, head)
      for (int j = 0; j < n_kb; ++j) {
        const int s = j & 1;
        if (j >= 2) mbar_wait(&kv_empty[s], ((j >> 1) - 1) & 1);
        mbar_arrive_expect_tx(&k_full[s], kKVBytes);
        for (int k = 0; k < kChunks; ++k) {
          tma_load_3d(sK + s * kKVBytes + k * BN * 128, &map_kv, &k_full[s], 64 * k, j * BN, k_plane);
        }
        mbar_arrive_expect_tx(&v_full[s], kKVBytes);
        for (int k = 0; k < kChunks; ++k) {
          tma_load_3d(sV + s * kKVBytes + k * BN * 128, &map_kv, &v_full[s], 64 * k, j * BN, v_plane);
        }
      }
    }
  } else {  // ----------------------------------------------------------------------- consumers
    setmaxnreg_inc<240>();
    const int cw = wg - 1;  // which 64 rows of the tile
    const int t = threadIdx.x - 128 * wg;
    const int warp = t / 32, lane = t % 32;
    const int r0 = 64 * cw + 16 * warp + lane / 4;  // this thread's rows r0 and r0 + 8 (tile rows)
    const int col = 2 * (lane % 4);                 // its first column inside each 8-column block
    const u32 q_addr = smem_addr(sQ + cw * kQBytes);

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};

    mbar_wait(q_full, 0);
    for (int j = 0; j < n_kb; ++j) {
      const int s = j & 1;
      const u32 phase = (j >> 1) & 1;
      const int n0 = j * BN;
      const u32 k_addr = smem_addr(sK + s * kKVBytes), v_addr = smem_addr(sV + s * kKVBytes);

      // S [64, BN] = Q · K_jᵀ
      float sc[BN / 2];
      mbar_wait(&k_full[s], phase);
      fence_operands(sc);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        Wgmma<BN, T>::ss(sc, desc_k_major(q_addr, 64, k), desc_k_major(k_addr, BN, k), k > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(sc);

      // mask, scale (log2 domain), online softmax; each row lives in the 4 threads of a quad
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) {
        const int r = (i >> 1) & 1;
        const int key = n0 + 8 * (i >> 2) + col + (i & 1);
        const bool ok = key < nk && (!Mask::kCausal || key <= qpos0 + r0 + 8 * r);
        sc[i] = ok ? sc[i] * scale_log2 : -INFINITY;
        mx[r] = fmaxf(mx[r], sc[i]);
      }
      float alpha[2], base[2], sum[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float m_new = fmaxf(m_r[r], mx[r]);
        base[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key so far: exp2(-inf) = 0
        alpha[r] = exp2f(m_r[r] - base[r]);
        m_r[r] = m_new;
      }
      u32 pa[BN / 16][4];
#pragma unroll
      for (int i = 0; i < BN / 2; i += 2) {
        const int r = (i >> 1) & 1;
        const float p0 = exp2f(sc[i] - base[r]), p1 = exp2f(sc[i + 1] - base[r]);
        sum[r] += p0 + p1;
        pa[i >> 3][(i >> 1) & 3] = pack2<T>(p0, p1);  // accumulators of cols 16k.. = A fragment of k step k
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
        l_r[r] = l_r[r] * alpha[r] + sum[r];
      }
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];

      // O [64, D] += P · V_j
      mbar_wait(&v_full[s], phase);
      if (n0 + BN > nk) {  // zero the V rows of keys past n_keys (cache contents there are arbitrary)
        const int first = max(nk - n0, 0);
        for (int i = t; i < (BN - first) * kChunks * 8; i += 128) {
          const int row = first + i / (kChunks * 8), rest = i % (kChunks * 8);
          *reinterpret_cast<uint4*>(sV + s * kKVBytes + (rest / 8) * BN * 128 + row * 128 + (rest % 8) * 16) =
              make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async();
        named_barrier_sync(1 + cw, 128);
      }
      fence_operands(o);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < BN / 16; ++k) {
        Wgmma<D, T>::template rs<1>(o, pa[k], desc_mn_major(v_addr, BN, k), 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(o);
      mbar_arrive(&kv_empty[s]);
    }

    // epilogue: O / l, rows of this sequence only
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = r0 + 8 * r;
      if (row >= rows) continue;
      const long long tok = tok0 + m0 + row;
      const float inv = l_r[r] > 0.f ? 1.f / l_r[r] : 0.f;
      T* dst = out + tok * out_stride + (long long)h * D;
#pragma unroll
      for (int jb = 0; jb < D / 8; ++jb) {
        Convert<T>::store2(dst + 8 * jb + col, make_float2(o[4 * jb + 2 * r] * inv, o[4 * jb + 2 * r + 1] * inv));
      }
      if (lse != nullptr && (lane % 4) == 0) {
        lse[tok * num_heads + h] = l_r[r] > 0.f ? (m_r[r] + log2f(l_r[r])) * kLn2 : -INFINITY;
      }
    }
  }
#endif
}

}  // namespace tp
