// segment_mean / segment_mean_bwd on CPU: per-segment means of a packed [T] tensor (step 3,
// the length-normalized confidence of Eq. 7) and their gradient. Segments are given by
// cu_seqlens [B+1] (int32 or int64) in the flash-attention varlen convention.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "checks.h"

namespace icpo {
namespace {

// Elements per parallel chunk (ATen's own GRAIN_SIZE): a sum costs well under 1 ns per element,
// so smaller chunks would pay more in OpenMP fork/join than they save.
constexpr int64_t kElementsPerChunk = 32768;

// Segments per chunk so that a chunk holds about kElementsPerChunk elements on average.
int64_t segment_grain(int64_t num_segments, int64_t total) {
  if (total <= 0) return std::max<int64_t>(num_segments, 1);
  return std::max<int64_t>(1, num_segments * kElementsPerChunk / total);
}

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
    const index_t* cu_ptr = cu.const_data_ptr<index_t>();
    check_bounds(cu_ptr, num_segments, total);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_mean_cpu",
                                    [&] {
      // opmath: float for float/half/bfloat16, double for double.
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
      scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, num_segments, segment_grain(num_segments, total),
                       [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t start = cu_ptr[b];
          const int64_t len = int64_t(cu_ptr[b + 1]) - start;
          if (len == 0) {  // the wrapper refuses empty segments; the mean of nothing is NaN
            out_ptr[b] = std::numeric_limits<scalar_t>::quiet_NaN();
            continue;
          }
          // reduce_all accumulates half/bfloat16 in float vectors, float/double as themselves.
          const acc_t sum = at::vec::reduce_all<scalar_t>(
              [](auto a, auto b) { return a + b; }, x_ptr + start, len);
          out_ptr[b] = static_cast<scalar_t>(sum / static_cast<acc_t>(len));
        }
      });
    });
  });
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
    const index_t* cu_ptr = cu.const_data_ptr<index_t>();
    check_bounds(cu_ptr, num_segments, total);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                    "segment_mean_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
      scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, num_segments, segment_grain(num_segments, total),
                       [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t start = cu_ptr[b];
          const int64_t stop = cu_ptr[b + 1];
          if (stop == start) continue;
          const acc_t share = static_cast<acc_t>(g_ptr[b]) / static_cast<acc_t>(stop - start);
          std::fill(out_ptr + start, out_ptr + stop, static_cast<scalar_t>(share));
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(icpo, CPU, m) {
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("segment_mean_bwd", &segment_mean_bwd_cpu);
}

}  // namespace icpo
