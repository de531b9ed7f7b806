// segment_mean / segment_mean_bwd on CPU: per-segment means of a packed [T] tensor (step 3,
// the length-normalized confidence of Eq. 7) and their gradient. Segments are given by
// cu_seqlens [B+1] (int32 or int64) in the flash-attention varlen convention. These wrappers check
// and allocate; the loops are in csrc/cpu/segment_mean_kernel.cpp, built per instruction set.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace icpo {
namespace {

// The offsets' values keep the kernels memory-safe; the Python wrapper has already given the
// user a friendlier message for anything caught here. O(B) reads, cheap next to O(T) work.
void check_cu_seqlens_values(const at::Tensor& cu, int64_t total) {
  AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_mean_cpu", [&] {
    checks::check_offset_values(cu.const_data_ptr<index_t>(), cu.numel() - 1, total, "cu_seqlens",
                                "T");
  });
}

at::Tensor segment_mean_cpu(const at::Tensor& values, const at::Tensor& cu_seqlens) {
  checks::check_segment_mean(values, "values", cu_seqlens, at::kCPU);
  const at::Tensor x = values.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  check_cu_seqlens_values(cu, x.numel());
  at::Tensor out = at::empty({cu.numel() - 1}, x.options());
  cpu::kernels().segment_mean(x, cu, out);
  return out;
}

at::Tensor segment_mean_bwd_cpu(const at::Tensor& grad, const at::Tensor& cu_seqlens,
                                int64_t total) {
  checks::check_segment_mean_bwd(grad, cu_seqlens, total, at::kCPU);
  const at::Tensor g = grad.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  check_cu_seqlens_values(cu, total);
  at::Tensor out = at::empty({total}, g.options());
  cpu::kernels().segment_mean_bwd(g, cu, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(icpo, CPU, m) {
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("segment_mean_bwd", &segment_mean_bwd_cpu);
}

}  // namespace icpo
