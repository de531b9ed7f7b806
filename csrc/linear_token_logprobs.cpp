// CPU ops icpo::linear_token_logprobs_fwd / _bwd (schemas in ops.cpp): the label's log-prob and
// the entropy of softmax((hidden @ weight^T + bias) * inv_temperature), per token, without ever
// holding the [T, V] logits or their gradient. The driver (csrc/linear_token_logprobs.h) is
// shared with CUDA; this file holds the CPU row passes and the checks.
//
// Design (memory first: the target is <= 5 % of the fp32 [T, V] logits in extra memory over
// forward + backward, ~250 MB at T = 8192, V = 151936), the same in both directions: the logits
// are made in tiles of VOCABULARY SLICES x all tokens, [T, Vs], in ONE reused buffer; tokens are
// split too only when a slice would be narrower than kMinSliceCols.
//
// - Forward: per slice one GEMM (addmm with the bias) into the buffer, then token_logprobs' fused
//   row pass (cpu::kernels().token_logprobs_fwd) on the tile gives each row's log-sum-exp and
//   entropy within the slice and the label's log-prob where the slice holds it; these merge
//   across slices without cancellation (linear_token_logprobs.h). Saved for backward: hidden,
//   weight, bias, labels and the [T] lse and entropy. Token chunks of whole rows were the first
//   design: at the buffer sizes memory allows (~110 fp32 rows of 151936) the GEMM streams all of
//   weight per chunk and ran at 58 GFLOP/s against 93 for [512, H] x [H, 4096] tiles here.
// - Backward: with lse and entropy saved, each dlogit depends only on its own logit and per-row
//   scalars, so for a slice [v0, v1):
//     dz = hidden @ W_s^T (+ b_s)          recomputed into the buffer, [T, Vs]
//     dz <- dlogits in place               (csrc/cpu/linear_token_logprobs_kernel.cpp)
//     d_W[v0:v1] = dz^T @ hidden            ONE GEMM over all tokens: written once, rounded once
//     d_hidden  += dz @ W_s                 an fp32 [T, H] sum (bf16: 64 MB at T 8192, H 2048)
//     d_b[v0:v1] = column sums of dz
//   Token chunks would instead have to sum d_W [V, H] over chunks: in bf16 that loses bits at
//   every chunk, in fp32 it costs V * H * 4 bytes (1.2 GB at H = 2048). Summing d_hidden over
//   slices costs only the small [T, H]. Each slice's bf16 partial of d_hidden is rounded once
//   before the fp32 sum (ATen's CPU GEMM has no bf16 -> fp32 output); d_W and d_b are rounded
//   once. When tokens are split, d_W sums over token tiles (in fp32 per slice for bf16).
// - The buffer holds chunk_size * V elements (default kBudgetBytes, 32 MiB), so Vs is about
//   chunk_size * V / T.
//   Extra memory at T = 8192, H = 2048, besides the gradients themselves: the buffer, plus for
//   bf16 the fp32 d_hidden sum (64 MiB) and its bf16 slice partial (32 MiB).
// - Time: 4 GEMMs of 2 T H V flops (forward, backward's recompute, d_hidden, d_W); the row
//   passes are a few % of it. Materializing the logits saves the recompute (3 GEMMs) but faults
//   in two [T, V] buffers per step. The GEMMs are ATen's (MKL for fp32, oneDNN for bf16),
//   threaded like torch.get_num_threads(); the row passes use at::parallel_for.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu/kernels.h"
#include "linear_token_logprobs.h"

namespace icpo {
namespace {

// Measured at T = 512, H = 896, V = 151936, fp32, one thread: 8, 16, 32 and 64 MiB all within
// 2 % (in CPU time); the smallest buffers that keep slices >= 1024 wide up to T = 8192 fp32.
constexpr int64_t kBudgetBytes = int64_t{32} << 20;

struct CpuRows {
  static void forward(const at::Tensor& logits, const at::Tensor& labels, double inv_t,
                      int64_t ignore_index, at::Tensor& logp, at::Tensor& entropy,
                      at::Tensor& lse) {
    cpu::kernels().token_logprobs_fwd(logits, labels.const_data_ptr<int64_t>(), inv_t,
                                      ignore_index, logp, entropy, lse);
  }
  static void dlogits(at::Tensor& logits, const at::Tensor& labels, int64_t col0,
                      const at::Tensor& gl, const at::Tensor& gh, const at::Tensor& ls,
                      const at::Tensor& en, double inv_t, int64_t ignore_index) {
    cpu::kernels().linear_token_logprobs_dlogits(logits, labels.const_data_ptr<int64_t>(), col0,
                                                 gl, gh, ls, en, inv_t, ignore_index);
  }
};

// Labels index into each row, so an out-of-range one would read outside it.
at::Tensor checked_labels(const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  at::Tensor lab = labels.contiguous();
  checks::check_label_values(lab.const_data_ptr<int64_t>(), lab.size(0), V, ignore_index);
  return lab;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, double inv_temperature, int64_t ignore_index, int64_t chunk_size) {
  linear_logprobs::check_inputs(hidden, weight, bias, labels, inv_temperature, chunk_size,
                                at::kCPU);
  const at::Tensor lab = checked_labels(labels, weight.size(0), ignore_index);
  return linear_logprobs::forward<CpuRows>(hidden, weight, bias, lab, inv_temperature,
                                           ignore_index, chunk_size, kBudgetBytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd_cpu(
    const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
    const at::Tensor& lse, const at::Tensor& entropy, double inv_temperature,
    int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> output_mask) {
  linear_logprobs::check_inputs(hidden, weight, bias, labels, inv_temperature, chunk_size,
                                at::kCPU);
  const at::Tensor lab = checked_labels(labels, weight.size(0), ignore_index);
  return linear_logprobs::backward<CpuRows>(grad_logp, grad_entropy, hidden, weight, bias, lab,
                                            lse, entropy, inv_temperature, ignore_index,
                                            chunk_size, output_mask, kBudgetBytes);
}

TORCH_LIBRARY_IMPL(icpo, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &linear_token_logprobs_fwd_cpu);
  m.impl("linear_token_logprobs_bwd", &linear_token_logprobs_bwd_cpu);
}

}  // namespace icpo
