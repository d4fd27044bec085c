// Hopper (sm_90a) context (prefill) attention: wgmma + TMA + warp specialisation.
//
// Serves what capabilities.CAPABILITIES["context_hopper"] lists (fp16/bf16; D 64, 128 and 256;
// causal, padding or bidirectional mask; no bias, ALiBi or a relative (T5) table; contiguous or
// paged (pages >= 8 tokens) fp16/bf16 cache; GQA/MQA by head mapping; cached past allowed); every
// other case (D 80/96, int8/fp8 caches, cross attention, beams) stays on
// kernels/context_attention.cu (mma.sync). Same
// semantics as that kernel: out [T, H, D] and lse [T, H] (natural log, -inf for a row with no
// key) at the rows of the tiles' sequences only.
//
// Work item = (query tile of 64·C rows, head), C consumer warpgroups (HopperConsumers: 3 at D 64
// without a position bias, else 2); the tile list comes from cuda_plan.context_tiles, heaviest causal
// work first, items numbered head-major at D 128 (concurrent CTAs share a head's K/V in L2). Grid:
// causal D 128 persistent (at most one CTA per SM, one item per round in snake order, the next
// item's Q and first K/V blocks loading while the consumers finish the current one); otherwise one
// CTA per item (D 64/256 tile-major, heaviest first; full-mask D 128 head-major). CTA = 1 + C
// warpgroups (384 or 512 threads, 1 CTA per SM):
//   WG0 producer: gives its registers away (setmaxnreg.dec 24, 32 with 3 consumers); one warp:
//       lane 0 issues the TMA loads, the lanes read a paged cache's block table one block ahead
//       (pages of at most 32 tokens at D <= 128: all 128 threads gather K/V with cp.async):
//       per item the Q tile (once the consumers' last S of the previous item has retired:
//       q_empty), then each K/V block of BN keys (128; 64 at D 256) into a 2-stage ring that runs
//       on across items
//       (full barriers carry the TMA byte counts, empty barriers the consumers' releases).
//   WG1 .. WGC consumers (setmaxnreg.inc 240 / 160): 64 query rows each. Per K/V block:
//       S = Q·Kᵀ (SS wgmma, D/16 k steps), bias + mask + online softmax in registers (log2
//       domain), P packed to fp16/bf16 in registers = the A operand of O += P·V (RS wgmma, V
//       MN-major; two N = 128 halves at D 256).
// Overlap (FA3's two levels; kernels/NOTES_context.md, "Hopper kernel", round 2):
//   - inside a consumer: S_j = Q·K_jᵀ and O += P_{j-1}·V_{j-1} are issued together; the softmax of
//     block j runs while P_{j-1}·V_{j-1} is still on the tensor cores (wgmma wait<1>, then wait<0>
//     before O is rescaled and P_j packed);
//   - between the consumers (ping-pong): each issues its wgmma groups only in its turn (named
//     barriers, round robin), so one consumer's softmax overlaps the others' GEMMs.
// K and V have their own full/empty barriers: K_j is released as soon as S_j has retired, V_j when
// P_j·V_j has, so the producer refills each half of a stage as early as possible.
// Key blocks wholly inside every row's visible range skip the mask (only the blocks at the causal
// diagonal and the one holding n_keys are masked).
//
// Shared memory (dynamic, aligned up to 1024 bytes in the kernel; layouts of kernels/hopper.cuh):
//   sQ [C consumers][D/64][64 rows][128 B]      64·C·D·2 bytes
//   sK [2 stages][D/64][BN rows][128 B]         2·BN·D·2
//   sV [2 stages][D/64][BN rows][128 B]         2·BN·D·2
//   sO [C consumers][64 rows][D·2 B]            64·C·D·2 (the epilogue's staging: the next Q loads
//                                               meanwhile; none at D 256, which stages in its Q tile)
//   D 256: Q 64 KB + K/V 2 · 2 · 32 KB = 192 KB; D 128: 32 + 128 + 32 = 192 KB; D 64: 24 + 64 + 24 KB
//   (16 + 64 + 16 with a position bias: 2 consumers)
//   barriers: q_full, q_empty, k_full[2], v_full[2], k_empty[2], v_empty[2]
// Tensor maps (tp_runtime/backends/cuda_context_hopper.py):
//   map_q  over q  [T, H, D] as 3-D {D, H, T}, box {64, 1, 64}: one consumer's 64 rows of one head
//   map_kv over the contiguous cache [B, 2, KV, S_max, D] as 3-D {D, S_max, B·2·KV}, box {64, BN, 1},
//          or the paged pool [N, 2, KV, P, D] as {D, P, N·2·KV}, box {64, min(P, BN), 1} (P >= 8;
//          not used for K/V when the producer gathers)
// Keys past n_keys inside the last block hold whatever the cache holds there (possibly NaN; the
// gather copies the last key there instead): their scores are replaced by -inf and their V rows
// zeroed in shared memory before P·V.
#include "common.cuh"
#include "hopper.cuh"

namespace tp {

struct HopperMaskCausal {
  static constexpr bool kCausal = true, kBidirectional = false;
};
struct HopperMaskPadding {
  static constexpr bool kCausal = false, kBidirectional = false;
};
struct HopperMaskBidirectional {  // ChatGLM-6B: as padding, -10000 on the last key for every earlier query
  static constexpr bool kCausal = false, kBidirectional = true;
};
struct HopperBiasNone {
  static constexpr int kind = 0;
};
struct HopperBiasAlibi {  // + slope_h · (k − q), slopes already effective (as the mma.sync kernel's)
  static constexpr int kind = 1;
};
struct HopperBiasTable {  // + table[h·sh + q·sq + k·sk + off] (explicit T5 table, or per-distance bucket table)
  static constexpr int kind = 2;
};

// The relative-bias table operand: tp_runtime/backends/cuda_common.BiasTable, entry (h, q, k) at
// table[h·head_stride + q·q_stride + k·k_stride + offset] (element offsets below 2^31: the launcher
// checks), and raw_scale = 1 / softmax_scale (entries are added to raw scores).
struct HopperTable {
  const float* __restrict__ table;
  int head_stride, q_stride, k_stride, offset;
  float raw_scale;
};
// the layout cuda_context_hopper._TABLE_ARG writes (the numpy bytes become this parameter)
static_assert(sizeof(HopperTable) == 32 && alignof(HopperTable) == 8, "HopperTable: 32 bytes, 8-aligned");
static_assert(__builtin_offsetof(HopperTable, head_stride) == 8 && __builtin_offsetof(HopperTable, offset) == 20 &&
                  __builtin_offsetof(HopperTable, raw_scale) == 24,
              "HopperTable: field offsets of cuda_context_hopper._TABLE_ARG");

// S [64, BN] (accumulate 0 on the first k step) = Q [64, D] · K_jᵀ, both K-major 128B-swizzled.
template <typename T, int D, int BN>
__device__ __forceinline__ void issue_s(float (&sc)[BN / 2], hopper::u32 q_addr, hopper::u32 k_addr) {
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
    hopper::Wgmma<BN, T>::ss(sc, hopper::desc_k_major(q_addr, 64, k), hopper::desc_k_major(k_addr, BN, k), k > 0);
  }
}

// O [64, D] += P [64, BN] (registers) · V_j [BN, D] (MN-major 128B-swizzled). D 256 as two
// m64n128 halves over D columns [0, 128) and [128, 256): half h's accumulators are o[64h ..
// 64h + 63], the same registers an m64n256 accumulator would use for those columns, so the rest of
// the kernel indexes o the same way for every D; its V columns start 2 column tiles (2·BN·128 B) on.
template <typename T, int D, int BN>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const hopper::u32 (&pa)[BN / 16][4],
                                         hopper::u32 v_addr) {
  constexpr int kN = D < 128 ? D : 128;  // wgmma N per instruction
#pragma unroll
  for (int k = 0; k < BN / 16; ++k) {
    if constexpr (D == kN) {
      hopper::Wgmma<D, T>::template rs<1>(o, pa[k], hopper::desc_mn_major(v_addr, BN, k), 1);
    } else {
#pragma unroll
      for (int h = 0; h < D / kN; ++h) {
        float(&oh)[kN / 2] = *reinterpret_cast<float(*)[kN / 2]>(o + h * (kN / 2));
        hopper::Wgmma<kN, T>::template rs<1>(oh, pa[k], hopper::desc_mn_major(v_addr + h * 2 * BN * 128, BN, k), 1);
      }
    }
  }
}

[[maybe_unused]] constexpr float kBidirectionalMask = -10000.0f;  // reference.BIDIRECTIONAL_MASK_VALUE (natural-log units)

template <bool B>
struct BoolTag {  // a compile-time flag for a generic lambda (NVRTC has no <type_traits>)
  static constexpr bool value = B;
};

// Where a thread's scores sit and what it adds/hides: rows r0 + 8r at query positions qpos[r]
// (keys key < lim[r] visible), its first column col in each 8-column block, and in raw-score units
// (divided by softmax_scale, as the running max) the ALiBi slope (0 without ALiBi). With a table
// bias: the element offset of the row's entries, key k's at trow[r] + min(k, lim[r] - 1) · k_stride
// (keys past the row's limit read a valid entry and are masked anyway). The table's pointer,
// strides and factor stay in the kernel's parameters (constant bank: no registers; D 64 has none
// to spare).
struct RowInfo {
  int qpos[2];
  int lim[2];
  int col;
  float slope_raw;
  int trow[2];
};

// Online softmax of one key block, in place: raw scores sc -> unnormalised probabilities
// exp2(s·scale_log2 - m·scale_log2) (one FFMA + EX2 per element; the running max m_r is kept in raw
// score units, which needs scale_log2 > 0 — the launcher's `serves` checks it). First, in raw
// units: kBias 1 adds ALiBi's slope·(key - qpos), kBias 2 the table's entry. kMasked: keys
// `key >= lim[r]` (past n_keys, or past the row's causal limit) become -inf, and with kBidir
// (lim[r] = n_keys) the last key gets -10000 / softmax_scale for the rows before it; the blocks
// wholly visible to every row (and before the bidirectional column) skip that. Returns alpha[r] = exp2((m_old - m_new)·scale_log2), the factor O must be
// rescaled by; l_r is updated.
template <bool kMasked, bool kBidir, int kBias, int BN>
__device__ __forceinline__ void softmax_block(float (&sc)[BN / 2], float (&m_r)[2], float (&l_r)[2],
                                              float (&alpha)[2], int n0, const RowInfo& ri, float scale_log2,
                                              const HopperTable& tab) {
  float rel0[2];  // key - qpos of the thread's first column in this block, per row
#pragma unroll
  for (int r = 0; r < 2; ++r) rel0[r] = static_cast<float>(n0 + ri.col - ri.qpos[r]);
  // element i: row (i >> 1) & 1, so chains c = i & 3 are rows c >> 1 (four independent chains)
  if (kBias == 2) {
    // the table's entries, 16 loads at a time: the compiler barrier between groups keeps it from
    // hoisting all BN / 2 loads ahead (their registers on top of S, O and P spill at D 64)
#pragma unroll
    for (int g = 0; g < BN / 2; g += 16) {
#pragma unroll
      for (int i = g; i < g + 16; ++i) {
        const int r = (i >> 1) & 1, key = n0 + ri.col + 8 * (i >> 2) + (i & 1);
        sc[i] = fmaf(tab.raw_scale, __ldg(tab.table + ri.trow[r] + min(key, ri.lim[r] - 1) * tab.k_stride), sc[i]);
      }
      asm volatile("" ::: "memory");
    }
  }
  float mx4[4] = {m_r[0], m_r[0], m_r[1], m_r[1]};
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    const int r = (i >> 1) & 1;
    const int dk = 8 * (i >> 2) + (i & 1);  // key - (n0 + col), a compile-time constant
    const int key = n0 + ri.col + dk;
    if (kBias == 1) sc[i] = fmaf(ri.slope_raw, rel0[r] + static_cast<float>(dk), sc[i]);
    if (kMasked) {
      if (kBidir && key == ri.lim[r] - 1 && ri.qpos[r] < key) sc[i] = fmaf(kBidirectionalMask, tab.raw_scale, sc[i]);
      sc[i] = key < ri.lim[r] ? sc[i] : -INFINITY;
    }
    mx4[i & 3] = fmaxf(mx4[i & 3], sc[i]);
  }
  float mx[2] = {fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3])}, base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // each row lives in the 4 threads of a quad
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    base[r] = mx[r] == -INFINITY ? 0.f : mx[r] * scale_log2;  // a row with no key so far: exp2(-inf) = 0
    alpha[r] = exp2f(m_r[r] * scale_log2 - base[r]);
    m_r[r] = mx[r];
  }
  float sum4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    sc[i] = exp2f(fmaf(sc[i], scale_log2, -base[(i >> 1) & 1]));
    sum4[i & 3] += sc[i];
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the quad's partial sums are added once, at the end (l_r)
    l_r[r] = l_r[r] * alpha[r] + (sum4[2 * r] + sum4[2 * r + 1]);
  }
}

// After P_{j-1}·V_{j-1} has retired: O *= alpha (the new max), P_j packed to T = the A operand of
// its P·V (the accumulators of columns 16k.. are the A fragment of k step k).
template <typename T, int D, int BN>
__device__ __forceinline__ void rescale_pack(float (&o)[D / 2], hopper::u32 (&pa)[BN / 16][4],
                                             const float (&sc)[BN / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
#pragma unroll
  for (int i = 0; i < BN / 2; i += 2) pa[i >> 3][(i >> 1) & 3] = hopper::pack2<T>(sc[i], sc[i + 1]);
}

// One uniform branch per block (the mask depends only on the block index).
template <typename Mask, typename Bias, int BN>
__device__ __forceinline__ void softmax_any(bool masked, float (&sc)[BN / 2], float (&m_r)[2], float (&l_r)[2],
                                            float (&alpha)[2], int n0, const RowInfo& ri, float scale_log2,
                                            const HopperTable& tab) {
  if (masked) {
    softmax_block<true, Mask::kBidirectional, Bias::kind, BN>(sc, m_r, l_r, alpha, n0, ri, scale_log2, tab);
  } else {
    softmax_block<false, false, Bias::kind, BN>(sc, m_r, l_r, alpha, n0, ri, scale_log2, tab);
  }
}

// Consumer warpgroups (64 query rows each) per CTA: 3 at D 64, where the softmax of a 64×128 block
// takes longer than its two GEMMs, so a third warpgroup's softmax is needed to keep the tensor
// cores busy (and its registers fit: o 32 + S 64 + P 32 at 160 per thread); 2 at D 128 and 256
// (240 each: D 256 holds o 128 + S 32 + P 16), and 2 at D 64 with a position bias too (ALiBi's
// and the table's per-score terms need registers: at 160, ptxas spilled 20-300 bytes).
// Keys per K/V block kBN: 128, or 64 at D 256, where a 128-key block of K or V alone is 64 KB (two
// stages of K and V at BN 64 and the Q tiles: 192 KB of the 227 KB an SM has).
template <int D, int kBias>
struct HopperConsumers {
  static constexpr int kCount = D == 64 && kBias == 0 ? 3 : 2;
  // Registers per thread after setmaxnreg: the CTA keeps the pool it was launched with
  // (__launch_bounds__: 168 · 384 = 64512 threads·registers with 2 consumers, 128 · 512 = 65536
  // with 3), so producer · 128 + kRegs · 128 · kCount must fit it exactly or less: 24 + 2 · 240
  // and 32 + 3 · 160. (32 + 2 · 240 exceeds 64512: setmaxnreg.inc then waits forever.)
  static constexpr int kRegs = kCount == 3 ? 160 : 240;
  static constexpr int kProducerRegs = kCount == 3 ? 32 : 24;
  static constexpr int kBN = D == 256 ? 64 : 128;
  // The D 128 variants may loop over work items (persistent grid; the launcher decides the grid:
  // causal masks only) and stage the epilogue in a tile of its own (the next item's Q loads
  // meanwhile). At D 64 the loop's counters do not fit in 160 registers next to o, S and P (ptxas
  // spills them into the key loop); at D 256 the extra staging tile does not fit in shared memory.
  // There each CTA serves one item (the launcher's grid has one CTA per item) and the epilogue
  // stages O in the consumer's own Q tile, free once its last S has retired.
  static constexpr bool kPersistent = D == 128;
  static constexpr bool kOwnStaging = D != 256;  // (at D 64 staging in sQ made ptxas spill)
};

// One work item: a (query tile, head), and what the producer and the consumers derive from it
// (both compute it, from the same loads). Item w: persistent grid (D 128), head-major — head
// w / num_tiles, tile w % num_tiles — so the CTAs running at the same time mostly read the K/V of
// the same head (kept in L2 for all its tiles; also when a full mask launches one CTA per item);
// D 64 and 256 (one item per CTA), tile-major — tile w / num_heads, head w % num_heads — so the
// hardware starts the heaviest tiles first.
struct HopperTile {
  int h, seq, m0, tok0, qpos0, nk, kvh, rows;
  int n_kb;    // K/V blocks of BN keys any row of the tile may see
  int n_open;  // blocks [0, n_open) are visible to every row of the tile in full: no mask
};

template <typename Cfg, typename Mask>
__device__ __forceinline__ HopperTile hopper_tile(int w, const int* __restrict__ tiles,
                                                  const int* __restrict__ cu_seqlens, const int* __restrict__ past,
                                                  const int* __restrict__ n_keys, int num_tiles, int num_heads,
                                                  int num_kv_heads) {
  constexpr int BN = Cfg::kBN, kRows = 64 * Cfg::kCount;
  HopperTile tl;
  int tile;
  if (Cfg::kPersistent) {
    tl.h = w / num_tiles;
    tile = w - tl.h * num_tiles;
  } else {
    tile = w / num_heads;
    tl.h = w - tile * num_heads;
  }
  tl.seq = tiles[2 * tile];
  tl.m0 = tiles[2 * tile + 1];
  tl.tok0 = cu_seqlens[tl.seq];
  tl.qpos0 = past[tl.seq] + tl.m0;
  tl.nk = n_keys[tl.seq];
  tl.kvh = tl.h / (num_heads / num_kv_heads);
  tl.rows = min(kRows, cu_seqlens[tl.seq + 1] - tl.tok0 - tl.m0);
  const int k_end = Mask::kCausal ? min(tl.nk, tl.qpos0 + tl.rows) : tl.nk;  // keys any row of the tile may see
  tl.n_kb = k_end > 0 ? (k_end + BN - 1) / BN : 0;
  // (bidirectional: the block holding the last key is masked, it carries that key's -10000)
  tl.n_open = (Mask::kCausal ? min(tl.nk, tl.qpos0 + 1) : tl.nk - (Mask::kBidirectional ? 1 : 0)) / BN;
  return tl;
}

// This CTA's item in round r of a persistent grid, or -1 (the last round has fewer items than
// CTAs): round r serves items r·G .. r·G + G - 1 (G = gridDim.x), CTA b taking the b-th of them
// in even rounds and the (G - 1 - b)-th in odd ones — a snake order: with the items of a head
// heaviest first, a CTA that drew a heavy item in one round draws a light one in the next.
// One item per CTA (gridDim.x = items): item blockIdx.x.
template <typename Cfg>
__device__ __forceinline__ int hopper_item(int r, int n_items) {
  const int g = static_cast<int>(gridDim.x), b = static_cast<int>(blockIdx.x);
  const int w = r * g + (Cfg::kPersistent && (r & 1) ? g - 1 - b : b);
  return w < n_items ? w : -1;
}

template <typename T, int D, typename Mask, typename Bias>
__global__ void __launch_bounds__(128 * (HopperConsumers<D, Bias::kind>::kCount + 1), 1) context_hopper_kernel(
    const __grid_constant__ hopper::TensorMap map_q, const __grid_constant__ hopper::TensorMap map_kv,
    T* __restrict__ out, int out_stride, float* __restrict__ lse, const int* __restrict__ tiles,
    const int* __restrict__ cu_seqlens, const int* __restrict__ past, const int* __restrict__ n_keys,
    const int* __restrict__ slots, const int* __restrict__ block_table, int table_stride, int kv_box,
    int log2_page, int num_tiles, int num_heads, int num_kv_heads, float scale_log2, const float* __restrict__ alibi,
    HopperTable bias_table, const T* __restrict__ kv_pool, int gather) {
#if TP_HOPPER_ENABLED
  using namespace hopper;
  using Cfg = HopperConsumers<D, Bias::kind>;
  constexpr int BN = Cfg::kBN;  // keys per K/V block
  constexpr int kChunks = D / 64;  // 64-element (128-byte) column tiles per row
  constexpr int kQBytes = 64 * D * 2;        // one consumer's Q rows
  constexpr int kKVBytes = BN * D * 2;       // one K or V block
  constexpr int kC = Cfg::kCount;
  // Named barriers (0 is __syncthreads): 1 consumer 0's V zeroing; kTurnBar + c consumer c's turn
  // to issue wgmma (128 waiting + 128 arriving); kEpilogueBar + c consumer c's epilogue tile.
  constexpr int kZeroBar = 1, kTurnBar = 2, kEpilogueBar = kTurnBar + kC;
  static_assert(kEpilogueBar + kC <= 16, "16 named barriers per CTA");
  constexpr float kLn2 = 0.6931471805599453f;
  static_assert(D == 64 || D == 128 || D == 256, "the Hopper context kernel serves D 64, 128 and 256");
  constexpr bool kOwnStaging = Cfg::kOwnStaging;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* sQ = align_smem(smem_raw);
  unsigned char* sK = sQ + kC * kQBytes;
  unsigned char* sV = sK + 2 * kKVBytes;
  // [kC][64 rows][D·2 bytes]: the epilogue's staging, a tile of its own or the consumer's Q tile
  unsigned char* sO = kOwnStaging ? sV + 2 * kKVBytes : sQ;
  u64* bars = reinterpret_cast<u64*>(sV + 2 * kKVBytes + (kOwnStaging ? kC * kQBytes : 0));
  u64* q_full = bars;
  u64* q_empty = bars + 1;  // every consumer thread: its last S of the tile has retired
  u64* k_full = bars + 2;   // [2]
  u64* v_full = bars + 4;   // [2]
  u64* k_empty = bars + 6;  // [2]
  u64* v_empty = bars + 8;  // [2]

  // Persistent grid: CTA b serves one item per round (hopper_item: snake order over head-major
  // items). The K/V ring's position `it` and the Q buffer's phase `ti` run on across items, so
  // the producer loads item i+1's Q and first K/V blocks while the consumers still finish item i
  // (its last P·V, its epilogue). gridDim.x = items: one item per CTA.
  const int n_items = num_tiles * num_heads;
  auto tile_of = [&](int w) {
    return hopper_tile<Cfg, Mask>(w, tiles, cu_seqlens, past, n_keys, num_tiles, num_heads, num_kv_heads);
  };
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    mbar_init(q_empty, 128 * kC);
    for (int s = 0; s < 2; ++s) {  // full: the TMA leader's one arrival, or every producer thread's (gather)
      mbar_init(&k_full[s], gather ? 128 : 1);
      mbar_init(&v_full[s], gather ? 128 : 1);
      mbar_init(&k_empty[s], 128 * kC);  // every consumer thread releases K_j once its S_j has retired
      mbar_init(&v_empty[s], 128 * kC);  // ... and V_j once its P_j·V_j has
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {  // ---------------------------------------------------------------- producer
    setmaxnreg_dec<Cfg::kProducerRegs>();
    // TMA: one warp (lane 0 issues the loads, the lanes read the block table ahead); gather (small
    // pages): the whole warpgroup copies with cp.async
    // The producer's loop, specialised for gathering or not (kGather): one loop holding both paths
    // needed more than the producer's registers (ptxas spilled its item state).
    auto produce = [&](auto gather_tag) {
      constexpr bool kGather = decltype(gather_tag)::value;
      const int lane = threadIdx.x;  // (0..127 when gathering)
      const bool leader = lane == 0;
      if (leader) {
        tma_prefetch_map(&map_q);
        tma_prefetch_map(&map_kv);
      }
      int it = 0, ti = 0;  // ring position of the item's first K/V block; items served
      for (int rd = 0; rd * static_cast<int>(gridDim.x) < n_items; ++rd) {
        const int w = hopper_item<Cfg>(rd, n_items);
        if (w < 0) break;  // (only in the last round)
        const HopperTile tl = tile_of(w);
        if (ti > 0) mbar_wait(q_empty, (ti - 1) & 1);  // the previous item's last S has retired
        if (leader) {
          mbar_arrive_expect_tx(q_full, kC * kQBytes);
          for (int c = 0; c < kC; ++c) {
            for (int k = 0; k < kChunks; ++k) {
              tma_load_3d(sQ + c * kQBytes + k * 64 * 128, &map_q, q_full, 64 * k, tl.h, tl.tok0 + tl.m0 + 64 * c);
            }
          }
        }
        // A K/V block of BN keys = BN / kv_box boxes of kv_box rows each, box r landing at row r
        // of the tile (kv_box >= 8 rows = whole 1024-byte swizzle atoms, so the layout is the same
        // as one box's). Contiguous: one box, plane (slot, K|V, head), row = position. Paged: one
        // box per page (or per BN rows of a page larger than BN), plane (page, K|V, head) with the
        // page from the block table, row = position inside the page. Positions past n_keys (inside
        // the last block only) read the sequence's last page: finite data the mask and the V
        // zeroing discard, and never a table entry the sequence does not own.
        // Lane i holds the page of box i of a block (BN / kv_box <= 16 boxes), read one block
        // ahead: the table's latency overlaps the waits and loads of the block before, and the K
        // and V loads of a block share one read (16-token pages: 8 boxes per block).
        const int slot = slots[tl.seq];
        const int* table_row = block_table != nullptr ? block_table + (long long)slot * table_stride : nullptr;
        auto page_of_box = [&](int j) {
          if (table_row == nullptr || kGather || lane * kv_box >= BN) return slot;
          return __ldg(table_row + (min(j * BN + lane * kv_box, tl.nk - 1) >> log2_page));
        };
        auto tile_load = [&](unsigned char* dst, u64* bar, int j, int kv, int page) {
          for (int r = 0; r < BN; r += kv_box) {
            const int pos = j * BN + r;
            const int plane = (__shfl_sync(0xffffffffu, page, r / kv_box) * 2 + kv) * num_kv_heads + tl.kvh;
            const int row = table_row != nullptr ? pos & ((1 << log2_page) - 1) : pos;
            if (leader) {
              for (int k = 0; k < kChunks; ++k) {
                tma_load_3d(dst + k * BN * 128 + r * 128, &map_kv, bar, 64 * k, row, plane);
              }
            }
          }
        };
        // Gather (pages of at most GATHER_MAX_PAGE tokens at D <= 128, cuda_context_hopper.gathers:
        // one TMA box per page was too small to keep up): the 128 producer threads copy the block
        // with cp.async in 16-byte pieces, consecutive threads along a row (coalesced; a thread
        // keeps its column c), written in the 128-byte-swizzled layout a TMA box would have
        // produced. The block's pages (BN / P <= 16) are read once, lane q of each warp holding the
        // q-th, and handed to the rows by shuffle: a table read per piece, each waiting on L2 with
        // the producer's few registers, ran slower than the TMA boxes (kernels/NOTES_context.md).
        // Each thread's copies arrive on the full barrier (count 128) as they land.
        auto gather_load = [&](unsigned char* dst, u64* bar, int j, int kv) {
          constexpr int kRowChunks = D / 8;               // 16-byte pieces per row
          constexpr int kRowsPerPass = 128 / kRowChunks;  // rows the 128 threads cover per pass
          const int page_mask = (1 << log2_page) - 1;
          const int first = (j * BN) >> log2_page;  // the block's first page (BN is a multiple of P)
          const int last = (tl.nk - 1) >> log2_page;  // the sequence's last page (never read past it)
          const int pg = __ldg(table_row + min(first + (lane & 31), last));
          const int c = lane % kRowChunks;
          const int page_stride = 2 * num_kv_heads * (page_mask + 1) * D;  // elements per page (< 2^31)
          const T* src = kv_pool + ((kv * num_kv_heads + tl.kvh) * (page_mask + 1) * D + c * 8);
          unsigned char* to = dst + (c / 8) * BN * 128 + (c % 8) * 16;  // (row r: + r·128, chunk ^ (r & 7))
#pragma unroll 4
          for (int pass = 0; pass < BN / kRowsPerPass; ++pass) {
            const int r = lane / kRowChunks + pass * kRowsPerPass;
            const int pos = min(j * BN + r, tl.nk - 1);  // (past n_keys: the last key again, discarded)
            const int page = __shfl_sync(0xffffffffu, pg, (pos >> log2_page) - first);
            cp_async_16(to + r * 128 + (((c % 8) ^ (r & 7)) - (c % 8)) * 16,
                        src + (static_cast<long long>(page) * page_stride + (pos & page_mask) * D));
          }
          cp_async_arrive_noinc(bar);
        };
        // Order K_0, K_1, V_0, K_2, V_1, ...: the consumers' order of use (S_j is issued with
        // P_{j-1}·V_{j-1}), so K_{j+1} never waits behind V_j's stage release (P·V_{j-2}).
        auto load = [&](u64* empty, u64* full, unsigned char* base, int a, int j, int kv, int page) {
          const int s = a & 1;
          if (a >= 2) mbar_wait(&empty[s], ((a >> 1) - 1) & 1);  // the release of block a - 2 (same stage)
          if (kGather) {
            gather_load(base + s * kKVBytes, &full[s], j, kv);
          } else {
            if (leader) mbar_arrive_expect_tx(&full[s], kKVBytes);
            tile_load(base + s * kKVBytes, &full[s], j, kv, page);
          }
        };
        int page = tl.n_kb > 0 ? page_of_box(0) : slot, prev = slot;  // pages of blocks j and j - 1
        for (int j = 0; j <= tl.n_kb; ++j) {
          const int next = j + 1 < tl.n_kb ? page_of_box(j + 1) : slot;
          if (j < tl.n_kb) load(k_empty, k_full, sK, it + j, j, 0, page);
          if (j > 0) load(v_empty, v_full, sV, it + j - 1, j - 1, 1, prev);
          prev = page;
          page = next;
        }
        it += tl.n_kb;
        ++ti;
        if (!Cfg::kPersistent) break;  // one item per CTA, as the consumers (whatever the grid)
      }
    };
    if (gather) {
      produce(BoolTag<true>{});
    } else if (threadIdx.x < 32) {
      produce(BoolTag<false>{});
    }
  } else {  // ----------------------------------------------------------------------- consumers
    setmaxnreg_inc<Cfg::kRegs>();
    const int cw = wg - 1;  // which 64 rows of a tile
    const int t = threadIdx.x - 128 * wg;
    const int warp = t / 32, lane = t % 32;
    const int r0 = 64 * cw + 16 * warp + lane / 4;  // this thread's rows r0 and r0 + 8 (tile rows)
    const int col = 2 * (lane % 4);                 // its first column inside each 8-column block
    const u32 q_addr = smem_addr(sQ + cw * kQBytes);

    // Ping-pong turns, round robin over the consumers and on across the CTA's items: n_kb + 1 per
    // consumer and item (S_0; S_j with P_{j-1}·V_{j-1}; the last P·V). In each, wait on this
    // consumer's barrier (its 128 threads + the previous consumer's 128 arrivals), issue, then
    // hand the turn to the next consumer. Consumer 0 goes first: the last consumer opens its
    // barrier once at the start, and consumer 0 takes that one extra arrival back with one extra
    // wait at its end, so every barrier sees as many arrivals as waits whatever the items.
    const int my_bar = kTurnBar + cw, next_bar = kTurnBar + (cw + 1) % kC;
    if (cw == kC - 1) named_barrier_arrive(next_bar, 256);
    auto turn_begin = [&]() { named_barrier_sync(my_bar, 256); };
    auto turn_end = [&]() { named_barrier_arrive(next_bar, 256); };

    // The key loop counts in ring positions a = it .. it + n_kb - 1 (stage a & 1, phase (a >> 1) & 1),
    // and the positions of the item's keys and queries are shifted by it·BN so that block a starts
    // at key a·BN: only differences and comparisons of positions are used, and the loop keeps one
    // counter fewer live (D 64 has no register to spare).
    int it = 0, ti = 0;  // ring position of the item's first K/V block; items served
    for (int rd = 0; rd * static_cast<int>(gridDim.x) < n_items; ++rd, ++ti) {
      const int w = hopper_item<Cfg>(rd, n_items);
      if (w < 0) break;  // (only in the last round)
      int a_end, open_end;  // ring position past the item's last block; past its unmasked blocks
      RowInfo ri;
      {
        const HopperTile tl = tile_of(w);
        const int shift = it * BN, nk = tl.nk + shift;
        a_end = it + tl.n_kb;
        open_end = it + tl.n_open;
        constexpr float kLog2e = 1.4426950408889634f;  // x / softmax_scale = x · kLog2e / scale_log2
        ri.col = col;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          ri.qpos[r] = tl.qpos0 + r0 + 8 * r + shift;
          ri.lim[r] = Mask::kCausal ? min(nk, ri.qpos[r] + 1) : nk;
          // the table's row of this query position (rows past the sequence read its last row), with
          // key k's entry at k - shift: the loop's key positions are shifted by `shift`
          const int q_row = min(tl.qpos0 + r0 + 8 * r, tl.qpos0 + tl.rows - 1);
          ri.trow[r] = Bias::kind == 2 ? tl.h * bias_table.head_stride + q_row * bias_table.q_stride +
                                             bias_table.offset - shift * bias_table.k_stride
                                       : 0;
        }
        ri.slope_raw = Bias::kind == 1 ? alibi[tl.h] * kLog2e / scale_log2 : 0.f;  // slope / softmax_scale
      }

      float o[D / 2];
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
      float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f}, alpha[2];
      float sc[BN / 2];
      u32 pa[BN / 16][4];

      // the item's Q; also with no key: the next Q load must not overtake this one
      mbar_wait(q_full, ti & 1);
      if (a_end > it) {  // (no key at all: O = 0, lse = -inf)
        // block 0: S_0 alone
        {
          const int s = it & 1;
          turn_begin();
          mbar_wait(&k_full[s], (it >> 1) & 1);
          if (gather) fence_proxy_async();  // cp.async (generic proxy) data read by wgmma (async proxy)
          fence_operands(sc);
          wgmma_fence();
          issue_s<T, D, BN>(sc, q_addr, smem_addr(sK + s * kKVBytes));
          wgmma_commit();
          turn_end();
          wgmma_wait<0>();
          fence_operands(sc);
          mbar_arrive(&k_empty[s]);
          if (it + 1 == a_end) mbar_arrive(q_empty);
          softmax_any<Mask, Bias, BN>(it >= open_end, sc, m_r, l_r, alpha, it * BN, ri, scale_log2, bias_table);
          rescale_pack<T, D, BN>(o, pa, sc, alpha);
        }

        for (int a = it + 1; a < a_end; ++a) {
          const int s = a & 1, sp = s ^ 1;
          turn_begin();
          mbar_wait(&k_full[s], (a >> 1) & 1);
          if (gather) fence_proxy_async();
          fence_operands(sc);
          fence_operands(o);
          wgmma_fence();
          issue_s<T, D, BN>(sc, q_addr, smem_addr(sK + s * kKVBytes));  // S_j
          wgmma_commit();
          mbar_wait(&v_full[sp], ((a - 1) >> 1) & 1);  // V_{j-1} only now: S_j may start without it
          if (gather) fence_proxy_async();
          wgmma_fence();  // (ptxas would inject this fence after the wait loop anyway)
          issue_pv<T, D, BN>(o, pa, smem_addr(sV + sp * kKVBytes));  // O += P_{j-1}·V_{j-1}, in flight
          wgmma_commit();
          turn_end();
          wgmma_wait<1>();  // S_j retired (groups retire in order)
          fence_operands(sc);
          mbar_arrive(&k_empty[s]);
          if (a + 1 == a_end) mbar_arrive(q_empty);  // Q is read by no later wgmma of this item
          softmax_any<Mask, Bias, BN>(a >= open_end, sc, m_r, l_r, alpha, a * BN, ri, scale_log2, bias_table);
          wgmma_wait<0>();  // P_{j-1}·V_{j-1} retired: O and P's registers are free again
          fence_operands(o);
#pragma unroll
          for (int k = 0; k < BN / 16; ++k) fence_operands(pa[k]);
          mbar_arrive(&v_empty[sp]);
          rescale_pack<T, D, BN>(o, pa, sc, alpha);
        }

        // the last block's P·V
        {
          const int al = a_end - 1, s = al & 1, n0 = al * BN;
          turn_begin();
          mbar_wait(&v_full[s], (al >> 1) & 1);
          if (gather) fence_proxy_async();
          // Zero the V rows of keys past n_keys (the cache may hold NaN there; 0·NaN would poison
          // O). Consumer 0 writes them in its turn; its proxy fence + the chain of turn barriers
          // order the writes before the other consumers' P·V too; the stage is refilled (TMA or gather) only
          // after every consumer's P·V has released it.
          // n_keys, shifted as the loop's positions (derived again: one register fewer in the loop)
          const HopperTile tl = tile_of(w);
          const int nk = tl.nk + (a_end - tl.n_kb) * BN;
          if (cw == 0 && n0 + BN > nk) {
            const int first = max(nk - n0, 0);
            for (int i = t; i < (BN - first) * kChunks * 8; i += 128) {
              const int row = first + i / (kChunks * 8), rest = i % (kChunks * 8);
              *reinterpret_cast<uint4*>(sV + s * kKVBytes + (rest / 8) * BN * 128 + row * 128 + (rest % 8) * 16) =
                  make_uint4(0, 0, 0, 0);
            }
            fence_proxy_async();
            named_barrier_sync(kZeroBar, 128);  // before consumer 0's own P·V
          }
          fence_operands(o);
          wgmma_fence();
          issue_pv<T, D, BN>(o, pa, smem_addr(sV + s * kKVBytes));
          wgmma_commit();
          turn_end();
          wgmma_wait<0>();
          fence_operands(o);
#pragma unroll
          for (int k = 0; k < BN / 16; ++k) fence_operands(pa[k]);
          mbar_arrive(&v_empty[s]);
        }
      } else {  // (not reached: a tile's sequence has its own new tokens as keys)
        mbar_arrive(q_empty);
      }
      it = a_end;

      // Epilogue: O / l converted to T into this consumer's staging tile, [64 rows][D·2 bytes] with
      // the 16-byte chunks of row r XOR-swizzled by r % 8 (the quad-wide 4-byte writes of 8 rows
      // then hit distinct banks), then 16-byte coalesced stores of the rows of this sequence. The
      // first barrier: the consumer's reads of the previous item's tile are done.
      const HopperTile tl = tile_of(w);
      const int row0 = 64 * cw;  // the consumer's first tile row
      unsigned char* my_o = sO + cw * kQBytes;
      named_barrier_sync(kEpilogueBar + cw, 128);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 1);
        l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 2);
        const float inv = l_r[r] > 0.f ? 1.f / l_r[r] : 0.f;
        const int rl = r0 - row0 + 8 * r;  // row inside the consumer's 64
#pragma unroll
        for (int jb = 0; jb < D / 8; ++jb) {
          *reinterpret_cast<u32*>(my_o + rl * D * 2 + ((jb ^ (rl & 7)) * 16) + (col / 2) * 4) =
              pack2<T>(o[4 * jb + 2 * r] * inv, o[4 * jb + 2 * r + 1] * inv);
        }
        const int row = r0 + 8 * r;
        if (lse != nullptr && (lane % 4) == 0 && row < tl.rows) {
          const long long tok = tl.tok0 + tl.m0 + row;
          lse[tok * num_heads + tl.h] = l_r[r] > 0.f ? (m_r[r] * scale_log2 + log2f(l_r[r])) * kLn2 : -INFINITY;
        }
      }
      named_barrier_sync(kEpilogueBar + cw, 128);
      constexpr int kRowChunks = D / 8;  // 16-byte chunks per row
      for (int c = t; c < 64 * kRowChunks; c += 128) {
        const int rl = c / kRowChunks, chunk = c % kRowChunks;
        if (row0 + rl >= tl.rows) break;  // c grows with the row: every later chunk is past the sequence too
        const uint4 v = *reinterpret_cast<const uint4*>(my_o + rl * D * 2 + ((chunk ^ (rl & 7)) * 16));
        const long long tok = tl.tok0 + tl.m0 + row0 + rl;
        *reinterpret_cast<uint4*>(out + tok * out_stride + (long long)tl.h * D + chunk * 8) = v;
      }
      if (!Cfg::kPersistent) break;  // (the compiler then keeps no loop state)
    }
    if (cw == 0) turn_begin();  // the last consumer's opening arrival (see the turns above)
  }
#endif
}

}  // namespace tp
