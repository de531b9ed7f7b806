// Input checks shared by the CPU and CUDA implementations: one set per op, parametrized by the
// device type the implementation runs on. Each names the argument and what was expected, so a
// bad call fails at the boundary with a message the user can act on. The Python wrappers in
// icpo/ops/ check first, with friendlier messages; these keep the kernels memory-safe for
// callers that bypass them (torch.ops.icpo.* directly, compiled graphs).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#define ICPO_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define ICPO_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must be ", (d), "-D, got shape ", (x).sizes())
#define ICPO_CHECK_DTYPE(x, t) \
  TORCH_CHECK((x).scalar_type() == (t), #x " must be ", (t), ", got ", (x).scalar_type())
#define ICPO_CHECK_FLOATING(x)                                                            \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble ||      \
                  (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16,   \
              #x " must be float32, float64, float16 or bfloat16, got ", (x).scalar_type())
#define ICPO_CHECK_INDEX(x)                                                               \
  TORCH_CHECK((x).scalar_type() == at::kInt || (x).scalar_type() == at::kLong,            \
              #x " must be int32 or int64, got ", (x).scalar_type())
#define ICPO_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define ICPO_CHECK_SIZE(x, d, n)                                                          \
  TORCH_CHECK((x).size(d) == (n), #x ".size(" #d ") must be ", (n), ", got ", (x).size(d))

namespace icpo::checks {

// ---- building blocks ----------------------------------------------------------------------

// float32, or float64 for float64 inputs: the dtype of per-row outputs and accumulators.
inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// x must live on the implementation's device type (messages say "cpu" / "cuda").
inline void check_device_type(const at::Tensor& x, const char* name, c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, name, " must be on ", c10::DeviceTypeName(device, true),
              ", got ", x.device());
}

// x: a 1-D tensor of a float dtype the kernels dispatch on, on `device`.
inline void check_float_vector(const at::Tensor& x, const char* name, c10::DeviceType device) {
  check_device_type(x, name, device);
  TORCH_CHECK(x.dim() == 1, name, " must be 1-D, got shape ", x.sizes());
  TORCH_CHECK(is_kernel_float(x.scalar_type()), name,
              " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

// offsets [K + 1] in the cu_seqlens convention, on x's device: 1-D, int64 (or int32 too when
// `int32_ok`), at least one element. Their values are checked by check_offset_values (CPU).
inline void check_offsets_tensor(const at::Tensor& offsets, const char* name, const at::Tensor& x,
                                 bool int32_ok) {
  TORCH_CHECK(offsets.device() == x.device(), name, " must be on ", x.device(), ", got ",
              offsets.device());
  TORCH_CHECK(offsets.dim() == 1, name, " must be 1-D, got shape ", offsets.sizes());
  const at::ScalarType t = offsets.scalar_type();
  TORCH_CHECK(t == at::kLong || (int32_ok && t == at::kInt), name,
              int32_ok ? " must be int32 or int64, got " : " must be int64, got ", t);
  TORCH_CHECK(offsets.numel() >= 1, name, " must hold at least one element (K + 1 for K parts)");
}

// The values of offsets p[0..parts]: 0 first, `total` last, non-decreasing. Reads them, so CPU
// only (on CUDA that would need a host sync; the kernels clamp every bound instead). O(parts).
template <typename index_t>
void check_offset_values(const index_t* p, int64_t parts, int64_t total, const char* name,
                         const char* total_name) {
  TORCH_CHECK(p[0] == 0, name, " must start at 0, got ", int64_t(p[0]));
  TORCH_CHECK(int64_t(p[parts]) == total, name, " must end at ", total_name, " = ", total,
              ", got ", int64_t(p[parts]));
  for (int64_t i = 0; i < parts; ++i) {
    TORCH_CHECK(p[i] <= p[i + 1], name, " must be non-decreasing, but ", name, "[", i + 1,
                "] = ", int64_t(p[i + 1]), " < ", name, "[", i, "] = ", int64_t(p[i]));
  }
}

// ---- per-row log-prob ops (token_logprobs; also usable by ops built on its row kernels) -----

inline void check_inv_temperature(double inv_temperature) {
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
}

// labels: int64 [rows] on `device` (the logits' or hidden states' device).
inline void check_label_tensor(const at::Tensor& labels, int64_t rows, const at::Device& device) {
  ICPO_CHECK_DEVICE(labels, device);
  ICPO_CHECK_DIM(labels, 1);
  ICPO_CHECK_DTYPE(labels, at::kLong);
  ICPO_CHECK_SIZE(labels, 0, rows);
}

// Labels index into each row, so an out-of-range one would read outside it: refused here too
// (the Python wrapper reports it more helpfully, but compiled graphs skip that check). Reads the
// labels, so CPU only; on CUDA an out-of-range label reads nothing and gives NaN.
inline void check_label_values(const int64_t* labels, int64_t rows, int64_t vocab,
                               int64_t ignore_index) {
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(labels[r] == ignore_index || (labels[r] >= 0 && labels[r] < vocab), "labels[", r,
                "] = ", labels[r], " is outside [0, ", vocab, ") and is not ignore_index (",
                ignore_index, ")");
  }
}

// A [rows] per-row input of a backward (grad_logp, grad_entropy, lse, entropy), with rows and
// device those of `like` (the logits), as the contiguous acc_dtype(like) tensor the kernels
// read: gradients may arrive in another float dtype or as expanded views.
inline at::Tensor row_vector(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.device() == like.device(), name, " must be on ", like.device(), ", got ",
              x.device());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == like.size(0), name, " must have shape [",
              like.size(0), "], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be a float tensor, got ",
              x.scalar_type());
  return x.to(acc_dtype(like)).contiguous();
}

// token_logprobs_fwd / _bwd: logits [T, V] (V >= 1, unit column stride) of a float dtype on
// `device`, labels int64 [T] on the same device, inv_temperature finite and > 0.
inline void check_token_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                 double inv_temperature, c10::DeviceType device) {
  check_device_type(logits, "logits", device);
  ICPO_CHECK_DIM(logits, 2);
  ICPO_CHECK_FLOATING(logits);
  TORCH_CHECK(logits.size(1) >= 1, "logits must have a vocabulary dimension >= 1, got shape ",
              logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1,
              "logits must have unit stride along the vocabulary, got strides ", logits.strides());
  check_label_tensor(labels, logits.size(0), logits.device());
  check_inv_temperature(inv_temperature);
}

// ---- segment_mean ---------------------------------------------------------------------------

// segment_mean (x = values [T]) and segment_mean_bwd (x = grad [B], with `total` = T >= 0):
// cu_seqlens int32/int64 [B + 1] on x's device.
inline void check_segment_mean(const at::Tensor& x, const char* x_name,
                               const at::Tensor& cu_seqlens, c10::DeviceType device) {
  check_float_vector(x, x_name, device);
  check_offsets_tensor(cu_seqlens, "cu_seqlens", x, /*int32_ok=*/true);
}

inline void check_segment_mean_bwd(const at::Tensor& grad, const at::Tensor& cu_seqlens,
                                   int64_t total, c10::DeviceType device) {
  check_segment_mean(grad, "grad", cu_seqlens, device);
  TORCH_CHECK(grad.size(0) == cu_seqlens.size(0) - 1, "grad must have shape [",
              cu_seqlens.size(0) - 1, "] (one entry per segment), got ", grad.sizes());
  TORCH_CHECK(total >= 0, "total must be >= 0, got ", total);
}

// ---- group ops (preference_scores, icpo_advantages, grpo_advantages) ------------------------

// x (confidence or rewards) [N] float on `device`, group_offsets int64 [G + 1] on its device.
inline void check_group_op(const at::Tensor& x, const char* x_name,
                           const at::Tensor& group_offsets, c10::DeviceType device) {
  check_float_vector(x, x_name, device);
  check_offsets_tensor(group_offsets, "group_offsets", x, /*int32_ok=*/false);
}

// icpo_advantages: as check_group_op for rewards, and confidence of rewards' device, dtype, shape.
inline void check_icpo_advantages(const at::Tensor& confidence, const at::Tensor& rewards,
                                  const at::Tensor& group_offsets, c10::DeviceType device) {
  check_group_op(rewards, "rewards", group_offsets, device);
  ICPO_CHECK_DEVICE(confidence, rewards.device());
  ICPO_CHECK_DIM(confidence, 1);
  ICPO_CHECK_DTYPE(confidence, rewards.scalar_type());
  ICPO_CHECK_SIZE(confidence, 0, rewards.size(0));
}

}  // namespace icpo::checks
