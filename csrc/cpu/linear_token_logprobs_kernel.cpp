// The in-place dlogits row kernel of icpo::linear_token_logprobs_bwd, compiled once per
// instruction set (see kernels.h). The op and its chunking are in csrc/linear_token_logprobs.cpp.
//
// token_logprobs_bwd's row kernel cannot serve here: it reads logits[label] after its vector
// sweep has stored over it (wrong in place), assumes the label lies in the row it is given and
// writes rows at stride V. This one works on a tile of columns [col0, col0 + n) of each row, in
// place: it reads the label's logit before the sweep, and applies the one-hot term only in the
// tile that holds the label.
#include "cpu/native_capability.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "cpu/kernels.h"

namespace icpo::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Rows are split across threads in chunks of at least this many logits.
constexpr int64_t kGrainElems = 1 << 15;

// Two accumulator vectors per step (bf16 / fp16 widen to fp32 in registers).
template <typename scalar_t>
struct Io {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      static_assert(Vectorized<scalar_t>::size() == kStep);
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    }
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a.store(p);
      b.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    }
  }
};

double exp_scalar(double x) { return std::exp(x); }

// The same exp as token_logprobs' kernels (fp32: exp_u20; fp64, for gradcheck: std::exp), so
// the recomputed probabilities match the forward's lse.
template <typename acc_t>
Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.map(exp_scalar);
  }
}

// x[i] <- inv_t * (g_logp * (onehot - p_i) - g_h * p_i * (u_i + H)), u = z - lse, p = e^u, for
// the n columns of one row tile; `label` is the label's column in the tile or -1.
template <typename scalar_t>
void row_dlogits(scalar_t* x, int64_t n, int64_t label, at::opmath_type<scalar_t> inv_t,
                 at::opmath_type<scalar_t> g_logp, at::opmath_type<scalar_t> g_h,
                 at::opmath_type<scalar_t> lse, at::opmath_type<scalar_t> entropy) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const acc_t c1 = inv_t * g_logp, c2 = inv_t * g_h;
  // Read before the sweep overwrites it.
  const acc_t x_label = label >= 0 ? static_cast<acc_t>(x[label]) : acc_t(0);
  const Vec vinv(inv_t), vlse(lse), vh(entropy), vnc1(-c1), vnc2(-c2);
  const int64_t nv = n - n % IO::kStep;
  Vec a, b;
  for (int64_t i = 0; i < nv; i += IO::kStep) {
    IO::load(x + i, a, b);
    const Vec ua = at::vec::fmsub(a, vinv, vlse), ub = at::vec::fmsub(b, vinv, vlse);
    IO::store(x + i, vexp(ua) * at::vec::fmadd(ua + vh, vnc2, vnc1),
              vexp(ub) * at::vec::fmadd(ub + vh, vnc2, vnc1));
  }
  for (int64_t i = nv; i < n; ++i) {
    const acc_t u = static_cast<acc_t>(x[i]) * inv_t - lse;
    x[i] = static_cast<scalar_t>(-std::exp(u) * (c1 + c2 * (u + entropy)));
  }
  if (label >= 0) {  // the one-hot term, in acc precision so the label's value is rounded once
    const acc_t u = x_label * inv_t - lse;
    x[label] = static_cast<scalar_t>(c1 - std::exp(u) * (c1 + c2 * (u + entropy)));
  }
}

}  // namespace

void linear_token_logprobs_dlogits(at::Tensor& logits, const int64_t* lab_p, int64_t col0,
                                   const at::Tensor& gl, const at::Tensor& gh,
                                   const at::Tensor& ls, const at::Tensor& en,
                                   double inv_temperature, int64_t ignore_index) {
  const int64_t R = logits.size(0), n = logits.size(1), row_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "linear_token_logprobs_dlogits_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* x = logits.data_ptr<scalar_t>();
    const acc_t *gl_p = gl.const_data_ptr<acc_t>(), *gh_p = gh.const_data_ptr<acc_t>();
    const acc_t *ls_p = ls.const_data_ptr<acc_t>(), *en_p = en.const_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    at::parallel_for(0, R, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(n, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = x + r * row_stride;
        if (lab_p[r] == ignore_index) {
          std::fill(row, row + n, scalar_t(0));
          continue;
        }
        const int64_t j = lab_p[r] - col0;
        row_dlogits<scalar_t>(row, n, (j >= 0 && j < n) ? j : -1, inv_t, gl_p[r], gh_p[r],
                              ls_p[r], en_p[r]);
      }
    });
  });
}

}  // namespace icpo::cpu::CPU_CAPABILITY
