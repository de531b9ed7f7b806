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

// Bounds checks that keep the kernels memory-safe; the Python wrapper has already given the
// user a friendlier message for anything caught here. O(B) reads, cheap next to O(T) work.
template <typename index_t>
void check_bounds(const index_t* cu, int64_t num_segments, int64_t total) {
  TORCH_CHECK(cu[0] == 0, "cu_seqlens must start at 0, got ", int64_t(cu[0]));
  TORCH_CHECK(int64_t(cu[num_segments]) == total, "cu_seqlens must end at ", total, ", got ",
              int64_t(cu[num_segments]));
  for (int64_t b = 0; b < num_segments; ++b) {
    TORCH_CHECK(cu[b] <= cu[b + 1], "cu_seqlens must be non-decreasing, but cu_seqlens[", b + 1,
                "] = ", int64_t(cu[b + 1]), " < cu_seqlens[", b, "] = ", int64_t(cu[b]));
  }
}

void check_inputs(const at::Tensor& x, const char* x_name, const at::Tensor& cu_seqlens) {
  TORCH_CHECK(x.device().is_cpu(), x_name, " must be on cpu, got ", x.device());
  ICPO_CHECK_DEVICE(cu_seqlens, x.device());
  TORCH_CHECK(x.dim() == 1, x_name, " must be 1-D, got shape ", x.sizes());
  ICPO_CHECK_DIM(cu_seqlens, 1);
  ICPO_CHECK_INDEX(cu_seqlens);
  TORCH_CHECK(cu_seqlens.numel() >= 1, "cu_seqlens must hold at least one element (B + 1)");
}

at::Tensor segment_mean_cpu(const at::Tensor& values, const at::Tensor& cu_seqlens) {
  check_inputs(values, "values", cu_seqlens);
  ICPO_CHECK_FLOATING(values);
  const at::Tensor x = values.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t num_segments = cu.numel() - 1;
  const int64_t total = x.numel();
  at::Tensor out = at::empty({num_segments}, x.options());
  AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_mean_cpu", [&] {
    check_bounds(cu.const_data_ptr<index_t>(), num_segments, total);
  });
  cpu::kernels().segment_mean(x, cu, out);
  return out;
}

at::Tensor segment_mean_bwd_cpu(const at::Tensor& grad, const at::Tensor& cu_seqlens,
                                int64_t total) {
  check_inputs(grad, "grad", cu_seqlens);
  ICPO_CHECK_FLOATING(grad);
  ICPO_CHECK_SIZE(grad, 0, cu_seqlens.numel() - 1);
  TORCH_CHECK(total >= 0, "total must be >= 0, got ", total);
  const at::Tensor g = grad.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t num_segments = cu.numel() - 1;
  at::Tensor out = at::empty({total}, g.options());
  AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_mean_bwd_cpu", [&] {
    check_bounds(cu.const_data_ptr<index_t>(), num_segments, total);
  });
  cpu::kernels().segment_mean_bwd(g, cu, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(icpo, CPU, m) {
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("segment_mean_bwd", &segment_mean_bwd_cpu);
}

}  // namespace icpo
