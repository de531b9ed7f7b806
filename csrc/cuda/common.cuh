// Helpers shared by the CUDA kernels: accumulation types, warp/block reductions, vectorized row
// traversal and launch shapes. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h), so
// compiling these files needs the CUDA toolkit and torch's headers but no cuBLAS/cuSPARSE/cuSOLVER.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace icpo::cuda_impl {

// fp32 accumulation for fp32/fp16/bf16 inputs, fp64 for fp64 (matches the CPU kernels).
template <class T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }
// IEEE round-to-nearest division and square root even under --use_fast_math, so the group ops
// round like the CPU kernels and the PyTorch reference.
__device__ __forceinline__ float div_(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double sqrt_(double x) { return __dsqrt_rn(x); }

template <class T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// Every lane gets op() over the 32 lanes. Types without a shfl_xor overload (structs) provide one.
template <class T, class Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = op(v, shfl_xor(v, mask));
  return v;
}

// Every thread of the block gets op() over the block. blockDim.x must be a multiple of 32 (<= 1024)
// and every thread must call it (it synchronizes). Safe to call repeatedly: the leading barrier
// keeps one call's shared slots from being overwritten while another call still reads them.
template <class T, class Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T identity) {
  __shared__ T partial[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_allreduce(v, op);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < num_warps ? partial[lane] : identity;
  return warp_allreduce(v, op);
}

struct Sum {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// 16 bytes of T, for one vectorized load/store.
template <class T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T val[kSize];
};

// Elements before the first 16-byte boundary of x (x is always aligned to sizeof(T) by torch).
template <class T>
__device__ __forceinline__ int64_t unaligned_head(const T* x, int64_t n) {
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) % 16);
  const int64_t head = ((16 - misalign) % 16) / static_cast<int64_t>(sizeof(T));
  return head < n ? head : n;
}

// Calls f(i, x[i]) for every i in [0, n), split over the block's threads; the aligned middle of the
// row is read 16 bytes at a time. The order of calls per thread is not the index order.
template <class T, class F>
__device__ __forceinline__ void for_each_in_row(const T* __restrict__ x, int64_t n, F&& f) {
  constexpr int kVec = Pack<T>::kSize;
  const int64_t head = unaligned_head(x, n);
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) f(i, x[i]);
  const int64_t num_packs = (n - head) / kVec;
  const auto* packs = reinterpret_cast<const Pack<T>*>(x + head);
  for (int64_t j = threadIdx.x; j < num_packs; j += blockDim.x) {
    const Pack<T> p = packs[j];
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(head + j * kVec + k, p.val[k]);
  }
  for (int64_t i = head + num_packs * kVec + threadIdx.x; i < n; i += blockDim.x) f(i, x[i]);
}

// y[i] = f(i, x[i]) for i in [0, n). Vectorized when x and y share their offset from a 16-byte
// boundary (always for a contiguous input); plain coalesced scalar accesses otherwise.
template <class T, class F>
__device__ __forceinline__ void transform_row(const T* __restrict__ x, T* __restrict__ y, int64_t n,
                                              F&& f) {
  constexpr int kVec = Pack<T>::kSize;
  if (reinterpret_cast<uintptr_t>(x) % 16 != reinterpret_cast<uintptr_t>(y) % 16) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) y[i] = f(i, x[i]);
    return;
  }
  const int64_t head = unaligned_head(x, n);
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) y[i] = f(i, x[i]);
  const int64_t num_packs = (n - head) / kVec;
  const auto* in = reinterpret_cast<const Pack<T>*>(x + head);
  auto* out = reinterpret_cast<Pack<T>*>(y + head);
  for (int64_t j = threadIdx.x; j < num_packs; j += blockDim.x) {
    const Pack<T> p = in[j];
    Pack<T> q;
#pragma unroll
    for (int k = 0; k < kVec; ++k) q.val[k] = f(head + j * kVec + k, p.val[k]);
    out[j] = q;
  }
  for (int64_t i = head + num_packs * kVec + threadIdx.x; i < n; i += blockDim.x) y[i] = f(i, x[i]);
}

// Threads for one block working on one segment/group of about `avg_len` items: a warp for short
// ones (ICPO groups are ~5-16), up to `max_threads` for long ones. Always a multiple of 32.
inline int threads_for(int64_t avg_len, int max_threads) {
  int threads = 32;
  while (threads < max_threads && threads < avg_len) threads *= 2;
  return threads;
}

// One block per row/segment/group: the grid's x dimension must hold them all.
inline void check_grid(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "icpo CUDA kernels support at most ",
              std::numeric_limits<int32_t>::max(), " ", what, ", got ", blocks);
}

}  // namespace icpo::cuda_impl
