// CPU ops icpo::token_logprobs_fwd / token_logprobs_bwd (schemas in ops.cpp): input checks and
// output allocation. The row kernels are in csrc/cpu/token_logprobs_kernel.cpp, compiled once per
// instruction set and chosen at run time (csrc/cpu_dispatch.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "checks.h"
#include "cpu/kernels.h"

namespace icpo {
namespace {

// grad_logits is T x V (GBs at LLM sizes) and freshly mmap-ed, so its first write faults pages in
// 4 KiB at a time. Asking for transparent huge pages before that first touch (what torch does
// under THP_MEM_ALLOC_ENABLE) cuts the faults 512x, but the kernel must then find (or compact)
// free 2 MiB frames, compacting memory inside the fault: on this project's VMs a first backward at
// [4096, 151936] fp32 took 11-39 s with the hint against 1.2-5.3 s without (docs/cpu_kernels.md).
// So the hint is opt-in: ICPO_HUGE_PAGES=1 (0 or unset: off), read on the first backward. Best
// effort: ignored where THP is off or unsupported.
bool huge_pages_requested() {
  static const bool on = [] {
    const char* env = std::getenv("ICPO_HUGE_PAGES");
    const std::string value = env ? env : "";
    TORCH_CHECK(value.empty() || value == "0" || value == "1",
                "ICPO_HUGE_PAGES must be 0 or 1 (unset: 0), got '", value, "'");
    return value == "1";
  }();
  return on;
}

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
  checks::check_token_logprobs(logits, labels, inv_temperature, at::kCPU);
  const int64_t T = logits.size(0), V = logits.size(1);
  const at::Tensor lab = labels.contiguous();
  const int64_t* lab_p = lab.data_ptr<int64_t>();
  checks::check_label_values(lab_p, T, V, ignore_index);
  const auto opts = logits.options().dtype(checks::acc_dtype(logits));
  at::Tensor logp = at::empty({T}, opts), entropy = at::empty({T}, opts),
             lse = at::empty({T}, opts);
  cpu::kernels().token_logprobs_fwd(logits, lab_p, inv_temperature, ignore_index, logp, entropy,
                                    lse);
  return {logp, entropy, lse};
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, const at::Tensor& entropy,
                                  double inv_temperature, int64_t ignore_index) {
  checks::check_token_logprobs(logits, labels, inv_temperature, at::kCPU);
  const int64_t T = logits.size(0), V = logits.size(1);
  const at::Tensor gl = checks::row_vector(grad_logp, "grad_logp", logits);
  const at::Tensor gh = checks::row_vector(grad_entropy, "grad_entropy", logits);
  const at::Tensor ls = checks::row_vector(lse, "lse", logits);
  const at::Tensor en = checks::row_vector(entropy, "entropy", logits);
  const at::Tensor lab = labels.contiguous();
  const int64_t* lab_p = lab.data_ptr<int64_t>();
  checks::check_label_values(lab_p, T, V, ignore_index);
  at::Tensor grad = at::empty({T, V}, logits.options());
  if (huge_pages_requested()) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  cpu::kernels().token_logprobs_bwd(logits, lab_p, gl, gh, ls, en, inv_temperature, ignore_index,
                                    grad);
  return grad;
}

TORCH_LIBRARY_IMPL(icpo, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cpu);
}

}  // namespace icpo
