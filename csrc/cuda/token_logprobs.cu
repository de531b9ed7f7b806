// CUDA token_logprobs_fwd / token_logprobs_bwd: per-token log-prob of the label and entropy of
// softmax(logits * inv_temperature), one block per row, one pass over the vocabulary.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cuda/common.cuh"

namespace icpo::cuda_impl {
namespace {

// Online softmax statistics of the z seen so far, relative to their running max m:
// s = sum exp(z - m) and t = sum exp(z - m) * (z - m). Keeping t relative to m (instead of
// sum exp(z - m) * z) avoids cancelling large logits in H = log s - t / s.
template <class A>
struct SoftmaxStats {
  A m, s, t;
};

template <class A>
__device__ __forceinline__ SoftmaxStats<A> shfl_xor(SoftmaxStats<A> v, int lane_mask) {
  return {cuda_impl::shfl_xor(v.m, lane_mask), cuda_impl::shfl_xor(v.s, lane_mask),
          cuda_impl::shfl_xor(v.t, lane_mask)};
}

// Re-expresses (s, t) relative to a new max m_new >= m: with d = m - m_new,
// s' = s e^d and t' = e^d (t + d s). Empty stats (s == 0) stay empty, so -inf never meets 0.
template <class A>
__device__ __forceinline__ void rescale(A m, A s, A t, A m_new, A& s_out, A& t_out) {
  if (s > A(0)) {
    const A d = m - m_new;
    const A e = exp_(d);
    s_out = s * e;
    t_out = e * (t + d * s);
  } else {
    s_out = A(0);
    t_out = A(0);
  }
}

struct MergeStats {
  template <class A>
  __device__ __forceinline__ SoftmaxStats<A> operator()(SoftmaxStats<A> a,
                                                        SoftmaxStats<A> b) const {
    const A m = a.m > b.m ? a.m : b.m;
    A sa, ta, sb, tb;
    rescale(a.m, a.s, a.t, m, sa, ta);
    rescale(b.m, b.s, b.t, m, sb, tb);
    return {m, sa + sb, ta + tb};
  }
};

template <class A>
__device__ __forceinline__ void push(SoftmaxStats<A>& st, A z) {
  if (z > st.m) {
    rescale(st.m, st.s, st.t, z, st.s, st.t);
    st.m = z;
  }
  const A d = z - st.m;
  const A e = exp_(d);
  st.s += e;
  st.t += e * d;
}

// Grid: one block per row. Block: a multiple of 32 threads. Writes logp, entropy, lse of one row,
// in acc_t (float32, or float64 for float64 logits, as the CPU kernel and the fake kernel).
template <class scalar_t>
__global__ void token_logprobs_fwd_kernel(const scalar_t* __restrict__ logits, int64_t row_stride,
                                          int64_t vocab, const int64_t* __restrict__ labels,
                                          acc_t<scalar_t> inv_t, int64_t ignore_index,
                                          acc_t<scalar_t>* __restrict__ logp,
                                          acc_t<scalar_t>* __restrict__ entropy,
                                          acc_t<scalar_t>* __restrict__ lse_out) {
  using A = acc_t<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * row_stride;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();

  SoftmaxStats<A> st{kNegInf, A(0), A(0)};
  bool bad = false;
  for_each_in_row(x, vocab, [&](int64_t, scalar_t v) {
    const A z = static_cast<A>(v) * inv_t;
    // Non-finite values are flagged, not pushed: one NaN would otherwise poison the merge.
    if (isfinite(z)) {
      push(st, z);
    } else {
      bad = true;
    }
  });
  bad = __syncthreads_or(bad);
  st = block_allreduce(st, MergeStats{}, SoftmaxStats<A>{kNegInf, A(0), A(0)});
  if (threadIdx.x != 0) return;

  const A nan = std::numeric_limits<A>::quiet_NaN();
  const A log_s = log_(st.s);
  lse_out[row] = bad ? nan : st.m + log_s;
  const int64_t label = labels[row];
  if (label == ignore_index) {
    logp[row] = A(0);
    entropy[row] = A(0);
    return;
  }
  // Out-of-range labels are refused by the Python wrapper (checking here would need a host sync);
  // here they read nothing and give NaN.
  const bool in_range = label >= 0 && label < vocab;
  const A z_label = in_range ? static_cast<A>(x[label]) * inv_t : nan;
  // (z - m) - log s rather than z - lse: exact when the label holds the max and s ~ 1.
  logp[row] = bad ? nan : (z_label - st.m) - log_s;
  entropy[row] = bad ? nan : log_s - st.t / st.s;
}

// grad_logits = inv_t * (g_logp * (onehot(label) - p) - g_H * p * (log p + H)), p = exp(z - lse).
// Grid: one block per row; reads the row of logits once and writes the row of grad once.
// grad_logp, grad_entropy, lse, entropy: [T] in acc_t.
template <class scalar_t>
__global__ void token_logprobs_bwd_kernel(const acc_t<scalar_t>* __restrict__ grad_logp,
                                          const acc_t<scalar_t>* __restrict__ grad_entropy,
                                          const scalar_t* __restrict__ logits, int64_t row_stride,
                                          int64_t vocab, const int64_t* __restrict__ labels,
                                          const acc_t<scalar_t>* __restrict__ lse,
                                          const acc_t<scalar_t>* __restrict__ entropy,
                                          acc_t<scalar_t> inv_t, int64_t ignore_index,
                                          scalar_t* __restrict__ grad_logits) {
  using A = acc_t<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * row_stride;
  scalar_t* y = grad_logits + row * vocab;
  const int64_t label = labels[row];
  if (label == ignore_index) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) y[i] = static_cast<scalar_t>(0.f);
    return;
  }
  const A g_logp = grad_logp[row];
  const A g_h = grad_entropy[row];
  const A row_lse = lse[row];
  const A row_h = entropy[row];
  transform_row(x, y, vocab, [&](int64_t i, scalar_t v) {
    const A log_p = static_cast<A>(v) * inv_t - row_lse;
    const A p = exp_(log_p);
    A g = -p * (g_logp + g_h * (log_p + row_h));
    if (i == label) g += g_logp;
    return static_cast<scalar_t>(g * inv_t);
  });
}

// Threads per row: enough that each thread reads a handful of 16-byte packs, at most 512.
int row_threads(int64_t vocab, int64_t elem_size) {
  return threads_for(vocab * elem_size / (16 * 4), 512);
}

// The checks shared with the CPU op (checks.h), and the grid limit of one block per row.
void check_inputs(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature) {
  checks::check_token_logprobs(logits, labels, inv_temperature, at::kCUDA);
  check_grid(logits.size(0), "rows of logits");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels_in, double inv_temperature,
    int64_t ignore_index) {
  check_inputs(logits, labels_in, inv_temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor labels = labels_in.contiguous();
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const auto opts = logits.options().dtype(checks::acc_dtype(logits));
  at::Tensor logp = at::empty({rows}, opts);
  at::Tensor entropy = at::empty({rows}, opts);
  at::Tensor lse = at::empty({rows}, opts);
  if (rows == 0) return {logp, entropy, lse};
  const int threads = row_threads(vocab, logits.element_size());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_fwd_cuda", [&] {
        using A = acc_t<scalar_t>;
        token_logprobs_fwd_kernel<scalar_t><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
            logits.const_data_ptr<scalar_t>(), logits.stride(0), vocab,
            labels.const_data_ptr<int64_t>(), static_cast<A>(inv_temperature), ignore_index,
            logp.mutable_data_ptr<A>(), entropy.mutable_data_ptr<A>(), lse.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {logp, entropy, lse};
}

at::Tensor token_logprobs_bwd_cuda(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                   const at::Tensor& logits, const at::Tensor& labels_in,
                                   const at::Tensor& lse, const at::Tensor& entropy,
                                   double inv_temperature, int64_t ignore_index) {
  check_inputs(logits, labels_in, inv_temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor g_logp = checks::row_vector(grad_logp, "grad_logp", logits);
  const at::Tensor g_entropy = checks::row_vector(grad_entropy, "grad_entropy", logits);
  const at::Tensor lse_acc = checks::row_vector(lse, "lse", logits);
  const at::Tensor entropy_acc = checks::row_vector(entropy, "entropy", logits);
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  at::Tensor grad_logits = at::empty({rows, vocab}, logits.options());
  if (rows == 0) return grad_logits;
  const int threads = row_threads(vocab, logits.element_size());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_bwd_cuda", [&] {
        using A = acc_t<scalar_t>;
        token_logprobs_bwd_kernel<scalar_t><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
            g_logp.const_data_ptr<A>(), g_entropy.const_data_ptr<A>(),
            logits.const_data_ptr<scalar_t>(), logits.stride(0), vocab,
            labels.const_data_ptr<int64_t>(), lse_acc.const_data_ptr<A>(),
            entropy_acc.const_data_ptr<A>(), static_cast<A>(inv_temperature), ignore_index,
            grad_logits.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_logits;
}

}  // namespace
}  // namespace icpo::cuda_impl

TORCH_LIBRARY_IMPL(icpo, CUDA, m) {
  m.impl("token_logprobs_fwd", &icpo::cuda_impl::token_logprobs_fwd_cuda);
  m.impl("token_logprobs_bwd", &icpo::cuda_impl::token_logprobs_bwd_cuda);
}
