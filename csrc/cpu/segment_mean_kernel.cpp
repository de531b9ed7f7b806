// segment_mean / segment_mean_bwd loops, compiled once per instruction set (see kernels.h). The
// op wrappers with the input checks are in csrc/segment_mean.cpp.
#include "cpu/native_capability.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

#include "cpu/kernels.h"

namespace icpo::cpu::CPU_CAPABILITY {
namespace {

// Elements per parallel chunk (ATen's own GRAIN_SIZE): a sum costs well under 1 ns per element,
// so smaller chunks would pay more in OpenMP fork/join than they save.
constexpr int64_t kElementsPerChunk = 32768;

// Segments per chunk so that a chunk holds about kElementsPerChunk elements on average.
int64_t segment_grain(int64_t num_segments, int64_t total) {
  if (total <= 0) return std::max<int64_t>(num_segments, 1);
  return std::max<int64_t>(1, num_segments * kElementsPerChunk / total);
}

}  // namespace

void segment_mean(const at::Tensor& x, const at::Tensor& cu, at::Tensor& out) {
  const int64_t num_segments = cu.numel() - 1;
  const int64_t total = x.numel();
  AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_mean_cpu", [&] {
    const index_t* cu_ptr = cu.const_data_ptr<index_t>();
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
}

void segment_mean_bwd(const at::Tensor& g, const at::Tensor& cu, at::Tensor& out) {
  const int64_t num_segments = cu.numel() - 1;
  const int64_t total = out.numel();
  AT_DISPATCH_INDEX_TYPES(cu.scalar_type(), "segment_mean_bwd_cpu", [&] {
    const index_t* cu_ptr = cu.const_data_ptr<index_t>();
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
}

}  // namespace icpo::cpu::CPU_CAPABILITY
