// CPU ops icpo::token_logprobs_fwd / token_logprobs_bwd (schemas in ops.cpp): input checks and
// output allocation. The row kernels are in csrc/cpu/token_logprobs_kernel.cpp, compiled once per
// instruction set and chosen at run time (csrc/cpu_dispatch.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "checks.h"
#include "cpu/kernels.h"

namespace icpo {
namespace {

void check_common(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature) {
  ICPO_CHECK_DEVICE(logits, at::kCPU);
  ICPO_CHECK_DEVICE(labels, at::kCPU);
  ICPO_CHECK_DIM(logits, 2);
  ICPO_CHECK_FLOATING(logits);
  ICPO_CHECK_DIM(labels, 1);
  ICPO_CHECK_DTYPE(labels, at::kLong);
  ICPO_CHECK_SIZE(labels, 0, logits.size(0));
  TORCH_CHECK(logits.size(1) >= 1, "logits must have a vocabulary dimension >= 1, got shape ",
              logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1,
              "logits must have unit stride along the vocabulary, got strides ", logits.strides());
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
}

// Labels index into each row, so an out-of-range one would read outside the row: refuse it here
// too (the Python wrapper reports it more helpfully, but compiled graphs skip that check).
void check_labels(const int64_t* lab, int64_t T, int64_t V, int64_t ignore_index) {
  for (int64_t r = 0; r < T; ++r) {
    TORCH_CHECK(lab[r] == ignore_index || (lab[r] >= 0 && lab[r] < V), "labels[", r, "] = ",
                lab[r], " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
  }
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// grad_logits is T x V (GBs at LLM sizes) and freshly mmap-ed, so its first write faults pages in
// 4 KiB at a time; on VMs that costs more than the kernel itself. Asking for transparent huge
// pages before the first touch (what torch does under THP_MEM_ALLOC_ENABLE) cuts the faults 512x.
// Best effort: ignored where THP is off or unsupported.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits,
                                                                      const at::Tensor& labels,
                                                                      double inv_temperature,
                                                                      int64_t ignore_index) {
  check_common(logits, labels, inv_temperature);
  const int64_t T = logits.size(0), V = logits.size(1);
  const at::Tensor lab = labels.contiguous();
  const int64_t* lab_p = lab.data_ptr<int64_t>();
  check_labels(lab_p, T, V, ignore_index);
  const auto opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor logp = at::empty({T}, opts), entropy = at::empty({T}, opts), lse = at::empty({T}, opts);
  cpu::kernels().token_logprobs_fwd(logits, lab_p, inv_temperature, ignore_index, logp, entropy,
                                    lse);
  return {logp, entropy, lse};
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, const at::Tensor& entropy,
                                  double inv_temperature, int64_t ignore_index) {
  check_common(logits, labels, inv_temperature);
  const int64_t T = logits.size(0), V = logits.size(1);
  for (const at::Tensor* t : {&grad_logp, &grad_entropy, &lse, &entropy}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == T && t->device() == logits.device(),
                "token_logprobs_bwd: grad_logp, grad_entropy, lse and entropy must be [", T,
                "] on ", logits.device(), ", got shape ", t->sizes(), " on ", t->device());
  }
  const at::ScalarType acc = acc_dtype(logits);
  const at::Tensor lab = labels.contiguous();
  const at::Tensor gl = grad_logp.to(acc).contiguous(), gh = grad_entropy.to(acc).contiguous();
  const at::Tensor ls = lse.to(acc).contiguous(), en = entropy.to(acc).contiguous();
  const int64_t* lab_p = lab.data_ptr<int64_t>();
  check_labels(lab_p, T, V, ignore_index);
  at::Tensor grad = at::empty({T, V}, logits.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  cpu::kernels().token_logprobs_bwd(logits, lab_p, gl, gh, ls, en, inv_temperature, ignore_index,
                                    grad);
  return grad;
}

TORCH_LIBRARY_IMPL(icpo, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cpu);
}

}  // namespace icpo
