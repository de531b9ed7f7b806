// Included first by every csrc/cpu/ kernel file. For the "native" variant (ICPO_NATIVE=ON, built
// with -march=native), define the at::vec capability from what the compiler targets; the other
// variants get CPU_CAPABILITY_AVX2 / _AVX512 from the build. Must precede any ATen include.
#pragma once

#if defined(ICPO_CPU_NATIVE)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2 1
#endif
#endif

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/ files are compiled per instruction set with CPU_CAPABILITY=icpo_<isa> (see cmake/icpo_cpu_kernels.cmake)"
#endif
