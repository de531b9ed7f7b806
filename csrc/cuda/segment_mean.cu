// CUDA segment_mean / segment_mean_bwd over a packed [T] tensor split by cu_seqlens [B+1].
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"

namespace icpo::cuda_impl {
namespace {

// Segment b's [start, end), clamped to [0, total]: the Python wrapper validates cu_seqlens, and
// the clamp keeps a malformed one from reading or writing out of bounds.
template <class index_t>
__device__ __forceinline__ void segment_bounds(const index_t* __restrict__ cu_seqlens, int64_t seg,
                                               int64_t total, int64_t& start, int64_t& end) {
  start = min(max(static_cast<int64_t>(cu_seqlens[seg]), int64_t(0)), total);
  end = min(max(static_cast<int64_t>(cu_seqlens[seg + 1]), start), total);
}

// Grid: one block per segment. out[b] = mean(values[cu[b]:cu[b+1]]), accumulated in acc_t.
// An empty segment (refused by the Python wrapper) gives NaN, as on CPU.
template <class scalar_t, class index_t>
__global__ void segment_mean_kernel(const scalar_t* __restrict__ values, int64_t total,
                                    const index_t* __restrict__ cu_seqlens,
                                    scalar_t* __restrict__ out) {
  using A = acc_t<scalar_t>;
  const int64_t seg = blockIdx.x;
  int64_t start, end;
  segment_bounds(cu_seqlens, seg, total, start, end);
  A sum = A(0);
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) sum += static_cast<A>(values[i]);
  sum = block_allreduce(sum, Sum{}, A(0));
  if (threadIdx.x != 0) return;
  out[seg] = end > start ? static_cast<scalar_t>(div_(sum, static_cast<A>(end - start)))
                         : static_cast<scalar_t>(std::numeric_limits<A>::quiet_NaN());
}

// Grid: one block per segment. grad_values[i] = grad[b] / len_b for every i in segment b.
template <class scalar_t, class index_t>
__global__ void segment_mean_bwd_kernel(const scalar_t* __restrict__ grad,
                                        const index_t* __restrict__ cu_seqlens, int64_t total,
                                        scalar_t* __restrict__ grad_values) {
  using A = acc_t<scalar_t>;
  const int64_t seg = blockIdx.x;
  int64_t start, end;
  segment_bounds(cu_seqlens, seg, total, start, end);
  if (end <= start) return;
  const A share = div_(static_cast<A>(grad[seg]), static_cast<A>(end - start));
  const auto g = static_cast<scalar_t>(share);
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) grad_values[i] = g;
}


// Threads per segment from the mean segment length (responses: hundreds to thousands of tokens).
int segment_threads(int64_t total, int64_t segments) {
  return threads_for(segments > 0 ? total / segments : 0, 256);
}

// Inputs are made contiguous here (a no-op from the Python wrappers), as the CPU kernels do.
at::Tensor segment_mean_cuda(const at::Tensor& values_in, const at::Tensor& cu_seqlens_in) {
  checks::check_segment_mean(values_in, "values", cu_seqlens_in, at::kCUDA);
  check_grid(cu_seqlens_in.size(0) - 1, "segments");
  const at::Tensor values = values_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t segments = cu_seqlens.size(0) - 1;
  at::Tensor out = at::empty({segments}, values.options());
  if (segments == 0) return out;
  const int threads = segment_threads(values.size(0), segments);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(),
                                  "segment_mean_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(cu_seqlens.scalar_type(), "segment_mean_cuda", [&] {
      segment_mean_kernel<scalar_t, index_t>
          <<<static_cast<unsigned>(segments), threads, 0, stream>>>(
              values.const_data_ptr<scalar_t>(), values.size(0),
              cu_seqlens.const_data_ptr<index_t>(), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor segment_mean_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& cu_seqlens_in,
                                 c10::SymInt total_sym) {
  const int64_t total = total_sym.expect_int();
  checks::check_segment_mean_bwd(grad_in, cu_seqlens_in, total, at::kCUDA);
  check_grid(cu_seqlens_in.size(0) - 1, "segments");
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t segments = grad.size(0);
  // Zeros, not empty: positions outside every segment (malformed cu_seqlens) get no gradient
  // rather than garbage.
  at::Tensor grad_values = at::zeros({total}, grad.options());
  if (segments == 0 || total == 0) return grad_values;
  const int threads = segment_threads(total, segments);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "segment_mean_bwd_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(cu_seqlens.scalar_type(), "segment_mean_bwd_cuda", [&] {
      segment_mean_bwd_kernel<scalar_t, index_t>
          <<<static_cast<unsigned>(segments), threads, 0, stream>>>(
              grad.const_data_ptr<scalar_t>(), cu_seqlens.const_data_ptr<index_t>(), total,
              grad_values.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_values;
}

}  // namespace
}  // namespace icpo::cuda_impl

TORCH_LIBRARY_IMPL(icpo, CUDA, m) {
  m.impl("segment_mean", &icpo::cuda_impl::segment_mean_cuda);
  m.impl("segment_mean_bwd", &icpo::cuda_impl::segment_mean_bwd_cuda);
}
