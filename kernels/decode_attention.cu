// Generation-phase (decode) attention: one query token per sequence against its cached keys.
//
// Memory-bound: every cached K and V byte is read once, 2·B·KV_r·L·D·bytes per call, so the
// figure of merit is bytes read per second against the device's copy bandwidth
// (kernels/NOTES_decode.md has the numbers). Launched by tp_runtime/backends/cuda_decode.py,
// whose _params() is the one place that builds the argument list below.
//
// Work split: one thread block (128 threads) per (head chunk, key split, KV head, sequence).
// A block serves HPB query heads that share its KV head (GQA packing: K/V read once for all of
// them); HPB = next power of two of the group, at most 16 on the tensor-core path (the MMA's M) and
// 8 on CUDA cores; larger groups use several head chunks.
// The block's keys [k_begin, k_end) stream through shared memory in tiles of kTileKeys keys,
// kStages deep, by 16-byte cp.async copies (zero-filled past the last key); so several tiles
// are in flight while one is computed, and the copy and compute layouts are independent.
//
// Two compute paths over the same pipeline (Traits::kMma picks one at compile time):
//  * tensor cores (D <= 128; grouped heads, and MHA with an 8-bit cache; see Traits::kMma): each
//    warp takes 8 or 16 keys of the tile. S = Q·Kᵀ by mma.sync m16n8k16 with the head group as M
//    (padded to 16), K fragments by ldmatrix from XOR-swizzled rows; online softmax on S's C
//    fragments; Oᵀ += Vᵀ·Pᵀ with D as M, whose B operand is S's C layout as is (P rounded to
//    fp16/bf16, as torch does); 16 heads fill all of S's M rows and make two Oᵀ n-tiles that share
//    each Vᵀ fragment. An int8/fp8 tile is read by 32-bit words straight from the landed
//    tile and converted, exactly, in registers (channel orders permuted so that one word holds a
//    lane's four bytes; see compute).
//  * CUDA cores (MHA with an fp16/bf16 cache, and D 256): kLanes lanes share one key row, 8
//    elements each (16 B of fp16, 8 B of int8); kHG head groups of kGH heads; kKG key groups take
//    the tile's keys round robin; partial dot products summed over the lanes with xor shuffles;
//    int8/fp8 converted in registers inside the dot product.
// Each key group (a warp on the mma path) runs its own online softmax (running max m, sum l, base-2
// exponent); the groups are merged through shared memory at the end. The per-tensor dequant scale
// of K is folded into the score scale, V's is applied to the output.
//
// Multi-block (num_splits > 1): each split writes its normalised partial output and base-2
// log-sum-exp to a workspace; the last split block of a (sequence, KV head, head chunk) to
// finish (an atomic counter, reset by that block) merges them by log-sum-exp and writes the
// output; past kMergeGroup splits in two levels (groups of kMergeGroup, then the groups). That
// merge is the "small merge kernel" of the flash-decoding plan, run inside the same launch so a
// split call costs one launch, not two.
//
// Masking: a decode query sits at q_pos = past (its own key was written by prepare), so causal,
// padding and bidirectional masks all let it see keys 0..past (ChatGLM's hidden last column is
// hidden only from earlier queries); cross attention sees encoder keys 0..encoder_len-1. The mask
// type matters only for T5 buckets, which the host folds into the bias table. Zero keys: zeros,
// lse -inf.
#include "kv_access.cuh"

namespace tp {

namespace decode {

constexpr int kThreads = 128;
constexpr int kMaxStages = 8;
// Shared memory for the K/V pipeline (and, reused after it, the merge scratch). Mirrored by
// PIPE_BYTES in tp_runtime/backends/cuda_decode.py; the kernel traps if given less.
constexpr int kPipeBytes = 48 * 1024;
constexpr int kMaxTileKeys = 128;
[[maybe_unused]] constexpr int kMergeGroup = 16;  // split partials one merging block reads per head (see the split merge)
[[maybe_unused]] constexpr float kLog2e = 1.4426950408889634f;
[[maybe_unused]] constexpr float kLn2 = 0.6931471805599453f;
#define kNegInf __int_as_float(0xff800000u)  // -inf (NVRTC has no math.h INFINITY)

constexpr int pow2_ceil(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}
constexpr int pow2_floor(int x) {
  int p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}
constexpr int cmin(int a, int b) { return a < b ? a : b; }
constexpr int cmax(int a, int b) { return a > b ? a : b; }

// What the cache stores per element, by activation type and cache kind.
template <typename T, typename Cache>
struct Storage {
  using type = T;
};
template <typename T>
struct Storage<T, CacheInt8> {
  using type = signed char;
};
template <typename T>
struct Storage<T, CacheFp8> {
  using type = unsigned char;  // e4m3fn bits
};

template <typename Layout>
struct IsPaged {
  static constexpr bool value = false;
};
template <>
struct IsPaged<LayoutPaged> {
  static constexpr bool value = true;
};

// Eight consecutive stored elements (from shared memory) -> fp32, exactly.
template <typename S>
struct Vec8;

template <>
struct Vec8<__half> {
  __device__ __forceinline__ static void load(const unsigned char* p, float (&f)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      *reinterpret_cast<unsigned*>(&h) = w[i];
      const float2 t = __half22float2(h);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
};

template <>
struct Vec8<__nv_bfloat16> {
  __device__ __forceinline__ static void load(const unsigned char* p, float (&f)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bf16 -> fp32 is a 16-bit shift
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

template <>
struct Vec8<signed char> {
  // int8 -> fp32 without I2F: flip the sign bit (x + 128 as a byte), drop the byte into the
  // mantissa of 2^23 with one byte permute, subtract 2^23 + 128 (exact).
  __device__ __forceinline__ static void four(unsigned w, float* f) {
    const unsigned x = w ^ 0x80808080u;
#pragma unroll
    for (int b = 0; b < 4; ++b) f[b] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7440u | b)) - 8388736.0f;
  }
  __device__ __forceinline__ static void load(const unsigned char* p, float (&f)[8]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    four(u.x, f);
    four(u.y, f + 4);
  }
};

template <>
struct Vec8<unsigned char> {  // fp8 e4m3fn
  __device__ __forceinline__ static void four(unsigned w, float* f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // hardware e4m3x2 -> f16x2 (low byte -> low half), exact
      unsigned r;
      const unsigned short pair = (unsigned short)(w >> (16 * i));
      asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(pair));
      __half2 h;
      *reinterpret_cast<unsigned*>(&h) = r;
      const float2 t = __half22float2(h);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
#else
#pragma unroll
    for (int b = 0; b < 4; ++b) f[b] = fp8_e4m3_to_float((u8)(w >> (8 * b)));
#endif
  }
  __device__ __forceinline__ static void load(const unsigned char* p, float (&f)[8]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    four(u.x, f);
    four(u.y, f + 4);
  }
};

template <typename Cache>
struct IsAuto {
  static constexpr bool value = false;
};
template <>
struct IsAuto<CacheAuto> {
  static constexpr bool value = true;
};

// Compile-time shape of one variant (see the layout notes at the top of the file).
template <typename T, typename Cache, int D, int HPB>
struct Traits {
  using S = typename Storage<T, Cache>::type;
  static constexpr int kElem = sizeof(S);
  static constexpr int kRowBytes = D * kElem;             // one K (or V) row of the cache
  static constexpr int kChunks = kRowBytes / 16;          // 16-byte copies per row
  static constexpr bool kQuant = !IsAuto<Cache>::value;
  // Tensor cores up to D 128: each warp takes 16 (or 8) keys of a tile; S = Q·Kᵀ (heads as M) and
  // Oᵀ = Vᵀ·Pᵀ (D as M) by mma.sync. Grouped heads always; one head per KV head (MHA) only for 8-bit
  // caches, where the CUDA-core path is conversion- and issue-bound (~130 instructions per KB
  // against ~65 here, 15 of 16 MMA rows idle but free); MHA fp16 keeps the CUDA cores, which reach
  // the bandwidth (NOTES_decode.md). D 256 stays on CUDA cores (too few keys per warp).
  static constexpr bool kMma = D <= 128 && (kQuant || HPB >= 2);
  static constexpr int kTRowBytes = D * 2;  // a row of T (what ldmatrix reads)
  // T tiles: rows of 16-byte chunks XOR-swizzled by (key & 7), so ldmatrix's 8 rows hit 8
  // different bank groups (rows of 128 B multiples would all hit the same one).
  static constexpr bool kSwizzleT = (D / 8) % 8 == 0;
  // 8-bit tiles on the mma path: a lane reads 32-bit words of 8 rows (K) or of 4 rows 2 apart (V)
  // at one chunk; XOR the chunk with a key function so those rows land on different bank groups
  // (rows of 128 B: key & 7; rows of 64 B, two per 128 B: (key >> 1) & 3; D 80/96: none, 2-way).
  static constexpr int kChunks8 = D / 16;
  static constexpr int kSwz8Shift = kChunks8 % 8 == 0 ? 0 : 1;
  static constexpr int kSwz8Mask = kChunks8 % 8 == 0 ? 7 : (kChunks8 == 4 ? 3 : 0);
  static constexpr int kActive = D / 8;                   // lanes holding data
  static constexpr int kLanes = pow2_ceil(kActive);       // lanes per key row (idle ones for D 80/96)
  static constexpr int kGH = HPB < 4 ? HPB : 4;           // heads per thread
  static constexpr int kHG = HPB / kGH;                   // head groups
  // mma path with 32 heads: the warps split into 2 head sets of 16 (the MMA's rows) x 2 key groups,
  // both head sets reading the same tile (MQA 32/1: one block reads its KV head once for all 32).
  static constexpr int kHS = kMma && HPB > 16 ? HPB / 16 : 1;  // head sets (warps per key group)
  static constexpr int kKG = kMma ? kThreads / 32 / kHS : kThreads / (kLanes * kHG);  // key groups
  // ~8 KB of K per tile (and as much V). The mma path takes at most 16 keys per warp (64 per tile):
  // an int8 tile at D 128 is 64 keys, 16 KB.
  static constexpr int kTileKeys =
      cmin(kMma ? 16 * kKG : kMaxTileKeys, cmax(kMma ? 32 : kKG, pow2_floor(8192 / kRowBytes)));
  static constexpr int kKPG = kTileKeys / kKG;            // keys per key group per tile
  static constexpr int kKB = cmin(kKPG, cmax(1, 16 / kGH));  // keys per online-softmax update
  static constexpr int kStageBytes = 2 * kTileKeys * kRowBytes;
  // As many stages as kPipeBytes holds (3 of 16 KB; up to kMaxStages of smaller tiles, e.g. 8-bit D 64
  // or 32-head tiles): the same shared memory keeps more bytes in flight per block.
  static constexpr int kStages = cmin(kMaxStages, kPipeBytes / kStageBytes);
  static constexpr int kRedBytes = ((2 + D) * kKG + 2) * HPB * 4;  // key-group merge scratch (+ per-head factor, lse)
  // Blocks per SM (caps registers: no spills). 8-bit mma at D 128 (16 keys per warp, 64 Oᵀ values)
  // spilled at 4 blocks' 128 registers and takes 157-163: 3 blocks, still 3 x 32 KB in flight per SM, above the ~30 KB the
  // bandwidth needs (PERF_NOTES §2.2 b), and the split count aims at 2 blocks per SM anyway.
  // 16 heads (two Oᵀ n-tiles, 2 x KS x 4 accumulators) at D > 64, and 32 heads (paged D 64 spilled
  // 4 bytes at 128): 3 blocks (168 registers). sm_80's scheduling needs more for 32 fp16/bf16 heads
  // at D 128 (52-64 bytes spilled at 168): 2 blocks there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static constexpr bool kTightRegs = HPB > 16 && D > 96 && !kQuant;
#else
  static constexpr bool kTightRegs = false;
#endif
  static constexpr int kMinBlocks = kTightRegs ? 2
                                    : (kMma && kQuant && D > 96) || (HPB > 8 && D > 64) || HPB > 16
                                        ? 3
                                        : (kMma || HPB <= 2 ? 4 : 3);
  static constexpr int kHeadsPerWarp = HPB / kHS;  // heads of one warp's MMAs (at most 16)

  static_assert(D % 8 == 0 && kRowBytes % 16 == 0, "head size must be a multiple of 8 (16 bytes of int8)");
  static_assert(HPB == 1 || HPB == 2 || HPB == 4 || HPB == 8 || ((HPB == 16 || HPB == 32) && kMma),
                "heads per block: 1, 2, 4 or 8; 16 or 32 on the tensor-core path (D <= 128)");
  static_assert(kStages >= 2, "the pipeline needs two stages");
  static_assert(kLanes <= 32 && kKG >= 1, "a key row must fit one warp");
  static_assert(kTileKeys % kKG == 0 && kKPG % kKB == 0, "tile must split evenly over key groups");
  static_assert(kStages * kStageBytes <= kPipeBytes, "pipeline exceeds kPipeBytes");
  static_assert(kRedBytes <= kPipeBytes, "merge scratch exceeds kPipeBytes");
  static_assert(!kMma || kKPG == 8 || kKPG == 16, "mma path: 8 or 16 keys per warp and tile");

  // Byte offset of logical 16-byte chunk `part` of row `key` in a T tile read by ldmatrix.
  __device__ __forceinline__ static int offset_t(int key, int part) {
    return key * kTRowBytes + (kSwizzleT ? (part ^ (key & 7)) : part) * 16;
  }
  // ... and of chunk `part` of row `key` of an 8-bit tile read by the mma path.
  __device__ __forceinline__ static int offset8(int key, int part) {
    return key * kRowBytes + (part ^ ((key >> kSwz8Shift) & kSwz8Mask)) * 16;
  }
  // ... and in a pipeline stage (as copied from the cache).
  __device__ __forceinline__ static int offset(int key, int part) {
    if constexpr (kMma && !kQuant) return offset_t(key, part);
    if constexpr (kMma) return offset8(key, part);
    return key * kRowBytes + part * 16;
  }
};

// mma.sync wrappers (fp32 accumulate). Q·Kᵀ's A has rows 8..15 zero (at most 8 heads per block).
template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  __device__ __forceinline__ static unsigned pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  __device__ __forceinline__ static void k16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                             unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static void k16(float (&d)[4], unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
    k16(d, a0, 0u, a2, 0u, b0, b1);  // A rows 8..15 zero
  }
  __device__ __forceinline__ static void k8(float (&d)[4], unsigned a0, unsigned a1, unsigned b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  }
};
template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static unsigned pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  __device__ __forceinline__ static void k16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                             unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static void k16(float (&d)[4], unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
    k16(d, a0, 0u, a2, 0u, b0, b1);  // A rows 8..15 zero
  }
  __device__ __forceinline__ static void k8(float (&d)[4], unsigned a0, unsigned a1, unsigned b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  }
};

template <typename T>
struct IsHalf {
  static constexpr bool value = false;
};
template <>
struct IsHalf<__half> {
  static constexpr bool value = true;
};

// Four 8-bit cache values of one 32-bit word (byte 0 lowest) -> two pairs of T, exactly (int8 and
// e4m3 values are fp16 and bf16 values): lo = bytes 0, 1 and hi = bytes 2, 3, the lower byte in the
// lower half, as the mma fragments want. No per-element conversion instructions (NOTES_decode.md).
template <typename T, typename S>
struct Pair8;
template <>
struct Pair8<__half, signed char> {
  // Flip the sign bit (the byte becomes x + 128), permute each byte under the fp16 exponent pattern
  // 0x64 (the half 0x64XX is 1024 + byte), subtract 1024 + 128 as one packed op: exact.
  __device__ __forceinline__ static void cvt(unsigned w, unsigned& lo, unsigned& hi) {
    const unsigned x = w ^ 0x80808080u;
    const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
    const unsigned l = __byte_perm(x, 0x64646464u, 0x4140u), h = __byte_perm(x, 0x64646464u, 0x4342u);
    const __half2 rl = __hsub2(*reinterpret_cast<const __half2*>(&l), bias);
    const __half2 rh = __hsub2(*reinterpret_cast<const __half2*>(&h), bias);
    lo = *reinterpret_cast<const unsigned*>(&rl);
    hi = *reinterpret_cast<const unsigned*>(&rh);
  }
};
template <>
struct Pair8<__nv_bfloat16, signed char> {
  // bf16 has 7 mantissa bits, too few for a byte: go through fp32 (the byte under 2^23, minus
  // 2^23 + 128, exact) and keep the high halves (exact: small integers), 10 ops per 4 values.
  __device__ __forceinline__ static void cvt(unsigned w, unsigned& lo, unsigned& hi) {
    const unsigned x = w ^ 0x80808080u;
    unsigned f[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      f[b] = __float_as_uint(__uint_as_float(__byte_perm(x, 0x4B000000u, 0x7440u | b)) - 8388736.0f);
    }
    lo = __byte_perm(f[0], f[1], 0x7632u);
    hi = __byte_perm(f[2], f[3], 0x7632u);
  }
};
template <typename T>
struct Pair8<T, unsigned char> {  // fp8 e4m3fn
  __device__ __forceinline__ static unsigned two(unsigned short pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned r;  // hardware e4m3x2 -> f16x2 (low byte -> low half), exact
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(pair));
    if constexpr (IsHalf<T>::value) {
      return r;
    } else {  // e4m3 values are bf16 values: fp16 -> fp32 -> bf16 is exact
      const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&r));
      return Mma<T>::pack(t.x, t.y);
    }
#else
    return Mma<T>::pack(fp8_e4m3_to_float((u8)(pair & 0xff)), fp8_e4m3_to_float((u8)(pair >> 8)));
#endif
  }
  __device__ __forceinline__ static void cvt(unsigned w, unsigned& lo, unsigned& hi) {
    lo = two((unsigned short)(w & 0xffffu));
    hi = two((unsigned short)(w >> 16));
  }
};

// Two 8x8 b16 matrices from shared memory (lanes 0-7 address matrix 0's rows, 8-15 matrix 1's).
__device__ __forceinline__ void ldsm_x2(unsigned& r0, unsigned& r1, const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(a));
}
__device__ __forceinline__ void ldsm_x2_trans(unsigned& r0, unsigned& r1, const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(a));
}
// Four (lanes 8m..8m+7 address matrix m's rows), transposed.
__device__ __forceinline__ void ldsm_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int n = ok ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}


// Log-sum-exp merge of `count` split partials of one (sequence, KV head, head chunk): those at
// splits first, first + stride, ... of part_o [n, H_r, S, D] / part_lse [n, H_r, S] (base 2). With
// out == nullptr the result (normalised output and its lse) goes to split `first`'s slot, a partial
// of the next level; else to out/lse at the sequence's row. Each thread takes 4 channels of a head
// and issues its loads 16 splits at a time (independent L2 reads in flight, not one per round trip).
// Uses 4 * HPB * (count + 2) bytes of `scratch`; the caller has synchronised the block.
template <typename T, int D, int HPB>
__device__ __forceinline__ void merge_splits(float* part_o, float* part_lse, T* out, float* lse, unsigned char* scratch,
                                             int si, int kvh, int hc, int group, int num_heads, int num_splits,
                                             int first, int stride, int count, int row) {
  const int tid = threadIdx.x;
  float* w = reinterpret_cast<float*>(scratch);  // [HPB][count] lse, then weights
  float* w_max = w + HPB * count;                // [HPB]
  float* w_sum = w_max + HPB;                    // [HPB]
  auto base = [&](int hh) {  // the head's partial index of split 0
    return ((long long)si * num_heads + kvh * group + hc * HPB + hh) * num_splits;
  };
  for (int idx = tid; idx < HPB * count; idx += kThreads) {
    const int hh = idx / count, k = idx - hh * count;
    w[idx] = hc * HPB + hh < group ? __ldcg(part_lse + base(hh) + first + k * stride) : kNegInf;
  }
  __syncthreads();
  const int warp = tid / 32, wl = tid % 32;
  for (int hh = warp; hh < HPB; hh += kThreads / 32) {
    float mx = kNegInf;
    for (int k = wl; k < count; k += 32) mx = fmaxf(mx, w[hh * count + k]);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float mu = mx == kNegInf ? 0.f : mx;
    float sum = 0.f;
    for (int k = wl; k < count; k += 32) sum += exp2f(w[hh * count + k] - mu);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (wl == 0) {
      w_max[hh] = mu;
      w_sum[hh] = sum;
    }
  }
  __syncthreads();
  for (int idx = tid; idx < HPB * count; idx += kThreads) {
    const int hh = idx / count;
    w[idx] = w_sum[hh] > 0.f ? exp2f(w[idx] - w_max[hh]) / w_sum[hh] : 0.f;
  }
  __syncthreads();
  constexpr int D4 = D / 4;
  constexpr int kBatch = kMergeGroup;  // a first-level merge: one round trip per item
  for (int idx = tid; idx < HPB * D4; idx += kThreads) {
    const int hh = idx / D4, d = (idx - hh * D4) * 4;
    if (hc * HPB + hh >= group) continue;
    const long long pb = base(hh) + first;
    const float4* src = reinterpret_cast<const float4*>(part_o + pb * D + d);  // split k at src[k * stride * D4]
    const float* wt = w + hh * count;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k0 = 0; k0 < count; k0 += kBatch) {
      float4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (k0 + u < count) v[u] = __ldcg(src + (long long)(k0 + u) * stride * D4);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (k0 + u < count && wt[k0 + u] > 0.f) {  // empty splits (weight 0) add nothing
          o.x = fmaf(wt[k0 + u], v[u].x, o.x);
          o.y = fmaf(wt[k0 + u], v[u].y, o.y);
          o.z = fmaf(wt[k0 + u], v[u].z, o.z);
          o.w = fmaf(wt[k0 + u], v[u].w, o.w);
        }
      }
    }
    const float lse2 = w_sum[hh] > 0.f ? w_max[hh] + log2f(w_sum[hh]) : kNegInf;
    if (out == nullptr) {  // a partial of the next level, in split `first`'s slot (read above)
      *reinterpret_cast<float4*>(part_o + pb * D + d) = o;
      if (d == 0) part_lse[pb] = lse2;
    } else {
      const long long r = (long long)row * num_heads + kvh * group + hc * HPB + hh;
      out[r * D + d] = from_float<T>(o.x);
      out[r * D + d + 1] = from_float<T>(o.y);
      out[r * D + d + 2] = from_float<T>(o.z);
      out[r * D + d + 3] = from_float<T>(o.w);
      if (d == 0) lse[r] = lse2 * kLn2;
    }
  }
}

}  // namespace decode

// Argument layout: built by tp_runtime/backends/cuda_decode.py::_params (same order, same types).
// Grid (head_chunks * num_splits, KV_r, num_seqs); block 128; dynamic shared memory
// round_up(4 * table_cap, 16) + kPipeBytes.
template <typename T, typename Cache, typename Layout, int D, int HPB>
__global__ void __launch_bounds__(decode::kThreads, decode::Traits<T, Cache, D, HPB>::kMinBlocks) decode_attention_kernel(
    const T* __restrict__ q,            // [T, H_r, D]
    T* __restrict__ out,                // [T, H_r, D]: written at the served sequences' rows
    float* __restrict__ lse,            // [T, H_r]: natural-log log-sum-exp, -inf for no keys
    float* __restrict__ part_o,         // [n, H_r, num_splits, D] split outputs (num_splits > 1)
    float* __restrict__ part_lse,       // [n, H_r, num_splits] their base-2 lse
    int* __restrict__ counters,         // [n, KV_r, head_chunks, 1 or 1 + groups], zero on entry, left zero;
                                        // null: the splits are merged by decode_merge_kernel after this launch
    const void* __restrict__ cache,     // LayerKV.data (storage type of Cache)
    long long s_row,                    // element strides of cache: slot (contiguous) / block (paged)
    long long s_kv,                     //   K -> V
    long long s_head,                   //   KV head; a position is D elements, an element 1
    const int* __restrict__ block_table,  // paged: [max_seqs, bt_stride] block ids
    int bt_stride, int log2_page,       // paged: row stride of the table, log2(P)
    int table_cap,                      // block-table entries that fit the shared-memory slice
    const int* __restrict__ seq_ids,    // [n] sequences to serve
    const int* __restrict__ cu_seqlens,  // [B+1]: a sequence's token row
    const int* __restrict__ past,       // [B]: q_pos
    const int* __restrict__ slots,      // [B]: cache slot
    const int* __restrict__ encoder,    // [B] encoder lengths: cross attention keys; null: self (past + 1 keys)
    const int* __restrict__ cache_ind,  // beam search [B/W, W, ind_len] beam ids, or null
    int beam_width, int ind_len,
    const float* __restrict__ alibi,    // [H_r] effective slopes, or null
    const float* __restrict__ bias_tab,  // relative bias(h, q, k) = bias_tab[h·b_sh + q·b_sq + k·b_sk + b_off]
    long long b_sh, long long b_sq, long long b_sk, long long b_off,  // (explicit or bucket-expanded), or null
    int num_heads,                      // H_r
    int group,                          // query heads per KV head
    int head_chunks, int num_splits,
    float qk_scale,                     // softmax_scale * dequant_scale * log2(e)
    float v_scale) {                    // dequant_scale
  using namespace decode;
  using Tr = Traits<T, Cache, D, HPB>;
  using S = typename Tr::S;
  constexpr int TK = Tr::kTileKeys, GH = Tr::kGH, KG = Tr::kKG, KPG = Tr::kKPG, KB = Tr::kKB;
  constexpr int kStages = Tr::kStages;
  constexpr int LANES = Tr::kLanes, ACTIVE = Tr::kActive, ROW = Tr::kRowBytes, CH = Tr::kChunks;
  constexpr bool kPaged = IsPaged<Layout>::value;

  extern __shared__ __align__(16) unsigned char smem[];
  const int table_bytes = (table_cap * 4 + 15) & ~15;
  int* s_table = reinterpret_cast<int*>(smem);
  unsigned char* pipe = smem + table_bytes;
  if (threadIdx.x == 0) {
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < (unsigned)(table_bytes + kPipeBytes)) __trap();  // launcher and kernel disagree
  }

  const int tid = threadIdx.x;
  const int lane = tid % LANES;
  const int hg = (tid / LANES) % Tr::kHG;
  const int kg = tid / (LANES * Tr::kHG);
  const int hc = blockIdx.x % head_chunks, split = blockIdx.x / head_chunks;
  const int kvh = blockIdx.y, si = blockIdx.z;
  const int seq = seq_ids[si];
  const int row = cu_seqlens[seq];
  const int q_pos = past[seq];
  const int slot = slots[seq];
  const int n_keys = encoder != nullptr ? encoder[seq] : q_pos + 1;

  // This split's keys: the sequence's keys in num_splits chunks of whole tiles.
  int chunk = (n_keys + num_splits - 1) / num_splits;
  chunk = (chunk + TK - 1) / TK * TK;
  const int k_begin = min(split * chunk, n_keys);
  const int k_end = min(k_begin + chunk, n_keys);
  const int n_tiles = (k_end - k_begin + TK - 1) / TK;

  // Paged without beams: the split's slice of the block-table row, in shared memory when it fits.
  const int* table = nullptr;
  int first_blk = 0;
  if (kPaged && beam_width <= 1 && n_tiles > 0) {
    first_blk = k_begin >> log2_page;
    const int count = ((k_end - 1) >> log2_page) - first_blk + 1;
    const int* grow = block_table + (long long)slot * bt_stride + first_blk;
    if (count <= table_cap) {
      for (int i = tid; i < count; i += kThreads) s_table[i] = grow[i];
      table = s_table;
    } else {
      table = grow;
    }
  }
  __syncthreads();

  const S* base = reinterpret_cast<const S*>(cache);
  // Element offset of key t's K row.
  auto locate = [&](int t) -> long long {
    int src = slot;
    if (beam_width > 1 && t < q_pos) src = slot / beam_width * beam_width + cache_ind[(long long)slot * ind_len + t];
    if constexpr (kPaged) {
      const int blk = beam_width > 1 ? block_table[(long long)src * bt_stride + (t >> log2_page)]
                                     : table[(t >> log2_page) - first_blk];
      return (long long)blk * s_row + kvh * s_head + (long long)(t & ((1 << log2_page) - 1)) * D;
    } else {
      return (long long)src * s_row + kvh * s_head + (long long)t * D;
    }
  };
  auto load_tile = [&](int tile, int stage) {
    const int t0 = k_begin + tile * TK;
    unsigned char* sk = pipe + stage * Tr::kStageBytes;
    unsigned char* sv = sk + TK * ROW;
#pragma unroll
    for (int i = 0; i < (TK * CH + kThreads - 1) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      if (TK * CH % kThreads == 0 || c < TK * CH) {
        const int key = c / CH, part = c - key * CH;
        const int t = t0 + key;
        const bool ok = t < k_end;
        const S* src = ok ? base + locate(t) + part * (16 / Tr::kElem) : base;
        cp_async16(sk + Tr::offset(key, part), src, ok);
        cp_async16(sv + Tr::offset(key, part), ok ? src + s_kv : base, ok);
      }
    }
  };

  // The pipeline: kStages - 1 tiles ahead of the one being computed.
  auto run_pipeline = [&](auto&& compute) {
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < n_tiles) load_tile(st, st);
      cp_async_commit();
    }
    for (int it = 0; it < n_tiles; ++it) {
      const int next = it + kStages - 1;
      if (next < n_tiles) load_tile(next, next % kStages);
      cp_async_commit();
      cp_async_wait<kStages - 1>();
      __syncthreads();
      compute(it % kStages, k_begin + it * TK);
      __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();
  };

  // Per key group: running max and sum (base 2) and the output accumulator, merged below.
  float* red_m = reinterpret_cast<float*>(pipe);  // [KG][HPB]
  float* red_l = red_m + KG * HPB;                // [KG][HPB]
  float* red_o = red_l + KG * HPB;                // [KG][HPB][D]
  if constexpr (Tr::kMma) {
    // Fragment roles: g = lane / 4, t = lane % 4. S = Q·Kᵀ has the warp's heads as M: lane holds
    // S[head g (+8 with 16 heads per warp)][keys 2t, 2t+1]; with at most 8 heads A's rows 8..15 are
    // zero. Oᵀ = Vᵀ·Pᵀ has D as M and the heads as N, 8 per n-tile: S's layout is exactly the B
    // fragment of Pᵀ (head row r of S feeds n-tile r), and lane holds Oᵀ[d 16i+g (+8)][heads 8r + 2t,
    // 8r + 2t + 1]. With 16 heads each Vᵀ fragment feeds two MMAs; with 32 the warps form two head
    // sets of 16 (heads 16hs..16hs+15) over two key groups, on the same tile (MQA: one KV head read
    // once for 32 heads).
    const int ln = tid % 32, g = ln / 4, t = ln % 4, r8 = ln % 8, mi = ln / 8;
    const int hs = (tid / 32) % Tr::kHS, warp = tid / 32 / Tr::kHS;  // head set; key group
    constexpr int KS = D / 16;   // k-steps of Q·Kᵀ, and 16-row tiles of Oᵀ
    constexpr int NW = KPG / 8;  // 8-key tiles per warp and tile (1 or 2)
    constexpr int HW = Tr::kHeadsPerWarp;
    constexpr int HR = HW > 8 ? 2 : 1;  // head rows per lane (g, g + 8) = Oᵀ n-tiles
    const int h0 = hc * HPB + hs * HW;   // the warp's first head in the group
    // A fragments of Q: fp16/bf16 tiles in mma order (k-step channels 2t, 2t+1 | 2t+8, 2t+9); 8-bit
    // tiles permute each k-step's channels (4t, 4t+1 | 4t+2, 4t+3), the same for Q and K, so that
    // one 32-bit word of a K row holds a lane's four bytes (a dot product does not see the order).
    unsigned qlo[HR][KS], qhi[HR][KS];  // a0/a2 (r 0) and a1/a3 (r 1)
    float slope[HR];
    constexpr int kHi = Tr::kQuant ? 2 : 8;  // offset of the a2 pair
#pragma unroll
    for (int r = 0; r < HR; ++r) {
      const int hig = h0 + g + 8 * r;
      const bool hvalid = g + 8 * r < HW && hig < group;
      const int head = kvh * group + (hvalid ? hig : 0);
      const T* qp = q + ((long long)row * num_heads + head) * D + (Tr::kQuant ? 4 * t : 2 * t);
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        qlo[r][ks] = hvalid ? *reinterpret_cast<const unsigned*>(qp + 16 * ks) : 0u;
        qhi[r][ks] = hvalid ? *reinterpret_cast<const unsigned*>(qp + 16 * ks + kHi) : 0u;
      }
      slope[r] = alibi != nullptr ? alibi[head] * kLog2e : 0.f;
    }
    const int head0 = kvh * group + min(h0 + g, group - 1);  // bias lookups (a valid head)
    const int head1 = kvh * group + min(h0 + g + 8, group - 1);
    float o[HR][KS][4];
#pragma unroll
    for (int r = 0; r < HR; ++r) {
#pragma unroll
      for (int i = 0; i < KS; ++i) o[r][i][0] = o[r][i][1] = o[r][i][2] = o[r][i][3] = 0.f;
    }
    float m_run[HR], l_run[HR];  // of head row r over this lane's keys (the max is the quad's)
#pragma unroll
    for (int r = 0; r < HR; ++r) {
      m_run[r] = kNegInf;
      l_run[r] = 0.f;
    }

    auto compute = [&](int stage, int t0) {
      const unsigned char* sk = pipe + stage * Tr::kStageBytes;
      const unsigned char* sv = sk + TK * ROW;
      const int kw = warp * KPG;  // the warp's first key in the tile
      float sc[NW][HR][2];
#pragma unroll
      for (int nt = 0; nt < NW; ++nt) {
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        // the row this lane reads: ldmatrix's row address (lanes 8m..8m+7: rows 0..7), or an 8-bit
        // tile's key g (B column g) whose bytes 4t..4t+3 of chunk ks the lane converts in registers
        const int key = kw + nt * 8 + (Tr::kQuant ? g : r8);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          unsigned b0, b1;
          if constexpr (Tr::kQuant) {
            const unsigned w = *reinterpret_cast<const unsigned*>(sk + Tr::offset8(key, ks) + 4 * t);
            Pair8<T, S>::cvt(w, b0, b1);
          } else {
            ldsm_x2(b0, b1, sk + Tr::offset_t(key, 2 * ks + (mi & 1)));
          }
          if constexpr (HR == 2) {
            Mma<T>::k16(c, qlo[0][ks], qlo[HR - 1][ks], qhi[0][ks], qhi[HR - 1][ks], b0, b1);
          } else {
            Mma<T>::k16(c, qlo[0][ks], qhi[0][ks], b0, b1);
          }
        }
#pragma unroll
        for (int r = 0; r < HR; ++r) {
          sc[nt][r][0] = c[2 * r];
          sc[nt][r][1] = c[2 * r + 1];
        }
      }
      unsigned pb[HR][NW];  // Pᵀ as B fragments, per n-tile of heads
      float a_lo[HR], a_hi[HR];
#pragma unroll
      for (int r = 0; r < HR; ++r) {
        float mx = kNegInf;
#pragma unroll
        for (int nt = 0; nt < NW; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int tk = t0 + kw + nt * 8 + 2 * t + e;
            const bool ok = tk < k_end;
            float v = sc[nt][r][e] * qk_scale;
            if (alibi != nullptr) v = fmaf(slope[r], (float)(tk - q_pos), v);
            if (ok && bias_tab != nullptr) {
              v = fmaf(bias_tab[(r ? head1 : head0) * b_sh + q_pos * b_sq + tk * b_sk + b_off], kLog2e, v);
            }
            sc[nt][r][e] = ok ? v : kNegInf;
            mx = fmaxf(mx, sc[nt][r][e]);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[r], mx);
        const float mu = m_new == kNegInf ? 0.f : m_new;
        const float alpha = exp2f(m_run[r] - mu);
        m_run[r] = m_new;
        l_run[r] *= alpha;
#pragma unroll
        for (int nt = 0; nt < NW; ++nt) {
          const float p0 = exp2f(sc[nt][r][0] - mu), p1 = exp2f(sc[nt][r][1] - mu);
          l_run[r] += p0 + p1;
          pb[r][nt] = Mma<T>::pack(p0, p1);
        }
        // the rescale factors of this lane's output columns, heads 2t and 2t+1 of n-tile r (held by
        // lanes 8t, 8t+4)
        a_lo[r] = __shfl_sync(0xffffffffu, alpha, 8 * t);
        a_hi[r] = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
      }
#pragma unroll
      for (int r = 0; r < HR; ++r) {
#pragma unroll
        for (int i = 0; i < KS; ++i) {
          o[r][i][0] *= a_lo[r];
          o[r][i][1] *= a_hi[r];
          o[r][i][2] *= a_lo[r];
          o[r][i][3] *= a_hi[r];
        }
      }
      if constexpr (Tr::kQuant) {
        // 8-bit Vᵀ: no transposing load for bytes, so Oᵀ's rows are permuted instead: tile i's row g
        // is channel 32(i/2) + 4g + 2(i%2), row g + 8 the next one. Then the word at bytes 32j + 4g of
        // key row k holds rows g, g+8 of tiles 2j, 2j+1 for key k; two keys' words interleaved by one
        // byte permute give the fragments' key pairs (keys 2t, 2t+1 | 2t+8, 2t+9 of the warp's keys).
        // D 80 (KS odd): the last tile 2j has no partner; its row g is channel 32j + 4(g & 3) + 2(g >> 2)
        // instead (lanes g and g + 4 take the two byte pairs of one word), row g + 8 the next one.
        auto word = [&](int key, int j) {
          const int part = KS % 2 == 1 && j == KS / 2 ? 2 * j : 2 * j + (g >> 2);
          return *reinterpret_cast<const unsigned*>(sv + Tr::offset8(key, part) + 4 * (g & 3));
        };
#pragma unroll
        for (int j = 0; j < (KS + 1) / 2; ++j) {
          const unsigned wa = word(kw + 2 * t, j), wb = word(kw + 2 * t + 1, j);
          const unsigned wc = NW == 2 ? word(kw + 2 * t + 8, j) : 0u, wd = NW == 2 ? word(kw + 2 * t + 9, j) : 0u;
#pragma unroll
          for (int h = 0; h < 2 && 2 * j + h < KS; ++h) {  // tile 2j + h: bytes 2h, 2h + 1 of each word
            const bool pair_hi = KS % 2 == 1 && j == KS / 2 ? g >= 4 : h == 1;
            const unsigned sel = pair_hi ? 0x7362u : 0x5140u;
            unsigned a0, a1;
            Pair8<T, S>::cvt(__byte_perm(wa, wb, sel), a0, a1);
            if constexpr (NW == 1) {
#pragma unroll
              for (int r = 0; r < HR; ++r) Mma<T>::k8(o[r][2 * j + h], a0, a1, pb[r][0]);
            } else {
              unsigned a2, a3;
              Pair8<T, S>::cvt(__byte_perm(wc, wd, sel), a2, a3);
#pragma unroll
              for (int r = 0; r < HR; ++r) Mma<T>::k16(o[r][2 * j + h], a0, a1, a2, a3, pb[r][0], pb[r][NW - 1]);
            }
          }
        }
      } else if constexpr (NW == 1) {  // 8 keys: m16n8k8, A = Vᵀ rows d 16i..16i+15
#pragma unroll
        for (int i = 0; i < KS; ++i) {
          unsigned a0, a1;
          ldsm_x2_trans(a0, a1, sv + Tr::offset_t(kw + r8, 2 * i + (mi & 1)));
#pragma unroll
          for (int r = 0; r < HR; ++r) Mma<T>::k8(o[r][i], a0, a1, pb[r][0]);
        }
      } else {  // 16 keys: m16n8k16
#pragma unroll
        for (int i = 0; i < KS; ++i) {
          unsigned a0, a1, a2, a3;
          ldsm_x4_trans(a0, a1, a2, a3, sv + Tr::offset_t(kw + 8 * (mi >> 1) + r8, 2 * i + (mi & 1)));
#pragma unroll
          for (int r = 0; r < HR; ++r) Mma<T>::k16(o[r][i], a0, a1, a2, a3, pb[r][0], pb[r][NW - 1]);
        }
      }
    };
    run_pipeline(compute);
#pragma unroll
    for (int r = 0; r < HR; ++r) {
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
      if (t == 0 && g + 8 * r < HW) {
        red_m[warp * HPB + hs * HW + g + 8 * r] = m_run[r];
        red_l[warp * HPB + hs * HW + g + 8 * r] = l_run[r];
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < HR; ++r) {
      float mx = kNegInf;
      if (g + 8 * r < HW) {
        for (int w = 0; w < KG; ++w) mx = fmaxf(mx, red_m[w * HPB + hs * HW + g + 8 * r]);
      }
      const float f = exp2f(m_run[r] - (mx == kNegInf ? 0.f : mx));
      const float f_lo = __shfl_sync(0xffffffffu, f, 8 * t), f_hi = __shfl_sync(0xffffffffu, f, 8 * t + 4);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int h = 8 * r + 2 * t + e;
        if (h < HW) {
          float* dst = red_o + (warp * HPB + hs * HW + h) * D + g;
          const float fe = e ? f_hi : f_lo;
#pragma unroll
          for (int i = 0; i < KS; ++i) {
            if constexpr (Tr::kQuant) {  // the permuted rows of the 8-bit Vᵀ (see compute)
              const int d0 = KS % 2 == 1 && i == KS - 1 ? 32 * (i / 2) + 4 * (g & 3) + 2 * (g >> 2)
                                                        : 32 * (i / 2) + 4 * g + 2 * (i % 2);
              dst[d0 - g] = o[r][i][e] * fe;
              dst[d0 - g + 1] = o[r][i][2 + e] * fe;
            } else {
              dst[16 * i] = o[r][i][e] * fe;
              dst[16 * i + 8] = o[r][i][2 + e] * fe;
            }
          }
        }
      }
    }
  } else {
    // Queries (8 elements of GH heads), ALiBi slopes (base 2), running softmax state.
    float qv[GH][8], acc[GH][8], m[GH], l[GH], slope[GH];
    int hb[GH];  // query head for bias lookups (a valid one for padded heads)
#pragma unroll
    for (int h = 0; h < GH; ++h) {
      const int hig = hc * HPB + hg * GH + h;
      const bool valid = hig < group;
      hb[h] = kvh * group + (valid ? hig : 0);
      const T* qp = q + ((long long)row * num_heads + hb[h]) * D + lane * 8;
#pragma unroll
      for (int e = 0; e < 8; e += 2) {
        float2 f = make_float2(0.f, 0.f);
        if (valid && lane < ACTIVE) f = load2(qp + e);
        qv[h][e] = f.x;
        qv[h][e + 1] = f.y;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
      m[h] = kNegInf;
      l[h] = 0.f;
      slope[h] = alibi != nullptr ? alibi[hb[h]] * kLog2e : 0.f;
    }

    auto compute = [&](int stage, int t0) {
      const unsigned char* sk = pipe + stage * Tr::kStageBytes;
      const unsigned char* sv = sk + TK * ROW;
#pragma unroll
      for (int jb = 0; jb < KPG; jb += KB) {
        float s[KB][GH];
#pragma unroll
        for (int jj = 0; jj < KB; ++jj) {
          float kf[8];
          if (lane < ACTIVE) {
            Vec8<S>::load(sk + ((jb + jj) * KG + kg) * ROW + lane * 8 * Tr::kElem, kf);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) kf[e] = 0.f;
          }
#pragma unroll
          for (int h = 0; h < GH; ++h) {
            float d = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) d = fmaf(qv[h][e], kf[e], d);
            s[jj][h] = d;
          }
        }
#pragma unroll
        for (int off = LANES / 2; off >= 1; off /= 2) {
#pragma unroll
          for (int jj = 0; jj < KB; ++jj) {
#pragma unroll
            for (int h = 0; h < GH; ++h) s[jj][h] += __shfl_xor_sync(0xffffffffu, s[jj][h], off);
          }
        }
        // Scale, position bias (base 2), keys past the split's end masked.
#pragma unroll
        for (int jj = 0; jj < KB; ++jj) {
          const int t = t0 + (jb + jj) * KG + kg;
          const bool ok = t < k_end;
          const int rel = t - q_pos;
#pragma unroll
          for (int h = 0; h < GH; ++h) {
            float v = s[jj][h] * qk_scale;
            if (alibi != nullptr) v = fmaf(slope[h], (float)rel, v);
            if (ok && bias_tab != nullptr) v = fmaf(bias_tab[hb[h] * b_sh + q_pos * b_sq + t * b_sk + b_off], kLog2e, v);
            s[jj][h] = ok ? v : kNegInf;
          }
        }
        // Online softmax: new max, rescale what was summed, exponentiate these keys.
#pragma unroll
        for (int h = 0; h < GH; ++h) {
          float mx = m[h];
#pragma unroll
          for (int jj = 0; jj < KB; ++jj) mx = fmaxf(mx, s[jj][h]);
          const float mu = mx == kNegInf ? 0.f : mx;
          const float alpha = exp2f(m[h] - mu);
          m[h] = mx;
          l[h] *= alpha;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[h][e] *= alpha;
#pragma unroll
          for (int jj = 0; jj < KB; ++jj) {
            const float p = exp2f(s[jj][h] - mu);
            s[jj][h] = p;
            l[h] += p;
          }
        }
#pragma unroll
        for (int jj = 0; jj < KB; ++jj) {
          float vf[8];
          if (lane < ACTIVE) {
            Vec8<S>::load(sv + ((jb + jj) * KG + kg) * ROW + lane * 8 * Tr::kElem, vf);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) vf[e] = 0.f;
          }
#pragma unroll
          for (int h = 0; h < GH; ++h) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(s[jj][h], vf[e], acc[h][e]);
          }
        }
      }
    };
    run_pipeline(compute);
    if (lane == 0) {
#pragma unroll
      for (int h = 0; h < GH; ++h) {
        red_m[kg * HPB + hg * GH + h] = m[h];
        red_l[kg * HPB + hg * GH + h] = l[h];
      }
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < GH; ++h) {
      const int hh = hg * GH + h;
      float mx = kNegInf;
      for (int g = 0; g < KG; ++g) mx = fmaxf(mx, red_m[g * HPB + hh]);
      const float f = exp2f(m[h] - (mx == kNegInf ? 0.f : mx));
      if (lane < ACTIVE) {
        float4* dst = reinterpret_cast<float4*>(red_o + (kg * HPB + hh) * D + lane * 8);
        dst[0] = make_float4(acc[h][0] * f, acc[h][1] * f, acc[h][2] * f, acc[h][3] * f);
        dst[1] = make_float4(acc[h][4] * f, acc[h][5] * f, acc[h][6] * f, acc[h][7] * f);
      }
    }
  }
  __syncthreads();
  // The key groups' softmax states per head, once per head (a thread each), then the channels by
  // float4: per channel this is only the sum of the groups' outputs and one multiply (the per-channel
  // max/sum/exp2/divide over the groups was ~32 dependent rounds per thread at 32 heads).
  float* red_f = red_o + KG * HPB * D;  // [HPB] output factor v_scale / sum (0 without keys)
  float* red_lse = red_f + HPB;         // [HPB] base-2 lse
#pragma unroll 1
  for (int hh = tid; hh < HPB; hh += kThreads) {
    float mx = kNegInf;
    for (int g = 0; g < KG; ++g) mx = fmaxf(mx, red_m[g * HPB + hh]);
    const float mu = mx == kNegInf ? 0.f : mx;
    float sum = 0.f;
    for (int g = 0; g < KG; ++g) sum += red_l[g * HPB + hh] * exp2f(red_m[g * HPB + hh] - mu);
    red_f[hh] = sum > 0.f ? v_scale / sum : 0.f;
    red_lse[hh] = sum > 0.f ? mu + log2f(sum) : kNegInf;
  }
  __syncthreads();
  const bool multi = num_splits > 1;
  constexpr int D4 = D / 4;
#pragma unroll 1
  for (int idx = tid; idx < HPB * D4; idx += kThreads) {
    const int hh = idx / D4, d = (idx - hh * D4) * 4;
    const int hig = hc * HPB + hh;
    if (hig >= group) continue;
    const int head = kvh * group + hig;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int g = 0; g < KG; ++g) {
      const float4 x = *reinterpret_cast<const float4*>(red_o + (g * HPB + hh) * D + d);
      o.x += x.x;
      o.y += x.y;
      o.z += x.z;
      o.w += x.w;
    }
    const float f = red_f[hh];
    o = make_float4(o.x * f, o.y * f, o.z * f, o.w * f);
    if (!multi) {
      T* dst = out + ((long long)row * num_heads + head) * D + d;
      dst[0] = from_float<T>(o.x);
      dst[1] = from_float<T>(o.y);
      dst[2] = from_float<T>(o.z);
      dst[3] = from_float<T>(o.w);
      if (d == 0) lse[(long long)row * num_heads + head] = red_lse[hh] * kLn2;
    } else {
      const long long pb = ((long long)si * num_heads + head) * num_splits + split;
      *reinterpret_cast<float4*>(part_o + pb * D + d) = o;
      if (d == 0) part_lse[pb] = red_lse[hh];
    }
  }
  if (!multi || counters == nullptr) return;  // no counters: decode_merge_kernel merges the splits

  // Split merge, a two-level tree so that no block reads more than kMergeGroup partials per head:
  // splits form groups of kMergeGroup; the last block of a group to finish (an atomic counter,
  // reset by that block) merges the group's partials into the slot of its first split; the last
  // group merger of this (sequence, KV head, head chunk) merges the groups into the output. With
  // at most kMergeGroup splits there is one group and its last block writes the output directly.
  // One block reading S partials was the tail of a long split call (S x HPB x D x 4 bytes through
  // a few loads in flight: ~8 us of 49 for one 32k GQA sequence, NOTES_decode.md v5).
  const int groups = (num_splits + kMergeGroup - 1) / kMergeGroup;
  const int ci = (si * gridDim.y + kvh) * head_chunks + hc;
  int* cnt = counters + ci * (groups > 1 ? groups + 1 : 1);  // [top, group 0, group 1, ...]
  auto arrive = [&](int* c, int expected) {  // true in every thread of the block that arrives last
    __threadfence();
    __syncthreads();
    bool last = false;
    if (tid == 0) {
      last = atomicAdd(c, 1) == expected - 1;
      if (last) *c = 0;  // every block has arrived: ready for the next launch
    }
    if (!__syncthreads_or(last)) return false;
    __threadfence();
    return true;
  };
  const int grp = split / kMergeGroup;
  const int first = grp * kMergeGroup, members = min(kMergeGroup, num_splits - first);
  if (groups > 1) {
    if (!arrive(cnt + 1 + grp, members)) return;
    merge_splits<T, D, HPB>(part_o, part_lse, nullptr, nullptr, pipe, si, kvh, hc, group, num_heads, num_splits,
                            first, 1, members, row);
    if (!arrive(cnt, groups)) return;
    merge_splits<T, D, HPB>(part_o, part_lse, out, lse, pipe, si, kvh, hc, group, num_heads, num_splits, 0,
                            kMergeGroup, groups, row);
  } else {
    if (!arrive(cnt, num_splits)) return;
    merge_splits<T, D, HPB>(part_o, part_lse, out, lse, pipe, si, kvh, hc, group, num_heads, num_splits, 0, 1,
                            num_splits, row);
  }
}


// The split merge as a launch of its own, for blocks of many heads (16 or 32: MQA): there the
// last-arriving block would merge S x HPB x D fp32 partials alone through a few loads in flight
// per thread, two levels in turn (~20 us of a 49 us MQA call, NOTES_decode.md v6), while here every
// (head, sequence) is a block and all of them read at once. Same arithmetic as merge_splits.
// Grid (H_r, n); block kThreads: thread (quad c = tid % D4, residue r = tid / D4) sums channels
// 4c..4c+3 over splits r, r + P, ... (P = kThreads / D4), then the P partial sums are added.
template <typename T, int D>
__global__ void __launch_bounds__(decode::kThreads) decode_merge_kernel(
    const float* __restrict__ part_o,    // [n, H_r, num_splits, D] normalised split outputs
    const float* __restrict__ part_lse,  // [n, H_r, num_splits] their base-2 lse (-inf: no keys)
    T* __restrict__ out,                 // [T, H_r, D] at the sequences' rows
    float* __restrict__ lse,             // [T, H_r] natural log
    const int* __restrict__ seq_ids,     // [n] the sequences served
    const int* __restrict__ cu_seqlens,  // [B+1] a sequence's token row
    int num_heads, int num_splits) {
  using namespace decode;
  constexpr int D4 = D / 4;
  constexpr int P = kThreads / D4;  // split residues (idle threads past P * D4)
  constexpr int kBatch = 16;        // independent loads in flight per thread
  static_assert(P >= 1, "a row of float4 must fit the block");
  constexpr int kMaxSplits = 512;    // cuda_plan.MAX_SPLITS
  __shared__ float w[kMaxSplits];   // lse, then weights
  __shared__ float4 red[P][D4];
  __shared__ float stat[2];         // max, sum
  const int tid = threadIdx.x, head = blockIdx.x, si = blockIdx.y;
  const long long pb = ((long long)si * num_heads + head) * num_splits;  // split 0 of this head
  for (int k = tid; k < num_splits; k += kThreads) w[k] = __ldcg(part_lse + pb + k);
  __syncthreads();
  if (tid < 32) {
    float mx = kNegInf;
    for (int k = tid; k < num_splits; k += 32) mx = fmaxf(mx, w[k]);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float mu = mx == kNegInf ? 0.f : mx;
    float sum = 0.f;
    for (int k = tid; k < num_splits; k += 32) sum += exp2f(w[k] - mu);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (tid == 0) {
      stat[0] = mu;
      stat[1] = sum;
    }
  }
  __syncthreads();
  const float mu = stat[0], sum = stat[1];
  for (int k = tid; k < num_splits; k += kThreads) w[k] = sum > 0.f ? exp2f(w[k] - mu) / sum : 0.f;
  __syncthreads();
  const int c = tid % D4, r = tid / D4;
  if (r < P) {
    const float4* src = reinterpret_cast<const float4*>(part_o + pb * D) + c;  // split k at src[k * D4]
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k0 = r; k0 < num_splits; k0 += P * kBatch) {
      float4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int k = k0 + u * P;
        if (k < num_splits) v[u] = __ldcg(src + (long long)k * D4);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int k = k0 + u * P;
        if (k < num_splits && w[k] > 0.f) {  // empty splits (weight 0) add nothing
          o.x = fmaf(w[k], v[u].x, o.x);
          o.y = fmaf(w[k], v[u].y, o.y);
          o.z = fmaf(w[k], v[u].z, o.z);
          o.w = fmaf(w[k], v[u].w, o.w);
        }
      }
    }
    red[r][c] = o;
  }
  __syncthreads();
  if (tid < D4) {
    float4 o = red[0][tid];
#pragma unroll
    for (int j = 1; j < P; ++j) {
      o.x += red[j][tid].x;
      o.y += red[j][tid].y;
      o.z += red[j][tid].z;
      o.w += red[j][tid].w;
    }
    const long long orow = (long long)cu_seqlens[seq_ids[si]] * num_heads + head;
    T* dst = out + orow * D + 4 * tid;
    dst[0] = from_float<T>(o.x);
    dst[1] = from_float<T>(o.y);
    dst[2] = from_float<T>(o.z);
    dst[3] = from_float<T>(o.w);
    if (tid == 0) lse[orow] = sum > 0.f ? (mu + log2f(sum)) * kLn2 : kNegInf;
  }
}

}  // namespace tp
