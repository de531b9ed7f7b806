// Group ops on CPU: preference scores (docs/algorithm.md step 5, Eq. 9), ICPO advantages
// (steps 4-7 fused: sort, scores, clip, fuse, normalize; Eq. 9, 11, 5) and GRPO advantages (Eq. 5).
//
// Contract shared with the CUDA kernels and the fake kernels in icpo/ops/group_advantages.py:
// confidence and rewards are 1-D, of one float dtype (f32, f64, f16, bf16), computed in opmath
// (f32, or f64 for f64; the group statistics of Eq. 5 always in f64) and returned in that dtype;
// a group of equal values gets advantage exactly 0; group_offsets is int64 [G+1] in the
// cu_seqlens convention. One task per group, parallel over groups. None of these ops is
// differentiable: confidence and rewards are reward inputs (docs/algorithm.md step 3).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"

namespace icpo {
namespace {

// reference.CONFIDENCE_CEIL: a log-prob of exactly 0 becomes this before anything divides by it.
constexpr double kConfidenceCeil = -1e-12;
// Elements per parallel chunk, ~80 us of work each: scores cost ~10 ns per element (sort, three
// divisions), GRPO's normalization ~3 ns. Two threads would save ~25 us on the paper's 768 x 5
// batch, but when the cores are oversubscribed (a trainer's other threads) a parallel region
// waits on a descheduled thread for milliseconds, so batches that small stay on the caller.
constexpr int64_t kScoreElementsPerChunk = 8192;
constexpr int64_t kNormalizeElementsPerChunk = 32768;
// Insertion sort beats std::sort on the paper's groups (G = 5 .. 16) and is stable for free.
constexpr int64_t kInsertionSortMax = 32;

// acc_t -> scalar_t -> acc_t: what a value becomes once written to an output tensor.
template <typename scalar_t, typename acc_t>
acc_t round_to(acc_t x) {
  return static_cast<acc_t>(static_cast<scalar_t>(x));
}

// torch.minimum: NaN if either is NaN (std::min would drop a NaN in its second argument).
template <typename acc_t>
acc_t min_nan(acc_t a, acc_t b) {
  return std::isnan(a) || std::isnan(b) ? a + b : std::min(a, b);
}

template <typename acc_t>
struct Ranked {
  acc_t value;
  int64_t pos;
};

// Per-chunk buffers, grown to the largest group seen, so groups allocate nothing.
template <typename acc_t>
struct Scratch {
  std::vector<Ranked<acc_t>> ranked;
  std::vector<acc_t> scores, rewards, fused, adv;
  void fit(int64_t n) {
    if (static_cast<int64_t>(ranked.size()) >= n) return;
    ranked.resize(n);
    scores.resize(n);
    rewards.resize(n);
    fused.resize(n);
    adv.resize(n);
  }
};

// Sorts a group's clamped confidences ascending, ties by position (step 4). Returns false if
// a confidence is NaN: no order exists, and the caller fills the group with NaN.
template <typename scalar_t, typename acc_t>
bool rank_group(const scalar_t* conf, int64_t n, Ranked<acc_t>* ranked) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t c = static_cast<acc_t>(conf[i]);
    if (std::isnan(c)) return false;
    ranked[i] = {std::min(c, static_cast<acc_t>(kConfidenceCeil)), i};
  }
  if (n <= kInsertionSortMax) {
    for (int64_t i = 1; i < n; ++i) {
      const Ranked<acc_t> item = ranked[i];
      int64_t j = i;
      for (; j > 0 && ranked[j - 1].value > item.value; --j) ranked[j] = ranked[j - 1];
      ranked[j] = item;
    }
  } else {
    std::sort(ranked, ranked + n, [](const Ranked<acc_t>& a, const Ranked<acc_t>& b) {
      return a.value < b.value || (a.value == b.value && a.pos < b.pos);
    });
  }
  return true;
}

// Eq. 9 in O(G) after the sort: sum_{j after k} c_j / c_k = (suffix sum of c after k) / c_k.
// Every c_j after k is >= c_k, so each ratio lies in [0, 1] and nothing overflows.
template <typename acc_t>
void scores_from_ranked(const Ranked<acc_t>* ranked, int64_t n, acc_t delta, acc_t* scores) {
  const acc_t top_term = delta * ranked[n - 1].value;
  acc_t suffix = 0;
  for (int64_t k = n - 1; k >= 0; --k) {
    scores[ranked[k].pos] = delta * (suffix / ranked[k].value) - top_term;
    suffix += ranked[k].value;
  }
}

// Eq. 5, the one normalization code path for both GRPO and ICPO: with omega = 0, ICPO feeds it
// the very rewards GRPO does, so the two agree bitwise. noinline keeps a single machine-code
// copy, so no caller-specific inlining or FMA contraction can make them differ.
// The statistics are taken in double whatever acc_t is: (R - mean)^2 of float32 rewards cannot
// overflow there (the wrapper bounds |R| so that nothing overflows in double or in the output
// dtype). A group whose values are all equal gets exactly 0 (docs/algorithm.md, step 7): the
// rounded mean of G equal values is not always that value, and (R - mean) / (~1e-8 + eps) would
// then give every response the same nonzero advantage (-0.056 for eight float32 rewards of 0.9).
template <typename acc_t>
__attribute__((noinline)) void normalize_group(const acc_t* r, int64_t n, bool scale,
                                               bool unbiased, double eps, acc_t* out) {
  bool equal = true;  // also a group of one: no relative signal (also when unbiased)
  for (int64_t i = 1; i < n && equal; ++i) equal = r[i] == r[0];
  if (equal) {
    std::fill(out, out + n, acc_t(0));
    return;
  }
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(r[i]);
  const double mean = sum / static_cast<double>(n);
  if (!scale) {  // Dr. GRPO: center only
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(static_cast<double>(r[i]) - mean);
    return;
  }
  double sq = 0;  // two passes: var from centered values, no cancellation
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(r[i]) - mean;
    sq += d * d;
  }
  const double denom = std::sqrt(sq / static_cast<double>(unbiased ? n - 1 : n)) + eps;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<acc_t>((static_cast<double>(r[i]) - mean) / denom);
  }
}

// The offsets' values, after checks.h's checks of the op (memory safety; the wrapper reports
// malformed offsets with friendlier messages).
void check_group_offset_values(const at::Tensor& offsets, int64_t total) {
  const at::Tensor o = offsets.contiguous();
  checks::check_offset_values(o.const_data_ptr<int64_t>(), o.numel() - 1, total, "group_offsets",
                              "N");
}

// Runs body(start, n, scratch) for every group, parallel over groups. Groups are sized so a chunk
// holds about elements_per_chunk elements: small inputs stay on the calling thread.
template <typename acc_t, typename Body>
void for_each_group(const at::Tensor& offsets, int64_t total, int64_t elements_per_chunk,
                    const Body& body) {
  const at::Tensor o = offsets.contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  const int64_t num_groups = o.numel() - 1;
  const int64_t grain =
      total > 0 ? std::max<int64_t>(1, num_groups * elements_per_chunk / total) : num_groups + 1;
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = p[g + 1] - p[g];
      if (n == 0) continue;
      scratch.fit(n);
      body(p[g], n, scratch);
    }
  });
}

at::Tensor preference_scores_cpu(const at::Tensor& confidence, const at::Tensor& group_offsets,
                                 double delta) {
  checks::check_group_op(confidence, "confidence", group_offsets, at::kCPU);
  check_group_offset_values(group_offsets, confidence.numel());
  const at::Tensor c = confidence.contiguous();
  at::Tensor out = at::empty_like(c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "preference_scores",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* c_ptr = c.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    for_each_group<acc_t>(group_offsets, c.numel(), kScoreElementsPerChunk,
                          [&](int64_t start, int64_t n, auto& s) {
      if (!rank_group(c_ptr + start, n, s.ranked.data())) {
        std::fill(out_ptr + start, out_ptr + start + n, std::numeric_limits<scalar_t>::quiet_NaN());
        return;
      }
      scores_from_ranked(s.ranked.data(), n, static_cast<acc_t>(delta), s.scores.data());
      for (int64_t i = 0; i < n; ++i) out_ptr[start + i] = static_cast<scalar_t>(s.scores[i]);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> icpo_advantages_cpu(
    const at::Tensor& confidence, const at::Tensor& rewards, const at::Tensor& group_offsets,
    double delta, double tau, double omega, bool scale, bool unbiased, double eps) {
  checks::check_icpo_advantages(confidence, rewards, group_offsets, at::kCPU);
  check_group_offset_values(group_offsets, rewards.numel());
  const at::Tensor c = confidence.contiguous();
  const at::Tensor r = rewards.contiguous();
  at::Tensor scores = at::empty_like(r), fused = at::empty_like(r), adv = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "icpo_advantages",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* c_ptr = c.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = r.const_data_ptr<scalar_t>();
    scalar_t* s_out = scores.mutable_data_ptr<scalar_t>();
    scalar_t* f_out = fused.mutable_data_ptr<scalar_t>();
    scalar_t* a_out = adv.mutable_data_ptr<scalar_t>();
    const acc_t d = delta, t = tau, w = omega;
    for_each_group<acc_t>(group_offsets, r.numel(), kScoreElementsPerChunk,
                          [&](int64_t start, int64_t n, auto& s) {
      const bool ranked = rank_group(c_ptr + start, n, s.ranked.data());
      if (ranked) {
        scores_from_ranked(s.ranked.data(), n, d, s.scores.data());
      } else {
        std::fill(s.scores.begin(), s.scores.begin() + n, std::numeric_limits<acc_t>::quiet_NaN());
      }
      for (int64_t i = 0; i < n; ++i) s.rewards[i] = static_cast<acc_t>(r_ptr[start + i]);
      // Eq. 11 on the scores as returned, rounded to scalar_t (as the reference's
      // S.to(rewards.dtype)); R_final is rounded too, so the advantages normalize exactly the
      // returned final rewards (a no-op for f32/f64; the CUDA kernel does the same).
      // omega = 0 skips the fusion instead of adding 0 * min(...): R + 0 turns -0.0 into +0.0,
      // and GRPO equality must be bitwise.
      const acc_t* final_r = s.rewards.data();
      for (int64_t i = 0; i < n; ++i) s.scores[i] = round_to<scalar_t>(s.scores[i]);
      if (w != acc_t(0)) {
        for (int64_t i = 0; i < n; ++i) {
          const acc_t bonus = min_nan(s.scores[i], std::abs(s.rewards[i]) / t);
          s.fused[i] = round_to<scalar_t>(s.rewards[i] + w * bonus);
        }
        final_r = s.fused.data();
      }
      normalize_group(final_r, n, scale, unbiased, eps, s.adv.data());
      for (int64_t i = 0; i < n; ++i) {
        s_out[start + i] = static_cast<scalar_t>(s.scores[i]);
        f_out[start + i] = static_cast<scalar_t>(final_r[i]);
        a_out[start + i] = static_cast<scalar_t>(s.adv[i]);
      }
    });
  });
  return {scores, fused, adv};
}

at::Tensor grpo_advantages_cpu(const at::Tensor& rewards, const at::Tensor& group_offsets,
                               bool scale, bool unbiased, double eps) {
  checks::check_group_op(rewards, "rewards", group_offsets, at::kCPU);
  check_group_offset_values(group_offsets, rewards.numel());
  const at::Tensor r = rewards.contiguous();
  at::Tensor adv = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "grpo_advantages",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r_ptr = r.const_data_ptr<scalar_t>();
    scalar_t* a_out = adv.mutable_data_ptr<scalar_t>();
    for_each_group<acc_t>(group_offsets, r.numel(), kNormalizeElementsPerChunk,
                          [&](int64_t start, int64_t n, auto& s) {
      for (int64_t i = 0; i < n; ++i) s.rewards[i] = static_cast<acc_t>(r_ptr[start + i]);
      normalize_group(s.rewards.data(), n, scale, unbiased, eps, s.adv.data());
      for (int64_t i = 0; i < n; ++i) a_out[start + i] = static_cast<scalar_t>(s.adv[i]);
    });
  });
  return adv;
}

}  // namespace

TORCH_LIBRARY_IMPL(icpo, CPU, m) {
  m.impl("preference_scores", &preference_scores_cpu);
  m.impl("icpo_advantages", &icpo_advantages_cpu);
  m.impl("grpo_advantages", &grpo_advantages_cpu);
}

}  // namespace icpo
