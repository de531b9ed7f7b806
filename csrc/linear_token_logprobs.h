// The chunked driver of icpo::linear_token_logprobs_fwd / _bwd, shared by the CPU implementation
// (csrc/linear_token_logprobs.cpp, which explains the design) and the CUDA one
// (csrc/cuda/linear_token_logprobs.cu). It runs the GEMMs through ATen (MKL / oneDNN on CPU,
// cuBLAS on the current stream on CUDA, threads as torch.get_num_threads()) and leaves the row
// passes to the backend's `Rows`:
//
//   struct Rows {
//     // logits [n, m] (a tile: unit column stride, row stride m), labels [n] each in [0, m) or
//     // ignore_index -> logp, entropy, lse [n] of each row's softmax over its m columns
//     static void forward(const at::Tensor& logits, const at::Tensor& labels, double inv_t,
//                         int64_t ignore_index, at::Tensor& logp, at::Tensor& entropy,
//                         at::Tensor& lse);
//     // in place: logits [nt, nv] = columns [col0, col0 + nv) of nt rows -> their dlogits
//     static void dlogits(at::Tensor& logits, const at::Tensor& labels, int64_t col0,
//                         const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
//                         const at::Tensor& lse, const at::Tensor& entropy, double inv_t,
//                         int64_t ignore_index);
//   };
#pragma once
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logaddexp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"

namespace icpo::linear_logprobs {

using checks::acc_dtype;

// Shapes, dtypes, devices and scalars, from checks.h's building blocks; label values are checked
// by the callers (checks::check_label_values on CPU; on CUDA by the Python wrapper, since
// reading them would need a host sync).
inline void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                         double inv_temperature, int64_t chunk_size, c10::DeviceType device) {
  checks::check_device_type(hidden, "hidden", device);
  ICPO_CHECK_DIM(hidden, 2);
  ICPO_CHECK_FLOATING(hidden);
  ICPO_CHECK_DIM(weight, 2);
  ICPO_CHECK_DTYPE(weight, hidden.scalar_type());
  ICPO_CHECK_DEVICE(weight, hidden.device());
  TORCH_CHECK(weight.size(0) >= 1, "weight must have a vocabulary dimension >= 1, got shape ",
              weight.sizes());
  ICPO_CHECK_SIZE(weight, 1, hidden.size(1));
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), "bias must have shape [",
                weight.size(0), "] (weight's rows), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == hidden.scalar_type(), "bias must be ", hidden.scalar_type(),
                " (hidden's dtype), got ", b.scalar_type());
    TORCH_CHECK(b.device() == hidden.device(), "bias must be on ", hidden.device(), ", got ",
                b.device());
  }
  checks::check_label_tensor(labels, hidden.size(0), hidden.device());
  checks::check_inv_temperature(inv_temperature);
  TORCH_CHECK(chunk_size >= 0, "chunk_size must be >= 0 (0: automatic), got ", chunk_size);
}

// How the [T, V] logits are cut, the same in forward and backward: tiles of `rows` tokens x
// `cols` vocabulary entries in one reused buffer of chunk_size * V elements (chunk_size = 0:
// budget_bytes). A slice takes all tokens while it can be at least kMinSliceCols wide (so each
// slice of d_weight is one GEMM, written once); only then are the tokens split too.
struct Tiles {
  int64_t rows, cols;
};

// kSliceAlign: slices are multiples of it (aligned rows of weight).
constexpr int64_t kMinSliceCols = 128;
constexpr int64_t kSliceAlign = 64;

inline Tiles plan(int64_t T, int64_t V, int64_t elem_size, int64_t chunk_size,
                  int64_t budget_bytes) {
  const int64_t t = std::max<int64_t>(T, 1);
  const int64_t chunk_rows =
      std::clamp<int64_t>(chunk_size > 0 ? chunk_size : budget_bytes / (V * elem_size), 1, t);
  const int64_t elems = chunk_rows * V;
  int64_t cols = std::min(V, elems / t);
  if (cols < V) {
    cols = std::max(std::min(V, kMinSliceCols), cols - cols % kSliceAlign);
  }
  return {std::clamp<int64_t>(elems / cols, 1, t), cols};
}

// out = h @ w_t (+ bias), the row-broadcast bias added by the GEMM itself.
inline void logits_into(at::Tensor& out, const at::Tensor& h, const at::Tensor& w_t,
                        const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, h, w_t);
  } else {
    at::mm_out(out, h, w_t);
  }
}

// Whole rows per tile: the row pass writes logp, entropy and lse directly. Otherwise each tile's
// row pass gives the statistics of its slice (L_k = log-sum-exp, H_k = entropy of the softmax
// within the slice, and the label's log-prob there when the slice holds it), merged per row
// across slices: L = logaddexp(L, L_k) and, with a = L - L', b = L_k - L' (both <= 0),
// H' = e^a (H - a) + e^b (H_k - b): H = sum_k p_k (H_k - log p_k), p_k = e^(L_k - L) the slice's
// mass, a sum of non-negative terms, so nothing cancels. logp = z_label - L at the end.
template <class Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& hidden,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& labels,
                                                       double inv_temperature,
                                                       int64_t ignore_index, int64_t chunk_size,
                                                       int64_t budget_bytes) {
  const int64_t T = hidden.size(0), V = weight.size(0);
  const auto opts = hidden.options().dtype(acc_dtype(hidden));
  at::Tensor logp = at::empty({T}, opts), entropy = at::empty({T}, opts),
             lse = at::empty({T}, opts);
  if (T == 0) return {logp, entropy, lse};
  const Tiles tiles = plan(T, V, hidden.element_size(), chunk_size, budget_bytes);
  const int64_t rows = tiles.rows, cols = tiles.cols;
  const at::Tensor buf = at::empty({rows * cols}, hidden.options());
  const bool whole_rows = cols == V;
  // The label's scaled logit, found in the slice that holds it (when slices are used).
  const at::Tensor z_label = whole_rows ? at::Tensor() : at::zeros({T}, opts);
  for (int64_t v0 = 0; v0 < V; v0 += cols) {
    const int64_t nv = std::min(cols, V - v0);
    const at::Tensor w_st = weight.narrow(0, v0, nv).t();
    std::optional<at::Tensor> b_s;
    if (bias.has_value()) b_s = bias->narrow(0, v0, nv);
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
      const int64_t nt = std::min(rows, T - t0);
      at::Tensor z = buf.narrow(0, 0, nt * nv).view({nt, nv});
      logits_into(z, hidden.narrow(0, t0, nt), w_st, b_s);
      at::Tensor lp = logp.narrow(0, t0, nt), en = entropy.narrow(0, t0, nt),
                 ls = lse.narrow(0, t0, nt);
      const at::Tensor lab = labels.narrow(0, t0, nt);
      if (whole_rows) {
        Rows::forward(z, lab, inv_temperature, ignore_index, lp, en, ls);
        continue;
      }
      // Every row gets a label inside the slice (its own, or column 0) and none is ignored, so
      // the row pass computes each slice's entropy; ignored rows are zeroed at the end.
      const at::Tensor in_slice = lab.ge(v0).logical_and_(lab.lt(v0 + nv));
      const at::Tensor local = at::where(in_slice, lab - v0, at::zeros_like(lab));
      at::Tensor lp_k = at::empty({nt}, opts), h_k = at::empty({nt}, opts),
                 l_k = at::empty({nt}, opts);
      Rows::forward(z, local, inv_temperature, /*ignore_index=*/-1, lp_k, h_k, l_k);
      at::Tensor zl = z_label.narrow(0, t0, nt);
      zl.copy_(at::where(in_slice, lp_k + l_k, zl));
      if (v0 == 0) {
        ls.copy_(l_k);
        en.copy_(h_k);
      } else {
        const at::Tensor merged = at::logaddexp(ls, l_k);
        const at::Tensor a = ls - merged, b = l_k - merged;
        en.copy_(a.exp() * (en - a) + b.exp() * (h_k - b));
        ls.copy_(merged);
      }
    }
  }
  if (!whole_rows) {
    const at::Tensor ignored = labels.eq(ignore_index);
    at::sub_out(logp, z_label, lse).masked_fill_(ignored, 0);
    entropy.masked_fill_(ignored, 0);
  }
  return {logp, entropy, lse};
}

// -> (d_hidden [T, H], d_weight [V, H], d_bias [V]) in hidden's dtype; an output whose
// output_mask entry is false (d_bias also when there is no bias) is an empty [0] tensor.
template <class Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
    const at::Tensor& lse, const at::Tensor& entropy, double inv_temperature,
    int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> output_mask,
    int64_t budget_bytes) {
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  // [T] rows on hidden's device, as contiguous acc-dtype tensors.
  const at::Tensor gl = checks::row_vector(grad_logp, "grad_logp", hidden);
  const at::Tensor gh = checks::row_vector(grad_entropy, "grad_entropy", hidden);
  const at::Tensor ls = checks::row_vector(lse, "lse", hidden);
  const at::Tensor en = checks::row_vector(entropy, "entropy", hidden);
  const bool need_h = output_mask[0], need_w = output_mask[1];
  const bool need_b = output_mask[2] && bias.has_value();
  const at::ScalarType acc = acc_dtype(hidden);
  const bool lowp = hidden.scalar_type() != acc;
  const auto opts = hidden.options();
  // Each unneeded output its own empty tensor: outputs of an op must not alias one another.
  const auto none = [&] { return at::empty({0}, opts); };
  // bf16 / fp16 GEMMs round their output to the input dtype, so the sums over tiles (d_hidden
  // over vocabulary slices, d_bias and, when tokens are split, d_weight over token tiles) are
  // kept in fp32 and rounded once at the end; fp32 / fp64 accumulate in the outputs.
  at::Tensor d_hidden = need_h ? at::zeros({T, H}, opts.dtype(acc)) : none();
  at::Tensor d_weight = need_w ? at::empty({V, H}, opts) : none();
  at::Tensor d_bias = need_b ? at::zeros({V}, opts.dtype(acc)) : none();
  const auto finish = [&] {
    return std::make_tuple(need_h ? d_hidden.to(hidden.scalar_type()) : d_hidden, d_weight,
                           need_b ? d_bias.to(hidden.scalar_type()) : d_bias);
  };
  if (T == 0 || !(need_h || need_w || need_b)) {
    if (need_w) d_weight.zero_();
    return finish();
  }
  const Tiles tiles = plan(T, V, hidden.element_size(), chunk_size, budget_bytes);
  const int64_t rows = tiles.rows, cols = tiles.cols;
  const bool split_tokens = rows < T;
  const at::Tensor buf = at::empty({rows * cols}, opts);
  const at::Tensor h_part = (lowp && need_h) ? at::empty({rows, H}, opts) : none();
  const at::Tensor w_part = (lowp && need_w && split_tokens) ? at::empty({cols, H}, opts) : none();
  const at::Tensor w_acc =
      (lowp && need_w && split_tokens) ? at::empty({cols, H}, opts.dtype(acc)) : none();
  for (int64_t v0 = 0; v0 < V; v0 += cols) {
    const int64_t nv = std::min(cols, V - v0);
    const at::Tensor w_s = weight.narrow(0, v0, nv);
    const at::Tensor w_st = w_s.t();
    std::optional<at::Tensor> b_s;
    if (bias.has_value()) b_s = bias->narrow(0, v0, nv);
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
      const int64_t nt = std::min(rows, T - t0);
      const at::Tensor h = hidden.narrow(0, t0, nt);
      at::Tensor dz = buf.narrow(0, 0, nt * nv).view({nt, nv});
      logits_into(dz, h, w_st, b_s);
      Rows::dlogits(dz, labels.narrow(0, t0, nt), v0, gl.narrow(0, t0, nt),
                    gh.narrow(0, t0, nt), ls.narrow(0, t0, nt), en.narrow(0, t0, nt),
                    inv_temperature, ignore_index);
      if (need_h) {
        at::Tensor dh = d_hidden.narrow(0, t0, nt);
        if (lowp) {
          at::Tensor part = h_part.narrow(0, 0, nt);
          at::mm_out(part, dz, w_s);
          dh.add_(part);
        } else {
          dh.addmm_(dz, w_s);
        }
      }
      if (need_w) {
        at::Tensor dw = d_weight.narrow(0, v0, nv);
        if (!split_tokens) {
          at::mm_out(dw, dz.t(), h);
        } else if (!lowp) {
          if (t0 == 0) {
            at::mm_out(dw, dz.t(), h);
          } else {
            dw.addmm_(dz.t(), h);
          }
        } else {
          at::Tensor part = w_part.narrow(0, 0, nv), sum = w_acc.narrow(0, 0, nv);
          at::mm_out(part, dz.t(), h);
          if (t0 == 0) {
            sum.copy_(part);
          } else {
            sum.add_(part);
          }
          if (t0 + nt == T) dw.copy_(sum);
        }
      }
      if (need_b) d_bias.narrow(0, v0, nv).add_(at::sum(dz, {0}, false, acc));
    }
  }
  return finish();
}

}  // namespace icpo::linear_logprobs
