// token_logprobs forward / backward row kernels, compiled once per instruction set (see
// kernels.h). The op wrappers with the input checks are in csrc/token_logprobs.cpp.
//
// Forward: one pass over each row's vocabulary with an online max / sum-exp. The row is walked in
// blocks small enough to stay in L1 (kBlock elements): a first sweep finds the block max (and
// flags non-finite values), a second sweep adds exp(z - m) with the running max m, so every
// element costs exactly one exp and each block one rescale of the accumulators. Nothing of size
// T x V is allocated. Backward: one sweep per row writing grad_logits directly in logits' dtype.
//
// Vectorization: at::vec uses AVX-512 / AVX2 only where CPU_CAPABILITY_AVX512 / _AVX2 is defined,
// which the build does per variant (cmake/icpo_cpu_kernels.cmake); the "default" variant runs the
// same code on at::vec's generic path. The "native" variant (ICPO_NATIVE=ON) derives the
// capability from what -march=native enables, in cpu/native_capability.h.
#include "cpu/native_capability.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cpu/kernels.h"

namespace icpo::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Elements per block: 1024 fp32 = 4 KiB, resident in L1 between the max sweep and the exp sweep
// (measured: 512-8192 are within ~10% of each other; 1024 was fastest here).
constexpr int64_t kBlock = 1024;
// Rows are split across threads in chunks of at least this many logits.
constexpr int64_t kGrainElems = 1 << 15;

// Loads / stores 2 * Vec::size() elements of scalar_t as two accumulator vectors (bf16 / fp16
// widen to fp32 in registers). Two vectors per step also gives two independent add chains.
template <typename scalar_t>
struct VecIO {
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

// fp32: exp_u20 is an inline polynomial (no Sleef call), plenty for an fp32 softmax.
// fp64 (gradcheck only): exact std::exp per lane.
template <typename acc_t>
Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.map(exp_scalar);
  }
}

template <typename acc_t>
struct RowStats {
  acc_t lse;      // NaN when the row holds a non-finite value
  acc_t entropy;  // of softmax(z)
  acc_t max;      // max z, so logp = (z_label - max) - log(sum)
  acc_t log_sum;  // log sum exp(z - max)
};

// Online log-sum-exp and entropy of z = x * inv_t over one row of V elements.
// Entropy uses u = z - m <= 0: H = log s - (sum e^u u) / s, two non-negative terms, no cancellation.
template <typename scalar_t>
RowStats<at::opmath_type<scalar_t>> row_forward(const scalar_t* x, int64_t V,
                                                at::opmath_type<scalar_t> inv_t) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const Vec vinv(inv_t), vzero(acc_t(0));
  Vec vs0(acc_t(0)), vs1(acc_t(0)), vw0(acc_t(0)), vw1(acc_t(0)), vbad(acc_t(0));
  acc_t ts = 0, tw = 0, tbad = 0, m = kNegInf;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const scalar_t* xb = x + b0;
    const int64_t n = std::min(kBlock, V - b0);
    const int64_t nv = n - n % IO::kStep;
    // Sweep 1: block max; z * 0 is NaN exactly when z is NaN or +-inf, so vbad flags bad rows.
    Vec vm0(kNegInf), vm1(kNegInf), a, b;
    for (int64_t i = 0; i < nv; i += IO::kStep) {
      IO::load(xb + i, a, b);
      a = a * vinv;
      b = b * vinv;
      vm0 = at::vec::maximum(vm0, a);
      vm1 = at::vec::maximum(vm1, b);
      vbad = at::vec::fmadd(a, vzero, at::vec::fmadd(b, vzero, vbad));
    }
    acc_t bm = kNegInf;
    if (nv > 0) {
      bm = at::vec::vec_reduce_all<acc_t>(
          [](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, at::vec::maximum(vm0, vm1));
    }
    for (int64_t i = nv; i < n; ++i) {
      const acc_t z = static_cast<acc_t>(xb[i]) * inv_t;
      bm = std::max(bm, z);
      tbad += z * acc_t(0);
    }
    if (bm > m) {
      if (m != kNegInf) {  // rescale what earlier blocks summed to the new max
        const acc_t d = m - bm, c = std::exp(d);
        const Vec vd(d), vc(c);
        vw0 = vc * at::vec::fmadd(vd, vs0, vw0);
        vw1 = vc * at::vec::fmadd(vd, vs1, vw1);
        vs0 = vs0 * vc;
        vs1 = vs1 * vc;
        tw = c * (tw + d * ts);
        ts *= c;
      }
      m = bm;
    }
    // Sweep 2 (block now in L1): one exp per element, summed per block first and then into the
    // row's totals. Summed straight into the totals, the terms of a lane that already holds the
    // max's exp(0) = 1 are absorbed: at V = 151936 with one dominant logit, ~4700 terms of ~1e-8
    // each fell below half an ulp of 1 and lse came out 2.8e-5 low (15 ulps).
    const Vec vm(m);
    Vec bs0(acc_t(0)), bs1(acc_t(0)), bw0(acc_t(0)), bw1(acc_t(0));
    for (int64_t i = 0; i < nv; i += IO::kStep) {
      IO::load(xb + i, a, b);
      const Vec ua = at::vec::fmsub(a, vinv, vm), ub = at::vec::fmsub(b, vinv, vm);
      const Vec ea = vexp(ua), eb = vexp(ub);
      bs0 = bs0 + ea;
      bs1 = bs1 + eb;
      bw0 = at::vec::fmadd(ea, ua, bw0);
      bw1 = at::vec::fmadd(eb, ub, bw1);
    }
    vs0 = vs0 + bs0;
    vs1 = vs1 + bs1;
    vw0 = vw0 + bw0;
    vw1 = vw1 + bw1;
    for (int64_t i = nv; i < n; ++i) {
      const acc_t u = static_cast<acc_t>(xb[i]) * inv_t - m;
      const acc_t e = std::exp(u);
      ts += e;
      tw += e * u;
    }
  }
  auto sum = [](Vec& p, Vec& q) { return p + q; };
  const acc_t s = at::vec::vec_reduce_all<acc_t>(sum, vs0 + vs1) + ts;
  const acc_t w = at::vec::vec_reduce_all<acc_t>(sum, vw0 + vw1) + tw;
  const acc_t bad = at::vec::vec_reduce_all<acc_t>(sum, vbad) + tbad;
  const acc_t log_s = std::log(s);
  RowStats<acc_t> out{m + log_s, log_s - w / s, m, log_s};
  if (bad != acc_t(0)) out.lse = std::numeric_limits<acc_t>::quiet_NaN();
  return out;
}

// grad_x = inv_t * (g_logp * (onehot - p) - g_H * p * (u + H)), u = z - lse, p = e^u.
template <typename scalar_t>
void row_backward(const scalar_t* x, scalar_t* gx, int64_t V, int64_t label,
                  at::opmath_type<scalar_t> inv_t, at::opmath_type<scalar_t> g_logp,
                  at::opmath_type<scalar_t> g_h, at::opmath_type<scalar_t> lse,
                  at::opmath_type<scalar_t> entropy) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const acc_t c1 = inv_t * g_logp, c2 = inv_t * g_h;
  const Vec vinv(inv_t), vlse(lse), vh(entropy), vnc1(-c1), vnc2(-c2);
  const int64_t nv = V - V % IO::kStep;
  Vec a, b;
  for (int64_t i = 0; i < nv; i += IO::kStep) {
    IO::load(x + i, a, b);
    const Vec ua = at::vec::fmsub(a, vinv, vlse), ub = at::vec::fmsub(b, vinv, vlse);
    const Vec ga = vexp(ua) * at::vec::fmadd(ua + vh, vnc2, vnc1);
    const Vec gb = vexp(ub) * at::vec::fmadd(ub + vh, vnc2, vnc1);
    IO::store(gx + i, ga, gb);
  }
  for (int64_t i = nv; i < V; ++i) {
    const acc_t u = static_cast<acc_t>(x[i]) * inv_t - lse;
    gx[i] = static_cast<scalar_t>(-std::exp(u) * (c1 + c2 * (u + entropy)));
  }
  // The one-hot term, recomputed in acc precision so the label's gradient is rounded once.
  const acc_t u = static_cast<acc_t>(x[label]) * inv_t - lse;
  gx[label] = static_cast<scalar_t>(c1 - std::exp(u) * (c1 + c2 * (u + entropy)));
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, kGrainElems / V); }

}  // namespace

void token_logprobs_fwd(const at::Tensor& logits, const int64_t* lab_p, double inv_temperature,
                        int64_t ignore_index, at::Tensor& logp, at::Tensor& entropy,
                        at::Tensor& lse) {
  const int64_t T = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "token_logprobs_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    acc_t* logp_p = logp.data_ptr<acc_t>();
    acc_t* ent_p = entropy.data_ptr<acc_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    at::parallel_for(0, T, grain_rows(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x + r * row_stride;
        const RowStats<acc_t> st = row_forward<scalar_t>(row, V, inv_t);
        lse_p[r] = st.lse;
        if (lab_p[r] == ignore_index) {
          logp_p[r] = ent_p[r] = acc_t(0);
        } else {
          const acc_t z = static_cast<acc_t>(row[lab_p[r]]) * inv_t;
          logp_p[r] = (z - st.max) - st.log_sum;
          ent_p[r] = st.entropy;
        }
      }
    });
  });
}

void token_logprobs_bwd(const at::Tensor& logits, const int64_t* lab_p, const at::Tensor& gl,
                        const at::Tensor& gh, const at::Tensor& ls, const at::Tensor& en,
                        double inv_temperature, int64_t ignore_index, at::Tensor& grad) {
  const int64_t T = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "token_logprobs_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* gx = grad.data_ptr<scalar_t>();
    const acc_t *gl_p = gl.const_data_ptr<acc_t>(), *gh_p = gh.const_data_ptr<acc_t>();
    const acc_t *ls_p = ls.const_data_ptr<acc_t>(), *en_p = en.const_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    at::parallel_for(0, T, grain_rows(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* out = gx + r * V;
        if (lab_p[r] == ignore_index) {
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        row_backward<scalar_t>(x + r * row_stride, out, V, lab_p[r], inv_t, gl_p[r], gh_p[r],
                               ls_p[r], en_p[r]);
      }
    });
  });
}

}  // namespace icpo::cpu::CPU_CAPABILITY
