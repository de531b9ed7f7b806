# The vectorized CPU kernels (csrc/cpu/*.cpp), compiled once per instruction set into object
# libraries and linked into the extension; csrc/cpu_dispatch.cpp picks one at run time from the
# CPU (docs/cpu_kernels.md). Each variant gets its own CPU_CAPABILITY namespace, as PyTorch's
# kernels in aten/src/ATen/native/cpu do, so the variants cannot collide at link time.
#
#   default  no ISA flags: any x86-64 (SSE2) or non-x86 CPU
#   avx2     -mavx2 -mfma -mf16c                        (x86-64 with GCC or Clang)
#   avx512   -mavx512f -mavx512bw -mavx512vl -mavx512dq (+ the avx2 flags)
#   native   -march=native, when ICPO_NATIVE=ON (with default, instead of avx2 / avx512): runs on
#            the build machine's CPU model
#
# Only the files in csrc/cpu/ get ISA flags. An inline function from a header that does not
# depend on CPU_CAPABILITY (c10, std) is still emitted by every object that uses it, and the linker
# keeps the first copy on the link line for everyone: if that copy came from an AVX2 object, code
# outside the variants would call it on any CPU. The "default" variant is therefore added first
# (CMake puts object-library objects ahead of the target's own, in the order added), so such a
# copy comes from an object compiled without ISA flags. Linking avx2 first instead does leak one
# (c10::detail::_str_wrapper, used by TORCH_CHECK messages), which tools/check_cpu_isa.py reports;
# tests/test_cpu_dispatch.py runs that check on every build.

# Build folders configured before the per-ISA layout cached ICPO_NATIVE=ON as the old default;
# that entry still carries the old option's help text (a user's -D has another), so drop it.
if(DEFINED CACHE{ICPO_NATIVE})
  get_property(_icpo_native_help CACHE ICPO_NATIVE PROPERTY HELPSTRING)
  if(_icpo_native_help STREQUAL "Compile CPU kernels with -march=native")
    unset(ICPO_NATIVE CACHE)
  endif()
endif()
option(ICPO_NATIVE "Compile the CPU kernels for this machine only (-march=native), not per ISA" OFF)

file(GLOB ICPO_CPU_KERNEL_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cpu/*.cpp")

set(_icpo_x86 OFF)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|i[3-6]86)$"
   AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  set(_icpo_x86 ON)
endif()

set(ICPO_CPU_VARIANTS)
if(ICPO_NATIVE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "icpo: ICPO_NATIVE=ON needs GCC or Clang (-march=native)")
  endif()
  # "default" too: linked first like in the portable build (see above), and selectable with
  # ICPO_CPU_CAPABILITY=default on a CPU that lacks what the build machine had.
  list(APPEND ICPO_CPU_VARIANTS default native)
  set(_icpo_flags_default "")
  set(_icpo_flags_native -march=native)
else()
  list(APPEND ICPO_CPU_VARIANTS default)
  set(_icpo_flags_default "")
  if(_icpo_x86)
    list(APPEND ICPO_CPU_VARIANTS avx2 avx512)
    set(_icpo_flags_avx2 -mavx2 -mfma -mf16c)
    set(_icpo_flags_avx512 -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq)
  endif()
endif()
message(STATUS "icpo: CPU kernel variants: ${ICPO_CPU_VARIANTS}")

foreach(_isa IN LISTS ICPO_CPU_VARIANTS)
  set(_lib icpo_cpu_${_isa})
  add_library(${_lib} OBJECT ${ICPO_CPU_KERNEL_SOURCES})
  target_include_directories(${_lib} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
  # Torch's and OpenMP's include directories and definitions (no linking happens here).
  target_link_libraries(${_lib} PRIVATE ${TORCH_LIBRARIES} OpenMP::OpenMP_CXX)
  target_compile_definitions(${_lib} PRIVATE CPU_CAPABILITY=icpo_${_isa})
  if(_isa STREQUAL "avx2")
    target_compile_definitions(${_lib} PRIVATE CPU_CAPABILITY_AVX2=1)
  elseif(_isa STREQUAL "avx512")
    target_compile_definitions(${_lib} PRIVATE CPU_CAPABILITY_AVX512=1)
  elseif(_isa STREQUAL "native")
    target_compile_definitions(${_lib} PRIVATE ICPO_CPU_NATIVE=1)
  endif()
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${_lib} PRIVATE -O3 ${_icpo_flags_${_isa}})
  endif()
endforeach()

# Links the variants into `target` ("default" first, see above) and tells the dispatcher which
# exist.
function(icpo_add_cpu_kernels target)
  foreach(_isa IN LISTS ICPO_CPU_VARIANTS)
    target_sources(${target} PRIVATE $<TARGET_OBJECTS:icpo_cpu_${_isa}>)
    string(TOUPPER "${_isa}" _ISA)
    target_compile_definitions(${target} PRIVATE ICPO_CPU_HAVE_${_ISA})
  endforeach()
  if(ICPO_NATIVE)
    # The at::vec level -march=native gives (0 default, 1 avx2, 2 avx512), so the dispatcher can
    # refuse a CPU that lacks it with a message instead of an illegal instruction.
    include(CheckCXXSourceCompiles)
    set(CMAKE_REQUIRED_FLAGS -march=native)
    check_cxx_source_compiles("
      #if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__FMA__))
      #error no
      #endif
      int main() { return 0; }" ICPO_NATIVE_HAS_AVX512)
    check_cxx_source_compiles("
      #if !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
      #error no
      #endif
      int main() { return 0; }" ICPO_NATIVE_HAS_AVX2)
    set(_level 0)
    if(ICPO_NATIVE_HAS_AVX512)
      set(_level 2)
    elseif(ICPO_NATIVE_HAS_AVX2)
      set(_level 1)
    endif()
    target_compile_definitions(${target} PRIVATE ICPO_CPU_NATIVE_LEVEL=${_level})
  endif()
endfunction()
