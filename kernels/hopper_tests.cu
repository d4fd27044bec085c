// Micro-kernels that test ONE Hopper building block of kernels/hopper.cuh each, bit-exact against
// torch (tests/gpu/test_hopper_blocks.py), so a wrong descriptor, swizzle or tensor map is caught
// on its own before it hides inside the context kernel. One warpgroup (128 threads), one block; the
// launcher adds kSmemAlign bytes of dynamic shared memory for the in-kernel 1024-byte alignment.
// Bodies exist only on sm_90a (TP_HOPPER_ENABLED); other targets compile empty kernels.
#include "hopper.cuh"

namespace tp {
namespace hopper_tests {
using namespace tp::hopper;

// Copy a row-major [rows, D] matrix into the swizzled-tile layout of hopper.cuh (D/64 tiles of
// 64-element rows, rows·128 bytes apart) with ordinary stores, then fence for the async proxy.
template <typename T, int D>
__device__ void to_swizzled(const T* src, int rows, unsigned char* tile) {
  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
    const int r = i / D, c = i % D;
    *reinterpret_cast<T*>(tile + (c / 64) * rows * 128 + swizzle128(r, c % 64)) = src[i];
  }
  fence_proxy_async();
  __syncthreads();
}

// Write the m64nN fp32 accumulators of the warpgroup to out [64, N] row-major.
template <int N>
__device__ void store_acc(const float (&d)[N / 2], float* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = 16 * warp + lane / 4, col = 2 * (lane % 4);
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
    out[row * N + 8 * j + col] = d[4 * j];
    out[row * N + 8 * j + col + 1] = d[4 * j + 1];
    out[(row + 8) * N + 8 * j + col] = d[4 * j + 2];
    out[(row + 8) * N + 8 * j + col + 1] = d[4 * j + 3];
  }
}

// S [64, N] = Q [64, D] · K [N, D]ᵀ: both operands K-major from swizzled shared memory (SS wgmma),
// D/16 k steps advancing the descriptors inside and across the 64-element tiles.
template <typename T, int N, int D>
__global__ void __launch_bounds__(128, 1) wgmma_ss_kernel(const T* q, const T* k, float* s) {
#if TP_HOPPER_ENABLED
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* sq = align_smem(smem_raw);                // [D/64][64 rows][128 B]
  unsigned char* sk = sq + 64 * D * 2;   // [D/64][N rows][128 B]; 64·D·2 is a multiple of 1024
  to_swizzled<T, D>(q, 64, sq);
  to_swizzled<T, D>(k, N, sk);
  float d[N / 2];
  fence_operands(d);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    Wgmma<N, T>::ss(d, desc_k_major(smem_addr(sq), 64, kk), desc_k_major(smem_addr(sk), N, kk), kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(d);
  store_acc<N>(d, s);
#endif
}

// O [64, N] = P [64, K] · V [K, N]: P from registers (A fragments read straight from global), V
// row-major [keys, N] in swizzled shared memory read MN-major (transposed B), K/16 k steps.
template <typename T, int N, int K>
__global__ void __launch_bounds__(128, 1) wgmma_rs_kernel(const T* p, const T* v, float* o) {
#if TP_HOPPER_ENABLED
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = align_smem(smem_raw);
  to_swizzled<T, N>(v, K, smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const u32* p32 = reinterpret_cast<const u32*>(p);  // pairs of T along a row
  const int row = 16 * warp + g;
  float d[N / 2];
  fence_operands(d);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    u32 a[4];
    a[0] = p32[(row * K + 16 * kk + 2 * t) / 2];
    a[1] = p32[((row + 8) * K + 16 * kk + 2 * t) / 2];
    a[2] = p32[(row * K + 16 * kk + 8 + 2 * t) / 2];
    a[3] = p32[((row + 8) * K + 16 * kk + 8 + 2 * t) / 2];
    wgmma_fence();
    Wgmma<N, T>::template rs<1>(d, a, desc_mn_major(smem_addr(smem), K, kk), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
  }
  fence_operands(d);
  store_acc<N>(d, o);
#endif
}

// One TMA load of a {64, rows} box at (c0, c1) of a 2-D tensor map with 128-byte swizzle into
// shared memory, then the block un-swizzles it into out [rows, 64] (zeros where the box left the
// tensor). Tests the tensor map, the mbarrier transaction count and the swizzle function together.
template <typename T>
__global__ void __launch_bounds__(128, 1) tma_load_kernel(const __grid_constant__ TensorMap map, int rows, int c0,
                                                          int c1, T* out) {
#if TP_HOPPER_ENABLED
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = align_smem(smem_raw);  // [rows][128 B] tile, then the barrier
  u64* bar = reinterpret_cast<u64*>(smem + rows * 128);
  if (threadIdx.x == 0) {
    mbar_init(bar, 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    tma_prefetch_map(&map);
    mbar_arrive_expect_tx(bar, static_cast<u32>(rows * 128));
    tma_load_2d(smem, &map, bar, c0, c1);
  }
  mbar_wait(bar, 0);
  for (int i = threadIdx.x; i < rows * 64; i += blockDim.x) {
    out[i] = *reinterpret_cast<const T*>(smem + swizzle128(i / 64, i % 64));
  }
#endif
}

// S = Q·Kᵀ (SS wgmma) kept in registers, converted to T and fed back as the A operand of O = S·V
// (RS wgmma, V MN-major): the context kernel's S -> P fragment reuse, without the softmax.
template <typename T, int D, int BN>
__global__ void __launch_bounds__(128, 1) qk_pv_kernel(const T* q, const T* k, const T* v, float* o) {
#if TP_HOPPER_ENABLED
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* sq = align_smem(smem_raw);  // [D/64][64][128 B]
  unsigned char* sk = sq + 64 * D * 2;       // [D/64][BN][128 B]
  unsigned char* sv = sk + BN * D * 2;       // [D/64][BN][128 B]
  to_swizzled<T, D>(q, 64, sq);
  to_swizzled<T, D>(k, BN, sk);
  to_swizzled<T, D>(v, BN, sv);
  float s[BN / 2];
  fence_operands(s);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    Wgmma<BN, T>::ss(s, desc_k_major(smem_addr(sq), 64, kk), desc_k_major(smem_addr(sk), BN, kk), kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(s);
  u32 p[BN / 16][4];
#pragma unroll
  for (int i = 0; i < BN / 2; i += 2) p[i >> 3][(i >> 1) & 3] = pack2<T>(s[i], s[i + 1]);
  float d[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) d[i] = 0.f;
  fence_operands(d);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    Wgmma<D, T>::template rs<1>(d, p[kk], desc_mn_major(smem_addr(sv), BN, kk), 1);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(d);
  store_acc<D>(d, o);
#endif
}

// One TMA load of a {64, 1, rows} box at (c0, c1, c2) of a 3-D tensor map (the context kernel's Q
// map: {D, heads, tokens}); out [rows, 64] un-swizzled, zeros outside the tensor.
template <typename T>
__global__ void __launch_bounds__(128, 1) tma_load_3d_kernel(const __grid_constant__ TensorMap map, int rows, int c0,
                                                             int c1, int c2, T* out) {
#if TP_HOPPER_ENABLED
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = align_smem(smem_raw);
  u64* bar = reinterpret_cast<u64*>(smem + rows * 128);
  if (threadIdx.x == 0) {
    mbar_init(bar, 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(bar, static_cast<u32>(rows * 128));
    tma_load_3d(smem, &map, bar, c0, c1, c2);
  }
  mbar_wait(bar, 0);
  for (int i = threadIdx.x; i < rows * 64; i += blockDim.x) {
    out[i] = *reinterpret_cast<const T*>(smem + swizzle128(i / 64, i % 64));
  }
#endif
}

}  // namespace hopper_tests
}  // namespace tp

// The variants tests/gpu/test_hopper_blocks.py runs (explicit, so launch/check_kernels compiles them).
namespace tp {
namespace hopper_tests {
template __global__ void wgmma_ss_kernel<__half, 64, 64>(const __half*, const __half*, float*);
template __global__ void wgmma_ss_kernel<__half, 128, 128>(const __half*, const __half*, float*);
template __global__ void wgmma_ss_kernel<__half, 128, 64>(const __half*, const __half*, float*);
template __global__ void wgmma_ss_kernel<__half, 64, 128>(const __half*, const __half*, float*);
template __global__ void wgmma_rs_kernel<__half, 64, 64>(const __half*, const __half*, float*);
template __global__ void wgmma_rs_kernel<__half, 128, 64>(const __half*, const __half*, float*);
template __global__ void wgmma_rs_kernel<__half, 128, 128>(const __half*, const __half*, float*);
template __global__ void tma_load_kernel<__half>(const __grid_constant__ TensorMap, int, int, int, __half*);
template __global__ void wgmma_ss_kernel<__nv_bfloat16, 64, 64>(const __nv_bfloat16*, const __nv_bfloat16*, float*);
template __global__ void wgmma_ss_kernel<__nv_bfloat16, 128, 128>(const __nv_bfloat16*, const __nv_bfloat16*, float*);
template __global__ void wgmma_ss_kernel<__nv_bfloat16, 128, 64>(const __nv_bfloat16*, const __nv_bfloat16*, float*);
template __global__ void wgmma_ss_kernel<__nv_bfloat16, 64, 128>(const __nv_bfloat16*, const __nv_bfloat16*, float*);
template __global__ void wgmma_rs_kernel<__nv_bfloat16, 64, 64>(const __nv_bfloat16*, const __nv_bfloat16*, float*);
template __global__ void wgmma_rs_kernel<__nv_bfloat16, 128, 64>(const __nv_bfloat16*, const __nv_bfloat16*, float*);
template __global__ void wgmma_rs_kernel<__nv_bfloat16, 128, 128>(const __nv_bfloat16*, const __nv_bfloat16*, float*);
template __global__ void tma_load_kernel<__nv_bfloat16>(const __grid_constant__ TensorMap, int, int, int, __nv_bfloat16*);
template __global__ void qk_pv_kernel<__half, 64, 128>(const __half*, const __half*, const __half*, float*);
template __global__ void qk_pv_kernel<__half, 128, 128>(const __half*, const __half*, const __half*, float*);
template __global__ void tma_load_3d_kernel<__half>(const __grid_constant__ TensorMap, int, int, int, int, __half*);
template __global__ void qk_pv_kernel<__nv_bfloat16, 64, 128>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float*);
template __global__ void qk_pv_kernel<__nv_bfloat16, 128, 128>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float*);
template __global__ void tma_load_3d_kernel<__nv_bfloat16>(const __grid_constant__ TensorMap, int, int, int, int, __nv_bfloat16*);
}  // namespace hopper_tests
}  // namespace tp
