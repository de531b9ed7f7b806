// CUDA linear_token_logprobs_fwd / _bwd: the CPU implementation's algorithm (design notes in
// csrc/linear_token_logprobs.cpp), with the same driver (csrc/linear_token_logprobs.h): one
// cuBLAS GEMM per chunk through ATen on the current stream into a reused buffer, then a row
// kernel. The forward's row pass is token_logprobs_fwd's CUDA kernel, reached through the
// dispatcher on the chunk view (it accepts any row stride); the backward's in-place dlogits
// kernel is below (token_logprobs_bwd's writes a separate [T, V] gradient).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/common.cuh"
#include "linear_token_logprobs.h"

namespace icpo::cuda_impl {
namespace {

// A larger buffer than on CPU (64 MiB): GPU memory is less scarce than the GEMMs' efficiency,
// which needs tiles of a few hundred rows (bf16 at V = 151936: 880 rows per forward chunk; at
// T = 8192 the backward's slices are 8192 wide). Not yet tuned on a GPU.
constexpr int64_t kBudgetBytes = int64_t{256} << 20;

// x[i] <- f(i, x[i]) for i in [0, n), in place: each element is read, then written, by the same
// thread, 16 bytes at a time where the row is aligned.
template <class T, class F>
__device__ __forceinline__ void transform_in_place(T* x, int64_t n, F&& f) {
  constexpr int kVec = Pack<T>::kSize;
  const int64_t head = unaligned_head(x, n);
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) x[i] = f(i, x[i]);
  const int64_t num_packs = (n - head) / kVec;
  auto* packs = reinterpret_cast<Pack<T>*>(x + head);
  for (int64_t j = threadIdx.x; j < num_packs; j += blockDim.x) {
    Pack<T> p = packs[j];
#pragma unroll
    for (int k = 0; k < kVec; ++k) p.val[k] = f(head + j * kVec + k, p.val[k]);
    packs[j] = p;
  }
  for (int64_t i = head + num_packs * kVec + threadIdx.x; i < n; i += blockDim.x) x[i] = f(i, x[i]);
}

// Grid: one block per row of the tile. logits holds columns [col0, col0 + n) of each row; each
// becomes inv_t * (g_logp * (onehot(label) - p) - g_H * p * (log p + H)), p = exp(z - lse).
template <class scalar_t>
__global__ void dlogits_kernel(scalar_t* __restrict__ logits, int64_t row_stride, int64_t n,
                               const int64_t* __restrict__ labels, int64_t col0,
                               const acc_t<scalar_t>* __restrict__ grad_logp,
                               const acc_t<scalar_t>* __restrict__ grad_entropy,
                               const acc_t<scalar_t>* __restrict__ lse,
                               const acc_t<scalar_t>* __restrict__ entropy,
                               acc_t<scalar_t> inv_t, int64_t ignore_index) {
  using A = acc_t<scalar_t>;
  const int64_t row = blockIdx.x;
  scalar_t* x = logits + row * row_stride;
  const int64_t label = labels[row];
  if (label == ignore_index) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) x[i] = static_cast<scalar_t>(0.f);
    return;
  }
  const int64_t j = label - col0;  // the label's column in this tile, if it is in it
  const A g_logp = grad_logp[row], g_h = grad_entropy[row];
  const A row_lse = lse[row], row_h = entropy[row];
  transform_in_place(x, n, [&](int64_t i, scalar_t v) {
    const A log_p = static_cast<A>(v) * inv_t - row_lse;
    const A p = exp_(log_p);
    A g = -p * (g_logp + g_h * (log_p + row_h));
    if (i == j) g += g_logp;
    return static_cast<scalar_t>(g * inv_t);
  });
}

struct CudaRows {
  static void forward(const at::Tensor& logits, const at::Tensor& labels, double inv_t,
                      int64_t ignore_index, at::Tensor& logp, at::Tensor& entropy,
                      at::Tensor& lse) {
    // Straight to token_logprobs_fwd's CUDA kernel (no autograd or Python layer in between).
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("icpo::token_logprobs_fwd", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                  const at::Tensor&, double,
                                                                  int64_t)>();
    const auto [lp, en, ls] = op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), logits,
                                            labels, inv_t, ignore_index);
    logp.copy_(lp);
    entropy.copy_(en);
    lse.copy_(ls);
  }

  static void dlogits(at::Tensor& logits, const at::Tensor& labels, int64_t col0,
                      const at::Tensor& gl, const at::Tensor& gh, const at::Tensor& ls,
                      const at::Tensor& en, double inv_t, int64_t ignore_index) {
    const int64_t rows = logits.size(0), n = logits.size(1);
    if (rows == 0 || n == 0) return;
    check_grid(rows, "tokens per tile");
    const int threads = threads_for(n * logits.element_size() / (16 * 4), 512);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, logits.scalar_type(), "linear_token_logprobs_dlogits_cuda", [&] {
          using A = acc_t<scalar_t>;
          dlogits_kernel<scalar_t><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
              logits.mutable_data_ptr<scalar_t>(), logits.stride(0), n,
              labels.const_data_ptr<int64_t>(), col0, gl.const_data_ptr<A>(),
              gh.const_data_ptr<A>(), ls.const_data_ptr<A>(), en.const_data_ptr<A>(),
              static_cast<A>(inv_t), ignore_index);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, double inv_temperature, int64_t ignore_index, int64_t chunk_size) {
  linear_logprobs::check_inputs(hidden, weight, bias, labels, inv_temperature, chunk_size,
                                at::kCUDA);
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs::forward<CudaRows>(hidden, weight, bias, labels.contiguous(),
                                            inv_temperature, ignore_index, chunk_size,
                                            kBudgetBytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd_cuda(
    const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
    const at::Tensor& lse, const at::Tensor& entropy, double inv_temperature,
    int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> output_mask) {
  linear_logprobs::check_inputs(hidden, weight, bias, labels, inv_temperature, chunk_size,
                                at::kCUDA);
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs::backward<CudaRows>(grad_logp, grad_entropy, hidden, weight, bias,
                                             labels.contiguous(), lse, entropy, inv_temperature,
                                             ignore_index, chunk_size, output_mask, kBudgetBytes);
}

}  // namespace
}  // namespace icpo::cuda_impl

TORCH_LIBRARY_IMPL(icpo, CUDA, m) {
  m.impl("linear_token_logprobs_fwd", &icpo::cuda_impl::linear_token_logprobs_fwd_cuda);
  m.impl("linear_token_logprobs_bwd", &icpo::cuda_impl::linear_token_logprobs_bwd_cuda);
}
