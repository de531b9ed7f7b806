// The vectorized CPU kernels, compiled once per instruction set and chosen at run time.
//
// Every .cpp file in csrc/cpu/ is compiled several times (cmake/icpo_cpu_kernels.cmake): once
// with no ISA flags ("default", any x86-64 or other CPU), and on x86-64 with -mavx2 -mfma -mf16c
// ("avx2") and with -mavx512{f,bw,vl,dq} ("avx512"), or once with -march=native when built with
// ICPO_NATIVE=ON ("native"). Each compilation defines CPU_CAPABILITY=icpo_<isa> (and
// CPU_CAPABILITY_AVX2 / _AVX512, which make at::vec use those instructions), so its functions
// and its at::vec::Vectorized instantiations live in their own namespace: the variants cannot
// collide at link time (the ODR), the way PyTorch builds its own aten/src/ATen/native/cpu kernels.
// csrc/cpu_dispatch.cpp picks one variant for the CPU it runs on; the op wrappers in
// csrc/token_logprobs.cpp and csrc/segment_mean.cpp check inputs, allocate outputs and call it.
//
// Rules for files in csrc/cpu/: put the entry points below in namespace
// icpo::cpu::CPU_CAPABILITY and everything else in an anonymous namespace inside it; include
// nothing that registers ops; checks happen in the wrappers (the kernels trust their inputs).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace icpo::cpu {

// The entry points every variant defines. Outputs are allocated by the caller.
#define ICPO_CPU_KERNEL_DECLS                                                                     \
  /* logits [T, V] (unit column stride), labels int64 [T] (validated); writes logp, entropy and \
     lse [T] (float, or double for double logits). */                                            \
  void token_logprobs_fwd(const at::Tensor& logits, const int64_t* labels,                        \
                          double inv_temperature, int64_t ignore_index, at::Tensor& logp,         \
                          at::Tensor& entropy, at::Tensor& lse);                                  \
  /* grad_logp, grad_entropy, lse, entropy: contiguous [T] in the accumulation dtype; writes     \
     grad [T, V] (contiguous, logits' dtype). */                                                  \
  void token_logprobs_bwd(const at::Tensor& logits, const int64_t* labels,                        \
                          const at::Tensor& grad_logp, const at::Tensor& grad_entropy,            \
                          const at::Tensor& lse, const at::Tensor& entropy,                       \
                          double inv_temperature, int64_t ignore_index, at::Tensor& grad);        \
  /* In place: logits [R, n] (unit column stride) holds columns [col0, col0 + n) of R rows;   \
     labels [R] (validated, absolute), grad_logp, grad_entropy, lse, entropy: contiguous [R] in \
     the accumulation dtype. Each row becomes its d(loss)/d(logits) (zero on ignored rows). */   \
  void linear_token_logprobs_dlogits(at::Tensor& logits, const int64_t* labels, int64_t col0,    \
                                     const at::Tensor& grad_logp, const at::Tensor& grad_entropy, \
                                     const at::Tensor& lse, const at::Tensor& entropy,            \
                                     double inv_temperature, int64_t ignore_index);               \
  /* values [T] contiguous, cu_seqlens [B+1] contiguous (validated) -> out [B]. */               \
  void segment_mean(const at::Tensor& values, const at::Tensor& cu_seqlens, at::Tensor& out);    \
  /* grad [B] contiguous, cu_seqlens [B+1] contiguous (validated) -> out [T]. */                 \
  void segment_mean_bwd(const at::Tensor& grad, const at::Tensor& cu_seqlens, at::Tensor& out);

namespace icpo_default { ICPO_CPU_KERNEL_DECLS }
namespace icpo_avx2 { ICPO_CPU_KERNEL_DECLS }
namespace icpo_avx512 { ICPO_CPU_KERNEL_DECLS }
namespace icpo_native { ICPO_CPU_KERNEL_DECLS }

// One compiled variant's entry points.
struct Kernels {
  const char* name;  // "default", "avx2", "avx512" or "native"
  decltype(&icpo_default::token_logprobs_fwd) token_logprobs_fwd;
  decltype(&icpo_default::token_logprobs_bwd) token_logprobs_bwd;
  decltype(&icpo_default::linear_token_logprobs_dlogits) linear_token_logprobs_dlogits;
  decltype(&icpo_default::segment_mean) segment_mean;
  decltype(&icpo_default::segment_mean_bwd) segment_mean_bwd;
};

// The variant in use (csrc/cpu_dispatch.cpp): chosen on first use from the CPU, ATen's
// capability (ATEN_CPU_CAPABILITY) and ICPO_CPU_CAPABILITY, or by set_cpu_capability.
const Kernels& kernels();

}  // namespace icpo::cpu
