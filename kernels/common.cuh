// Helpers shared by every kernel: the storage types and their conversion to and from fp32.
//
// Kernels are templates over the storage type T (float, __half, __nv_bfloat16) and do
// their arithmetic in fp32: load with to_float / load2, compute, store with from_float /
// store2. Header-only and free of host includes, so NVRTC (cupy.RawModule, -std=c++17)
// and nvcc (launch/check_kernels) both compile it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef INFINITY  // NVRTC has no <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

namespace tp {

// Conversion rules of one storage type; specialised below for the three we support.
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
  // Two adjacent elements; the address must be aligned to two elements (8 bytes).
  __device__ __forceinline__ static float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
  __device__ __forceinline__ static void store2(float* p, float2 v) { *reinterpret_cast<float2*>(p) = v; }
};

template <>
struct Convert<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static float2 load2(const __half* p) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
  }
  __device__ __forceinline__ static void store2(__half* p, float2 v) {
    *reinterpret_cast<__half2*>(p) = __float22half2_rn(v);
  }
};

template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static float2 load2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
  __device__ __forceinline__ static void store2(__nv_bfloat16* p, float2 v) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __float22bfloat162_rn(v);
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return Convert<T>::to_float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return Convert<T>::from_float(x);
}

template <typename T>
__device__ __forceinline__ float2 load2(const T* p) {
  return Convert<T>::load2(p);
}

template <typename T>
__device__ __forceinline__ void store2(T* p, float2 v) {
  Convert<T>::store2(p, v);
}

}  // namespace tp
