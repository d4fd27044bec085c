// Hand-written inline-PTX wrappers for the Hopper (sm_90a) machinery: warpgroup MMAs (wgmma),
// shared-memory matrix descriptors, bulk tensor copies (TMA) completing on mbarriers, register
// re-allocation between warpgroups and the fences that order them.
//
// Why hand-written PTX and not CUTLASS/CuTe: NVRTC compiles these in seconds, and the only
// host-side piece (the tensor map) is encoded in Python (tp_runtime/backends/cuda_tma.py).
// wgmma and setmaxnreg exist only on the arch-specific target sm_90a: a kernel using them guards
// its body with TP_HOPPER_ENABLED (defined below) so sm_80/sm_90 passes of launch/check_kernels
// compile an empty body, and its family in compile.FAMILIES is built with -arch=sm_90a.
//
// Layout conventions used throughout (128-byte swizzle, 16-bit elements):
//   A "swizzled tile" holds R rows of 64 elements (128 bytes) each: row r at byte r·128, its
//   16-byte chunk c stored at chunk position c ^ (r % 8). Eight rows (1024 bytes) form one swizzle
//   atom; the hardware applies the XOR on address bits [4,7) ^ [7,10), so a tile starts 1024-byte
//   aligned. A row of D = 128 elements is two such tiles, [0, 64) then [64, 128), R·128 bytes apart
//   -- exactly what a TMA load of a {64, R} box with CU_TENSOR_MAP_SWIZZLE_128B writes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// wgmma / setmaxnreg are only assembled for sm_90a ("arch-specific features").
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TP_HOPPER_ENABLED 1
#else
#define TP_HOPPER_ENABLED 0
#endif
// At run time (NVRTC, -DTP_NVRTC) an empty body would be a silent wrong answer: refuse to build it.
#if defined(TP_NVRTC) && defined(__CUDA_ARCH__) && !TP_HOPPER_ENABLED
#error "the Hopper kernels need -arch=sm_90a (compile.FAMILIES arch); this compile targets another architecture"
#endif

namespace tp {
namespace hopper {

// Fixed-width names of our own: NVRTC has no C library headers (no <stdint.h>).
using u32 = unsigned int;
using u64 = unsigned long long;

// The 128-byte CUtensorMap of the driver API, opaque here (encoded on the host by
// cuTensorMapEncodeTiled and passed by value as a `const __grid_constant__` kernel parameter, so it
// stays in the parameter space where the TMA unit can read it).
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

// The first 1024-byte aligned byte at or after `p` (the start of dynamic shared memory is not
// guaranteed to be 1024-byte aligned; the launcher allocates kSmemAlign extra bytes for this).
constexpr int kSmemAlign = 1024;
__device__ __forceinline__ unsigned char* align_smem(unsigned char* p) {
  return p + ((kSmemAlign - (smem_addr(p) & (kSmemAlign - 1))) & (kSmemAlign - 1));
}

// Byte offset of element (row, col) of a swizzled tile of 64-element rows (see the file comment);
// for 16-bit elements, col in [0, 64).
__device__ __forceinline__ u32 swizzle128(int row, int col) {
  const int chunk = (col >> 3) ^ (row & 7);
  return static_cast<u32>(row * 128 + chunk * 16 + (col & 7) * 2);
}

// ---------------------------------------------------------------------------------------------
// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format" for wgmma), 64 bits:
//   bits  0-13  start address >> 4 (shared-window byte address; 16-byte aligned)
//   bits 16-29  leading-dimension byte offset (LBO) >> 4
//   bits 32-45  stride-dimension byte offset (SBO) >> 4
//   bits 49-51  base offset: the start address's phase inside the 1024-byte swizzle pattern; 0
//               because every tile here starts 1024-byte aligned (an address advanced inside the
//               atom, as below, keeps base offset 0: the hardware swizzles absolute address bits)
//   bits 62-63  swizzle mode: 0 none, 1 = 128-byte, 2 = 64-byte, 3 = 32-byte
// Meaning of LBO/SBO for the two operand majors with 128-byte swizzle (16-bit elements, units of
// one 16-byte chunk = 8 elements; CUTLASS's canonical GMMA layouts):
//   K-major   ((8 rows, m), (8 elems, 2)) : rows 128 B apart; SBO = 1024 B between groups of 8
//             rows (M or N direction); the 16 K-elements of one MMA are 32 contiguous bytes of the
//             row, so LBO is unused (set to 1 by convention). Next k16 step: start + 32 B inside
//             the 128-byte row; past 64 elements: the next tile (start + R·128 B).
//   MN-major  ((64 elems, n), (8 k-rows, k)) : 64 MN-elements contiguous in a 128-byte row, one
//             row per K index; LBO = byte distance between 64-element MN groups (the next tile:
//             R·128 B), SBO = 1024 B between groups of 8 K-rows. Next k16 step: start + 16·128 B.
__device__ __forceinline__ u64 desc_encode(u32 x) { return static_cast<u64>((x & 0x3FFFF) >> 4); }

__device__ __forceinline__ u64 make_desc_sw128(u32 smem_byte_addr, u32 lbo_bytes, u32 sbo_bytes) {
  return desc_encode(smem_byte_addr) | desc_encode(lbo_bytes) << 16 | desc_encode(sbo_bytes) << 32 |
         static_cast<u64>(1) << 62;
}

// K-major operand (Q or K rows, D contiguous): k16 step `k` of a tile of `rows` rows whose
// 64-element column blocks lie rows·128 B apart.
__device__ __forceinline__ u64 desc_k_major(u32 tile_addr, int rows, int k) {
  return make_desc_sw128(tile_addr + (k >> 2) * rows * 128 + (k & 3) * 32, 16, 1024);
}

// MN-major operand (V stored [keys][D]: N = D contiguous, K = keys): k16 step `k`, tile of `rows`
// key rows whose 64-element D blocks lie rows·128 B apart (= LBO).
__device__ __forceinline__ u64 desc_mn_major(u32 tile_addr, int rows, int k) {
  return make_desc_sw128(tile_addr + k * 16 * 128, rows * 128, 1024);
}

// ---------------------------------------------------------------------------------------------
// wgmma: issued by all 128 threads of a warpgroup (4 consecutive warps, the first a multiple of
// 4). Accumulator layout of m64nNk16 with fp32 results (N/2 registers per thread): warp w of the
// group owns rows 16w..16w+15; for each 8-column block j, d[4j+0..1] = row 16w + lane/4, columns
// 8j + 2·(lane%4) + {0,1}; d[4j+2..3] the same columns of row +8 (the mma.sync m16n8 C layout).
// The A fragment from registers (4 × b32 = 8 halves) is the m16n8k16 A layout for the warp's 16 rows:
// a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, same), a[2] = (row g, cols 8+2t..), a[3] = (row g+8,
// cols 8+2t..), g = lane/4, t = lane%4. So the fp32 accumulators of columns 16k..16k+15 packed in
// pairs are exactly the A fragment of k16 step k (P = softmax(S) feeds P·V without shared memory).

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed wgmma groups are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Pin accumulator registers across the asynchronous window: the compiler must not move reads or
// writes of them over a wgmma issue / wait (else ptxas serialises the wgmma, warning C7510/C7514).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_operands(u32 (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// Wgmma<N, T>: m64nNk16, T operands (fp16 or bf16), fp32 accumulators d[N/2]; `accumulate` 0
// overwrites d (first k step), 1 adds.
template <int N, typename T>
struct Wgmma;

// The accumulator operands of m64n64 (32 registers per thread) and m64n128 (64): the register list
// of the instruction text and the matching "+f" constraints, spelled once for all four variants.
#define TP_WGMMA_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define TP_WGMMA_D32_OUT "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define TP_WGMMA_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define TP_WGMMA_D64_OUT "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// One specialisation: N, the C++ operand type, its PTX name, the accumulator list and constraints,
// and the operand numbers after the accumulators (o0.. o6): SS takes desc A = o0, desc B = o1, the
// scale-d flag = o2; RS takes the A fragment o0..o3, desc B = o4, the scale-d flag = o5, tnspB = o6.
#define TP_WGMMA(N, T, PTX, D, D_OUT, o0, o1, o2, o3, o4, o5, o6)                                        \
  template <>                                                                                           \
  struct Wgmma<N, T> {                                                                                  \
    /* d += A·B, A and B from shared-memory descriptors (both K-major: tnspA = tnspB = 0). */           \
    __device__ __forceinline__ static void ss(float (&d)[N / 2], u64 desc_a, u64 desc_b, int accumulate) { \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #o2 ", 0;\n"                                    \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " D ", "             \
                   "%" #o0 ", %" #o1 ", p, 1, 1, 0, 0;\n}\n"                                            \
                   : D_OUT                                                                              \
                   : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                        \
    }                                                                                                   \
    /* d += A·B, A from registers (the m16n8k16 A fragment of the warp's 16 rows), B from a          \
       descriptor; kTransB = 1: B is MN-major (V stored [keys][D] for P·V), 0: K-major. */             \
    template <int kTransB>                                                                              \
    __device__ __forceinline__ static void rs(float (&d)[N / 2], const u32 (&a)[4], u64 desc_b,         \
                                              int accumulate) {                                         \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #o5 ", 0;\n"                                    \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " D ", "             \
                   "{%" #o0 ", %" #o1 ", %" #o2 ", %" #o3 "}, %" #o4 ", p, 1, 1, %" #o6 ";\n}\n"        \
                   : D_OUT                                                                              \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),         \
                     "n"(kTransB));                                                                     \
    }                                                                                                   \
  };

TP_WGMMA(64, __half, "f16", TP_WGMMA_D32, TP_WGMMA_D32_OUT, 32, 33, 34, 35, 36, 37, 38)
TP_WGMMA(64, __nv_bfloat16, "bf16", TP_WGMMA_D32, TP_WGMMA_D32_OUT, 32, 33, 34, 35, 36, 37, 38)
TP_WGMMA(128, __half, "f16", TP_WGMMA_D64, TP_WGMMA_D64_OUT, 64, 65, 66, 67, 68, 69, 70)
TP_WGMMA(128, __nv_bfloat16, "bf16", TP_WGMMA_D64, TP_WGMMA_D64_OUT, 64, 65, 66, 67, 68, 69, 70)
#undef TP_WGMMA
#undef TP_WGMMA_D32
#undef TP_WGMMA_D32_OUT
#undef TP_WGMMA_D64
#undef TP_WGMMA_D64_OUT

// Pack two fp32 into one b32 of two 16-bit T (low half = first), round to nearest.
template <typename T>
__device__ __forceinline__ u32 pack2(float lo, float hi);
template <>
__device__ __forceinline__ u32 pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<u32*>(&v);
}
template <>
__device__ __forceinline__ u32 pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<u32*>(&v);
}

// ---------------------------------------------------------------------------------------------
// mbarrier (64-bit shared-memory object, 8-byte aligned): `count` arrivals complete a phase, and
// a transaction count lets TMA bytes complete it too. Waiters poll a phase parity bit.
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Make initialised barriers visible to the async proxy (TMA) before any copy names them.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arrive once and announce `bytes` of transactions (the TMA loads of this phase) in one step.
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Block until the phase with parity `parity` (0 or 1) has completed.
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "TP_MBAR_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra TP_MBAR_WAIT;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// ---------------------------------------------------------------------------------------------
// TMA: bulk tensor tile loads global -> shared described by a tensor map, completing on `bar`
// (its transaction count must have been raised by the box's bytes). Coordinates are in elements,
// innermost first; out-of-range parts of the box are filled with zeros.
__device__ __forceinline__ void tma_prefetch_map(const TensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(map)) : "memory");
}
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, u64* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(void* dst, const TensorMap* map, u64* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
}

// cp.async (16 bytes, global -> shared, bypassing L1) whose completion is reported to an mbarrier:
// after issuing its copies a thread calls cp_async_arrive_noinc(bar), which arrives on `bar` once
// all of this thread's earlier cp.async have landed (noinc: the arrival is one of the count the
// barrier was initialised with). The data is written by the generic proxy: a thread that then
// reads it with wgmma (async proxy) issues fence_proxy_async() after its barrier wait.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_arrive_noinc(u64* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Order this thread's ordinary (generic-proxy) shared-memory accesses before its later async-proxy
// ones (wgmma operands, TMA stores) of the same bytes: a writing thread fences, then the threads
// synchronise; for data written by other threads' cp.async, each reading thread fences after the
// mbarrier wait that made the data visible to it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Register re-allocation between warpgroups (sm_90a): takes effect only with a register cap at
// kernel entry (__launch_bounds__(threads, 1)) and each role in one branch of an if/else.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Arrive at named barrier `id` without waiting (the producer side of a bar.sync by other threads).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace hopper
}  // namespace tp
