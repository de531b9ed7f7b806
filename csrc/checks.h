// Input checks shared by the CPU and CUDA implementations. Each names the argument and what was
// expected, so a bad call fails at the boundary with a message the user can act on.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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
