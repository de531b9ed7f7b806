// Picks which compiled variant of the csrc/cpu/ kernels runs (see cpu/kernels.h), and exposes the
// choice as ops: icpo::cpu_capability() -> str, icpo::supported_cpu_capabilities() -> str[],
// icpo::set_cpu_capability(str) -> str (wrapped in icpo/ops/cpu.py).
//
// Automatic choice: the best variant this CPU *and its OS* can run (CPUID feature bits plus the
// XCR0 register, which says whether the kernel saves the YMM / ZMM state: a CPU with AVX-512
// under an OS or hypervisor that does not enable it must not run AVX-512 code), lowered to ATen's
// own capability so ATEN_CPU_CAPABILITY=avx2|default also steers these kernels. The environment
// variable ICPO_CPU_CAPABILITY=default|avx2|avx512 forces one (for tests and benchmarks) and is
// refused, with the reason, when the CPU cannot run it.
//
// This file is compiled without ISA flags, like every other file outside csrc/cpu/.
#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define ICPO_X86_CPUID 1
#endif

#include "cpu/kernels.h"

namespace icpo::cpu {
namespace {

// Variants in increasing order of preference. Which exist depends on the build (the
// ICPO_CPU_HAVE_* definitions come from cmake/icpo_cpu_kernels.cmake).
enum Level : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

struct Variant {
  Kernels kernels;
  Level level;  // the instructions the variant needs
};

#define ICPO_VARIANT(isa, name, level)                                                        \
  Variant {                                                                                   \
    Kernels{name, &isa::token_logprobs_fwd, &isa::token_logprobs_bwd,                        \
            &isa::linear_token_logprobs_dlogits, &isa::segment_mean, &isa::segment_mean_bwd}, \
        level                                                                                 \
  }

const Variant kVariants[] = {
    ICPO_VARIANT(icpo_default, "default", kDefault),
#if defined(ICPO_CPU_HAVE_NATIVE)
    // Needs the at::vec level -march=native enabled on the build machine (at least; other
    // extensions it enabled are not checked).
    ICPO_VARIANT(icpo_native, "native", Level(ICPO_CPU_NATIVE_LEVEL)),
#endif
#if defined(ICPO_CPU_HAVE_AVX2)
    ICPO_VARIANT(icpo_avx2, "avx2", kAvx2),
#endif
#if defined(ICPO_CPU_HAVE_AVX512)
    ICPO_VARIANT(icpo_avx512, "avx512", kAvx512),
#endif
};

#if defined(ICPO_X86_CPUID)
// XCR0, read with the raw xgetbv encoding so this file needs no -mxsave.
uint64_t read_xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}
#endif

// The highest level this CPU and OS can run, from CPUID and XCR0 (what the variants were
// compiled for: avx2 = AVX2 + FMA + F16C, avx512 = that + AVX-512 F/BW/VL/DQ).
Level hardware_level() {
#if defined(ICPO_X86_CPUID)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return kDefault;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!(osxsave && avx) || __get_cpuid_max(0, nullptr) < 7) return kDefault;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM0-15 upper, ZMM16-31
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
  if (!(ymm_state && avx2 && fma && f16c)) return kDefault;
  return zmm_state && avx512 ? kAvx512 : kAvx2;
#else
  return kDefault;
#endif
}

// ATen's choice for its own kernels (honours ATEN_CPU_CAPABILITY): "AVX512", "AVX2", "DEFAULT",
// or a non-x86 name, which means no x86 vector level.
Level aten_level() {
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") return kAvx512;
  if (cap == "AVX2") return kAvx2;
  return kDefault;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
  return s;
}

// Names of this build's variants, all of them or those the CPU can run.
std::string variant_names(bool runnable_only) {
  const Level hw = hardware_level();
  std::string names;
  for (const Variant& v : kVariants) {
    if (runnable_only && v.level > hw) continue;
    names += (names.empty() ? "" : ", ") + std::string(v.kernels.name);
  }
  return names;
}

const char* level_text(Level level) {
  switch (level) {
    case kAvx512: return "AVX-512 (F, BW, VL, DQ) with the OS saving ZMM state";
    case kAvx2: return "AVX2 + FMA + F16C with the OS saving YMM state";
    default: return "nothing";
  }
}

// The variant named `name` ("auto" or "" for the automatic choice); errors name what was wrong.
const Variant* resolve(const std::string& name, const char* source) {
  const std::string want = lower(name);
  const Level hw = hardware_level();
  if (want.empty() || want == "auto") {
    const Level cap = std::min(hw, aten_level());
    const Variant* best = &kVariants[0];
    for (const Variant& v : kVariants) {
      if (v.level <= cap && v.level >= best->level) best = &v;
    }
#if defined(ICPO_CPU_HAVE_NATIVE)
    // Fail loudly rather than fall back to the slow generic kernels unasked.
    TORCH_CHECK(kVariants[1].level <= hw, "icpo: these CPU kernels were built with -march=native "
                "(ICPO_NATIVE=ON) for a CPU with ", level_text(kVariants[1].level), ", which this "
                "one lacks. Rebuild without ICPO_NATIVE for a portable build, or set ",
                "ICPO_CPU_CAPABILITY=default to run the generic kernels.");
#endif
    return best;
  }
  for (const Variant& v : kVariants) {
    if (want != v.kernels.name) continue;
    TORCH_CHECK(v.level <= hw, source, "=", name, " needs a CPU with ", level_text(v.level),
                ", which this one lacks; it can run: ", variant_names(true));
    return &v;
  }
  TORCH_CHECK(false, source, "=", name, " is not a CPU kernel variant of this build; expected "
              "auto or one of: ", variant_names(false));
  return nullptr;  // unreachable
}

const Variant* from_environment() {
  const char* env = std::getenv("ICPO_CPU_CAPABILITY");
  return resolve(env ? env : "", "ICPO_CPU_CAPABILITY");
}

std::atomic<const Variant*> g_selected{nullptr};

const Variant& selected() {
  const Variant* v = g_selected.load(std::memory_order_acquire);
  if (v == nullptr) {
    // Racing first calls resolve the same answer; the first store wins.
    const Variant* fresh = from_environment();
    g_selected.compare_exchange_strong(v, fresh, std::memory_order_acq_rel);
    v = g_selected.load(std::memory_order_acquire);
  }
  return *v;
}

std::string cpu_capability() { return selected().kernels.name; }

std::vector<std::string> supported_cpu_capabilities() {
  std::vector<std::string> out;
  const Level hw = hardware_level();
  for (const Variant& v : kVariants) {
    if (v.level <= hw) out.emplace_back(v.kernels.name);
  }
  return out;
}

std::string set_cpu_capability(const std::string& name) {
  const Variant* v = resolve(name, "set_cpu_capability");
  g_selected.store(v, std::memory_order_release);
  return v->kernels.name;
}

}  // namespace

const Kernels& kernels() { return selected().kernels; }

}  // namespace icpo::cpu

TORCH_LIBRARY_FRAGMENT(icpo, m) {
  // The CPU kernel variant in use: "default", "avx2", "avx512" (or "native").
  m.def("cpu_capability() -> str", &icpo::cpu::cpu_capability);
  // The variants of this build that this CPU can run, worst first.
  m.def("supported_cpu_capabilities() -> str[]", &icpo::cpu::supported_cpu_capabilities);
  // Switch variant ("auto" = the automatic choice); returns the variant now in use.
  m.def("set_cpu_capability(str name) -> str", &icpo::cpu::set_cpu_capability);
}
