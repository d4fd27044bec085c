// Custom all-reduce over CUDA-IPC buffers (tp_runtime/distributed/custom_all_reduce.py).
//
// Every rank copies its input into its own registered buffer; the peers' buffers are mapped into
// every process (cudaIpcOpenMemHandle), so a kernel reads them directly (NVLink, or the same device).
//   one-shot: every rank reads all ranks' buffers, sums in fp32 in rank order 0..n-1, adds the bias
//             (once) and the residual, writes its output. The same order on every rank gives the same
//             bits on every rank.
//   two-shot: reduce-scatter: rank r sums its 1/n slice from all ranks (same order, same epilogue) and
//             writes it back into its own buffer (only rank r ever reads slice r of its own buffer in
//             that stage, so in place is safe); barrier; all-gather: everyone copies slice s from rank
//             s's buffer. The result is computed once and copied, so it is bit-identical everywhere
//             and equal to the one-shot result.
//
// Cross-GPU barrier: per (block, peer) a generation counter in this rank's signal memory, bumped by
// the kernel itself (so nothing is reset and a CUDA-graph replay is safe), published to the peer's
// flag slot with st.release.sys and awaited with ld.acquire.sys. A waiter accepts any generation at
// or past its own (wrap-safe difference): a peer can be at most one barrier ahead, since it cannot
// pass the next barrier without us. Spins are bounded by %globaltimer: after `timeout_ns` the
// waiting thread writes the rank it waited for and an error code into host-mapped memory, the whole
// block returns, and the host names the collective and ends the job. Blocks pair with the same block
// index on every rank; the thread -> element mapping is identical in both two-shot stages, so block b's
// barrier covers exactly the data block b exchanges.
//
// Compile-time variants: element type (fp16, bf16: fp32 accumulate; fp32) x one-/two-shot, all
// instantiated at the end of this file (NVRTC takes them by name expression).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tp {
namespace ar {

constexpr int kMaxRanks = 8;
constexpr int kMaxBlocks = 36;    // enough to saturate the links; more only adds barrier traffic
constexpr int kThreads = 512;
constexpr int kSliceAlign = 8;    // two-shot slices start at 128-B boundaries (8 packs of 16 B)

// Per-rank signal memory (zeroed once at start-up).
struct Signal {
  unsigned int gen[kMaxBlocks][kMaxRanks];   // own: barriers passed by block b with peer t
  unsigned int flag[kMaxBlocks][kMaxRanks];  // written by peers: flag[b][from] = their generation
};

// Every rank's buffer and signal pointers, as mapped in this process; passed by value (128 B).
struct Peers {
  unsigned long long data[kMaxRanks];
  unsigned long long signal[kMaxRanks];
};

// error[0]: 0 = fine, 1 = a barrier timed out; error[1]: the rank waited for; error[2]: its generation.
constexpr unsigned int kTimedOut = 1;

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void store_release(unsigned int* p, unsigned int v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned int load_acquire(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// All ranks' block blockIdx.x meet. Returns false (in every thread of the block) on a timeout.
__device__ __forceinline__ bool barrier(const Peers& peers, int rank, int nranks, unsigned long long timeout_ns,
                                        volatile unsigned int* error) {
  int failed = 0;
  __syncthreads();  // every thread's writes of the previous stage precede the release below
  if (threadIdx.x < nranks) {
    const int peer = threadIdx.x;
    Signal* self = reinterpret_cast<Signal*>(peers.signal[rank]);
    Signal* other = reinterpret_cast<Signal*>(peers.signal[peer]);
    const unsigned int g = self->gen[blockIdx.x][peer] + 1;
    self->gen[blockIdx.x][peer] = g;
    __threadfence_system();
    store_release(&other->flag[blockIdx.x][rank], g);
    const unsigned long long t0 = globaltimer();
    while (static_cast<int>(load_acquire(&self->flag[blockIdx.x][peer]) - g) < 0) {
      if (globaltimer() - t0 > timeout_ns) {
        // Several threads may report; each writes a rank it really waited for. No atomics:
        // system-scope atomics on host memory are not available over PCIe.
        error[1] = peer;
        error[2] = g;
        __threadfence_system();
        error[0] = kTimedOut;
        __threadfence_system();
        failed = 1;
        break;
      }
    }
  }
  return __syncthreads_or(failed) == 0;
}

template <typename T>
struct Pack {
  static constexpr int kElems = 16 / sizeof(T);
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__device__ __forceinline__ void accumulate(float (&acc)[Pack<T>::kElems], int4 v) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < Pack<T>::kElems; ++j) acc[j] += to_float(e[j]);
}

// The rank-ordered fp32 sum of pack p over all ranks' buffers (L1 bypassed: peers rewrite them).
template <typename T>
__device__ __forceinline__ void sum_pack(const Peers& peers, int nranks, long long p, float (&acc)[Pack<T>::kElems]) {
  int4 v[kMaxRanks];
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r)
    if (r < nranks) v[r] = __ldcg(reinterpret_cast<const int4*>(peers.data[r]) + p);
#pragma unroll
  for (int j = 0; j < Pack<T>::kElems; ++j) acc[j] = 0.f;
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r)
    if (r < nranks) accumulate<T>(acc, v[r]);
}

// Epilogue of element i (sum already in x): + bias[i % hidden] once, + residual[i]; rounded once.
template <typename T>
__device__ __forceinline__ float epilogue(float x, long long i, const T* bias, long long hidden, const T* residual) {
  if (bias != nullptr) x += to_float(bias[i % hidden]);
  if (residual != nullptr) x += to_float(residual[i]);
  return x;
}

template <typename T>
__device__ __forceinline__ int4 finish_pack(const float (&acc)[Pack<T>::kElems], long long p, const T* bias,
                                            long long hidden, const T* residual) {
  constexpr int E = Pack<T>::kElems;
  int4 out;
  T* o = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int j = 0; j < E; ++j) o[j] = from_float<T>(epilogue(acc[j], p * E + j, bias, hidden, residual));
  return out;
}

// Store pack p to `out`: one 16-B store where `out` is 16-B aligned, else element by element.
template <typename T>
__device__ __forceinline__ void store_pack(T* out, long long p, int4 v, bool aligned) {
  if (aligned) {
    reinterpret_cast<int4*>(out)[p] = v;
  } else {
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < Pack<T>::kElems; ++j) out[p * Pack<T>::kElems + j] = e[j];
  }
}

// numel elements: npacks full 16-B packs, then `numel % E` tail elements handled by block 0.
//   out [numel] (may be any tensor but the registered buffers), bias [hidden] or null,
//   residual [numel] or null; out_aligned: out is 16-B aligned.
template <typename T, bool kTwoShot>
__global__ void __launch_bounds__(kThreads, 1)
    all_reduce_kernel(const __grid_constant__ Peers peers, int rank, int nranks, T* __restrict__ out, const T* __restrict__ bias,
                      long long hidden, const T* __restrict__ residual, long long numel, int out_aligned,
                      unsigned long long timeout_ns, unsigned int* error_word) {
  constexpr int E = Pack<T>::kElems;
  volatile unsigned int* error = error_word;
  const bool aligned = out_aligned != 0;
  const long long npacks = numel / E;
  const int tail = static_cast<int>(numel % E);
  const long long tail_start = npacks * E;
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const bool tail_thread = blockIdx.x == 0 && threadIdx.x < tail;

  if (!barrier(peers, rank, nranks, timeout_ns, error)) return;  // every rank's input is in place

  if constexpr (!kTwoShot) {
    for (long long p = first; p < npacks; p += stride) {
      float acc[E];
      sum_pack<T>(peers, nranks, p, acc);
      store_pack(out, p, finish_pack<T>(acc, p, bias, hidden, residual), aligned);
    }
    if (tail_thread) {
      const long long i = tail_start + threadIdx.x;
      float x = 0.f;
      for (int r = 0; r < nranks; ++r) x += to_float(__ldcg(reinterpret_cast<const T*>(peers.data[r]) + i));
      out[i] = from_float<T>(epilogue(x, i, bias, hidden, residual));
    }
  } else {
    // Slice s: packs [s * chunk, min((s + 1) * chunk, npacks)); the tail belongs to rank n-1.
    long long chunk = (npacks + nranks - 1) / nranks;
    chunk = (chunk + kSliceAlign - 1) / kSliceAlign * kSliceAlign;
    const long long mine = static_cast<long long>(rank) * chunk;
    const long long mine_end = mine + chunk < npacks ? mine + chunk : npacks;
    int4* own = reinterpret_cast<int4*>(peers.data[rank]);
    for (long long k = first; mine + k < mine_end; k += stride) {
      float acc[E];
      sum_pack<T>(peers, nranks, mine + k, acc);
      own[mine + k] = finish_pack<T>(acc, mine + k, bias, hidden, residual);
    }
    if (tail_thread && rank == nranks - 1) {
      const long long i = tail_start + threadIdx.x;
      float x = 0.f;
      for (int r = 0; r < nranks; ++r) x += to_float(__ldcg(reinterpret_cast<const T*>(peers.data[r]) + i));
      reinterpret_cast<T*>(own)[i] = from_float<T>(epilogue(x, i, bias, hidden, residual));
    }

    if (!barrier(peers, rank, nranks, timeout_ns, error)) return;  // every slice is reduced

    for (long long k = first; k < chunk; k += stride) {
      int4 v[kMaxRanks];
#pragma unroll
      for (int s = 0; s < kMaxRanks; ++s)
        if (s < nranks && s * chunk + k < npacks) v[s] = __ldcg(reinterpret_cast<const int4*>(peers.data[s]) + s * chunk + k);
#pragma unroll
      for (int s = 0; s < kMaxRanks; ++s)
        if (s < nranks && s * chunk + k < npacks) store_pack(out, s * chunk + k, v[s], aligned);
    }
    if (tail_thread) {
      const long long i = tail_start + threadIdx.x;
      out[i] = __ldcg(reinterpret_cast<const T*>(peers.data[nranks - 1]) + i);
    }
  }

  barrier(peers, rank, nranks, timeout_ns, error);  // nobody reads a buffer its owner may now refill
}

#define TP_AR_INSTANCE(T, TWO)                                                                                 \
  template __global__ void all_reduce_kernel<T, TWO>(const __grid_constant__ Peers, int, int, T*, const T*, long long, \
                                                     const T*, long long, int, unsigned long long, unsigned int*);
TP_AR_INSTANCE(float, false)
TP_AR_INSTANCE(float, true)
TP_AR_INSTANCE(__half, false)
TP_AR_INSTANCE(__half, true)
TP_AR_INSTANCE(__nv_bfloat16, false)
TP_AR_INSTANCE(__nv_bfloat16, true)
#undef TP_AR_INSTANCE

}  // namespace ar
}  // namespace tp
