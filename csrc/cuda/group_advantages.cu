// CUDA group ops (algorithm.md steps 4-7): preference_scores, icpo_advantages, grpo_advantages.
// One block per group; a warp for the usual small groups (G = 5 .. 16).
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"

namespace icpo::cuda_impl {
namespace {

constexpr int kMaxGroupThreads = 256;

// Log-probs are <= 0; clamping to -1e-12 (reference.CONFIDENCE_CEIL) keeps c_j / c_k finite and
// equal confidences at a ratio of exactly 1. Written so that NaN stays NaN, like torch.clamp.
template <class A>
__device__ __forceinline__ A clamp_confidence(A c) {
  const A ceil = static_cast<A>(-1e-12);
  return c > ceil ? ceil : c;
}

// max that keeps a NaN from either side (torch.max semantics); plain a > b ? a : b drops one.
struct MaxNan {
  template <class A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a != a || a > b ? a : b;
  }
};

// torch.minimum: NaN if either is NaN.
template <class A>
__device__ __forceinline__ A min_nan(A a, A b) {
  return a != a || b != b ? a + b : (a < b ? a : b);
}

// Group g's [start, end), clamped to [0, total]: the Python wrapper validates group_offsets, and
// the clamp keeps a malformed one from reading or writing out of bounds.
__device__ __forceinline__ void group_bounds(const int64_t* __restrict__ offsets, int64_t g,
                                             int64_t total, int64_t& start, int64_t& n) {
  start = min(max(offsets[g], int64_t(0)), total);
  const int64_t end = min(max(offsets[g + 1], start), total);
  n = end - start;
}

// Preference advantage score (Eq. 9) of every member of one group of n confidences c:
// S_i = delta * sum_{j ranked after i} c_j / c_i - delta * c_top, where j is ranked after i in the
// stable ascending sort iff c_j > c_i, or c_j == c_i and j > i. Counting that directly needs no
// sort, is stable by construction and works for any n (O(n^2 / threads) per thread, the
// confidences streamed through shared memory one block-sized tile at a time).
// Calls emit(i, S_i) once per member; every thread of the block must call this.
template <class scalar_t, class F>
__device__ __forceinline__ void group_scores(const scalar_t* __restrict__ c, int64_t n,
                                             acc_t<scalar_t> delta, F&& emit) {
  using A = acc_t<scalar_t>;
  __shared__ A tile[kMaxGroupThreads];
  A local_top = -std::numeric_limits<A>::infinity();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    local_top = MaxNan{}(local_top, clamp_confidence(static_cast<A>(c[i])));
  }
  // A NaN confidence (refused by the Python wrapper) makes c_top, so all the group's S, NaN.
  const A c_top = block_allreduce(local_top, MaxNan{}, -std::numeric_limits<A>::infinity());

  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool active = i < n;
    const A ci = active ? clamp_confidence(static_cast<A>(c[i])) : A(-1);
    A after_sum = A(0);  // sum of the c_j ranked after i
    for (int64_t tile_start = 0; tile_start < n; tile_start += blockDim.x) {
      __syncthreads();  // the previous tile is no longer read
      if (tile_start + threadIdx.x < n) {
        tile[threadIdx.x] = clamp_confidence(static_cast<A>(c[tile_start + threadIdx.x]));
      }
      __syncthreads();
      const int64_t tile_len = min(static_cast<int64_t>(blockDim.x), n - tile_start);
      if (!active) continue;
      for (int64_t k = 0; k < tile_len; ++k) {
        const A cj = tile[k];
        if (cj > ci || (cj == ci && tile_start + k > i)) after_sum += cj;
      }
    }
    // sum_j c_j / c_i = (sum_j c_j) / c_i: one division, as the CPU kernel. Every c_j ranked after
    // i is in [c_i, 0), so the ratio is in [0, n) and nothing overflows.
    if (active) emit(i, delta * div_(after_sum, ci) - delta * c_top);
  }
}

// Eq. 5 over one group: out = (r - mean) / (std + eps), or r - mean without `scale`; population
// std unless `unbiased`. As the CPU kernel: the statistics are taken in double whatever scalar_t
// is (no overflow of (r - mean)^2 for float32 rewards), and a group whose values are all equal
// (a group of one included) gets exactly 0, whatever rounding the mean would do. r is read after
// a barrier, so it may be values this block just wrote (it is deliberately not __restrict__: no
// read-only cache on it).
// __noinline__: one machine-code copy shared by the ICPO and GRPO kernels, so no caller-specific
// inlining or FMA contraction can make omega = 0 differ from GRPO.
template <class scalar_t>
__device__ __noinline__ void normalize_group(const scalar_t* r, scalar_t* __restrict__ out,
                                                int64_t n, bool scale, bool unbiased,
                                                double eps) {
  using A = acc_t<scalar_t>;
  __syncthreads();
  if (n == 0) return;  // only from malformed offsets (group_bounds clamps them)
  // Every scalar_t converts exactly to A, and A exactly to double.
  auto value = [&](int64_t i) { return static_cast<double>(static_cast<A>(r[i])); };
  const double first = value(0);
  int differs = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) differs |= !(value(i) == first);
  if (block_allreduce(differs, Sum{}, 0) == 0) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = static_cast<scalar_t>(A(0));
    return;
  }
  double sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += value(i);
  const double mean = div_(block_allreduce(sum, Sum{}, 0.0), static_cast<double>(n));
  double denom = 1;
  if (scale) {
    double sq = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const double d = value(i) - mean;
      sq += d * d;
    }
    const double var =
        div_(block_allreduce(sq, Sum{}, 0.0), static_cast<double>(unbiased ? n - 1 : n));
    denom = sqrt_(var) + eps;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double centered = value(i) - mean;
    out[i] = static_cast<scalar_t>(static_cast<A>(scale ? div_(centered, denom) : centered));
  }
}

// Grid: one block per group.
template <class scalar_t>
__global__ void preference_scores_kernel(const scalar_t* __restrict__ confidence, int64_t total,
                                         const int64_t* __restrict__ offsets,
                                         acc_t<scalar_t> delta, scalar_t* __restrict__ scores) {
  int64_t start, n;
  group_bounds(offsets, blockIdx.x, total, start, n);
  group_scores(confidence + start, n, delta, [&](int64_t i, acc_t<scalar_t> s) {
    scores[start + i] = static_cast<scalar_t>(s);
  });
}

// Grid: one block per group. Scores, R_final = R + omega * min(S, |R| / tau) (Eq. 11), then
// Eq. 5 on R_final with the same code (and launch shape) as grpo_advantages_kernel, so omega = 0
// reproduces GRPO bit for bit.
template <class scalar_t>
__global__ void icpo_advantages_kernel(const scalar_t* __restrict__ confidence,
                                       const scalar_t* __restrict__ rewards, int64_t total,
                                       const int64_t* __restrict__ offsets, acc_t<scalar_t> delta,
                                       acc_t<scalar_t> tau, acc_t<scalar_t> omega, bool scale,
                                       bool unbiased, double eps,
                                       scalar_t* __restrict__ scores,
                                       scalar_t* __restrict__ final_rewards,
                                       scalar_t* __restrict__ advantages) {
  using A = acc_t<scalar_t>;
  int64_t start, n;
  group_bounds(offsets, blockIdx.x, total, start, n);
  group_scores(confidence + start, n, delta, [&](int64_t i, A s) {
    const int64_t k = start + i;
    scores[k] = static_cast<scalar_t>(s);
    const A r = static_cast<A>(rewards[k]);
    // Scores are rounded to scalar_t before the min, as in the reference (S.to(rewards.dtype)).
    const A s_rounded = static_cast<A>(static_cast<scalar_t>(s));
    const A bonus = min_nan(s_rounded, div_(abs_(r), tau));
    final_rewards[k] = omega == A(0) ? rewards[k] : static_cast<scalar_t>(r + omega * bonus);
  });
  normalize_group(final_rewards + start, advantages + start, n, scale, unbiased, eps);
}

// Grid: one block per group.
template <class scalar_t>
__global__ void grpo_advantages_kernel(const scalar_t* __restrict__ rewards, int64_t total,
                                       const int64_t* __restrict__ offsets, bool scale,
                                       bool unbiased, double eps,
                                       scalar_t* __restrict__ advantages) {
  int64_t start, n;
  group_bounds(offsets, blockIdx.x, total, start, n);
  normalize_group(rewards + start, advantages + start, n, scale, unbiased, eps);
}


// Same for every group op, so icpo_advantages and grpo_advantages reduce in the same order.
int group_threads(int64_t total, int64_t groups) {
  return threads_for(groups > 0 ? total / groups : 0, kMaxGroupThreads);
}

// Inputs are made contiguous here (a no-op from the Python wrappers), as the CPU kernels do.
at::Tensor preference_scores_cuda(const at::Tensor& confidence_in,
                                  const at::Tensor& group_offsets_in, double delta) {
  checks::check_group_op(confidence_in, "confidence", group_offsets_in, at::kCUDA);
  check_grid(group_offsets_in.size(0) - 1, "groups");
  const at::Tensor confidence = confidence_in.contiguous();
  const at::Tensor group_offsets = group_offsets_in.contiguous();
  const c10::cuda::CUDAGuard guard(confidence.device());
  const int64_t total = confidence.size(0);
  const int64_t groups = group_offsets.size(0) - 1;
  at::Tensor scores = at::empty_like(confidence);
  if (groups == 0 || total == 0) return scores;
  const int threads = group_threads(total, groups);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, confidence.scalar_type(),
                                  "preference_scores_cuda", [&] {
    preference_scores_kernel<scalar_t><<<static_cast<unsigned>(groups), threads, 0, stream>>>(
        confidence.const_data_ptr<scalar_t>(), total, group_offsets.const_data_ptr<int64_t>(),
        static_cast<acc_t<scalar_t>>(delta), scores.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> icpo_advantages_cuda(
    const at::Tensor& confidence_in, const at::Tensor& rewards_in,
    const at::Tensor& group_offsets_in, double delta, double tau, double omega, bool scale,
    bool unbiased, double eps) {
  checks::check_icpo_advantages(confidence_in, rewards_in, group_offsets_in, at::kCUDA);
  check_grid(group_offsets_in.size(0) - 1, "groups");
  const at::Tensor confidence = confidence_in.contiguous();
  const at::Tensor rewards = rewards_in.contiguous();
  const at::Tensor group_offsets = group_offsets_in.contiguous();
  const c10::cuda::CUDAGuard guard(confidence.device());
  const int64_t total = confidence.size(0);
  const int64_t groups = group_offsets.size(0) - 1;
  at::Tensor scores = at::empty_like(rewards);
  at::Tensor final_rewards = at::empty_like(rewards);
  at::Tensor advantages = at::empty_like(rewards);
  if (groups == 0 || total == 0) return {scores, final_rewards, advantages};
  const int threads = group_threads(total, groups);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(),
                                  "icpo_advantages_cuda", [&] {
    using A = acc_t<scalar_t>;
    icpo_advantages_kernel<scalar_t><<<static_cast<unsigned>(groups), threads, 0, stream>>>(
        confidence.const_data_ptr<scalar_t>(), rewards.const_data_ptr<scalar_t>(), total,
        group_offsets.const_data_ptr<int64_t>(), static_cast<A>(delta), static_cast<A>(tau),
        static_cast<A>(omega), scale, unbiased, eps,
        scores.mutable_data_ptr<scalar_t>(), final_rewards.mutable_data_ptr<scalar_t>(),
        advantages.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, final_rewards, advantages};
}

at::Tensor grpo_advantages_cuda(const at::Tensor& rewards_in, const at::Tensor& group_offsets_in,
                                bool scale, bool unbiased, double eps) {
  checks::check_group_op(rewards_in, "rewards", group_offsets_in, at::kCUDA);
  check_grid(group_offsets_in.size(0) - 1, "groups");
  const at::Tensor rewards = rewards_in.contiguous();
  const at::Tensor group_offsets = group_offsets_in.contiguous();
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t total = rewards.size(0);
  const int64_t groups = group_offsets.size(0) - 1;
  at::Tensor advantages = at::empty_like(rewards);
  if (groups == 0 || total == 0) return advantages;
  const int threads = group_threads(total, groups);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(),
                                  "grpo_advantages_cuda", [&] {
    grpo_advantages_kernel<scalar_t><<<static_cast<unsigned>(groups), threads, 0, stream>>>(
        rewards.const_data_ptr<scalar_t>(), total, group_offsets.const_data_ptr<int64_t>(), scale,
        unbiased, eps, advantages.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return advantages;
}

}  // namespace
}  // namespace icpo::cuda_impl

TORCH_LIBRARY_IMPL(icpo, CUDA, m) {
  m.impl("preference_scores", &icpo::cuda_impl::preference_scores_cuda);
  m.impl("icpo_advantages", &icpo::cuda_impl::icpo_advantages_cuda);
  m.impl("grpo_advantages", &icpo::cuda_impl::grpo_advantages_cuda);
}
