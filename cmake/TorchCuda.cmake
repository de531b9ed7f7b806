# Finds torch (the one installed for the Python that builds us), decides whether the CUDA
# kernels are built, and runs find_package(Torch) so that its CUDA set-up does what we mean.
#
# In:  ICPO_CUDA (AUTO | ON | OFF), Python_EXECUTABLE, TORCH_CUDA_ARCH_LIST (optional, a CMake
#      variable or an environment variable).
# Out: _build_cuda (ON/OFF), ICPO_TORCH_VERSION, ICPO_TORCH_CUDA, and find_package(Torch)'s
#      results (TORCH_LIBRARIES, ...).
#
# Why it is done this way (torch 2.11 - 2.14, share/cmake/Caffe2/public/cuda.cmake):
# - Torch's CMake picks the nvcc -gencode flags itself, from TORCH_CUDA_ARCH_LIST (the CMake
#   variable, else the environment variable), else from the GPU it can see, else from a list
#   that starts at compute_50, which nvcc 13 rejects. It ignores CMAKE_CUDA_ARCHITECTURES. So
#   our default architectures go into TORCH_CUDA_ARCH_LIST, before find_package(Torch).
# - A CUDA build of torch makes find_package(Torch) require a CUDA toolkit ("Your installed
#   Caffe2 version uses CUDA but I cannot find the CUDA libraries"). Its cuda.cmake returns at
#   once when the target torch::cudart exists (its include guard), so for a CPU-only build we
#   define that target, empty, and torch's CMake never looks for CUDA.
# - Torch's own FindCUDA takes the toolkit root from the nvcc on PATH; a wrapper script there
#   (e.g. /usr/local/bin/nvcc) misleads it, so we hand it the root CMake found.

set(ICPO_CUDA "AUTO" CACHE STRING "Build CUDA kernels: AUTO, ON or OFF")
set_property(CACHE ICPO_CUDA PROPERTY STRINGS AUTO ON OFF)
if(NOT ICPO_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "icpo: ICPO_CUDA must be AUTO, ON or OFF, got '${ICPO_CUDA}'")
endif()
# A100 (8.0) and H100/H200 (9.0). Add others with TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0;10.0;12.0".
set(ICPO_DEFAULT_CUDA_ARCH_LIST "8.0;9.0")

# Where torch is and which CUDA it was built with, read from its files: importing torch would
# load its CUDA libraries, which a build machine need not have (nor need to load).
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import importlib.util, os, sys
spec = importlib.util.find_spec("torch")
if spec is None or spec.origin is None:
    sys.exit("torch is not installed for this Python")
root = os.path.dirname(spec.origin)
ns = {}
with open(os.path.join(root, "version.py")) as f:
    exec(f.read(), ns)
sys.stdout.write(";".join([os.path.join(root, "share", "cmake"), ns["__version__"], ns.get("cuda") or ""]))
]=]
  OUTPUT_VARIABLE _torch_info ERROR_VARIABLE _torch_err RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  string(STRIP "${_torch_err}" _torch_err)
  message(FATAL_ERROR "icpo: could not find torch for ${Python_EXECUTABLE} (${_torch_err}); "
                      "install torch first, then build with --no-build-isolation")
endif()
list(GET _torch_info 0 _torch_prefix)
list(GET _torch_info 1 ICPO_TORCH_VERSION)
list(LENGTH _torch_info _n)
set(ICPO_TORCH_CUDA "")
if(_n GREATER 2)
  list(GET _torch_info 2 ICPO_TORCH_CUDA)
endif()
list(APPEND CMAKE_PREFIX_PATH "${_torch_prefix}")

set(_build_cuda OFF)
set(_why "")
set(_warned OFF)
if(ICPO_CUDA STREQUAL "OFF")
  set(_why "ICPO_CUDA=OFF")
elseif(ICPO_TORCH_CUDA STREQUAL "")
  if(ICPO_CUDA STREQUAL "ON")
    message(FATAL_ERROR "icpo: ICPO_CUDA=ON but torch ${ICPO_TORCH_VERSION} is a CPU-only build; "
                        "install a CUDA build of torch first, or build with ICPO_CUDA=AUTO")
  endif()
  set(_why "torch ${ICPO_TORCH_VERSION} is a CPU-only build")
else()
  include(CheckLanguage)
  if(DEFINED CMAKE_CUDA_COMPILER AND NOT CMAKE_CUDA_COMPILER)
    unset(CMAKE_CUDA_COMPILER CACHE)  # look again: nvcc may have been installed since
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(_build_cuda ON)
  elseif(ICPO_CUDA STREQUAL "ON")
    message(FATAL_ERROR
      "icpo: ICPO_CUDA=ON but no CUDA compiler (nvcc) was found. Install the CUDA toolkit "
      "${ICPO_TORCH_CUDA} (the version torch ${ICPO_TORCH_VERSION} was built with) and put its "
      "bin/ on PATH, or set CUDACXX=/path/to/nvcc; or build with ICPO_CUDA=AUTO for the CPU "
      "kernels only.")
  else()
    string(CONCAT _why "torch ${ICPO_TORCH_VERSION} has CUDA ${ICPO_TORCH_CUDA} but no CUDA "
           "compiler (nvcc) was found; install the CUDA toolkit and put nvcc on PATH (or set "
           "CUDACXX) to build the CUDA kernels, or set ICPO_CUDA=ON to make this an error")
    message(WARNING "icpo: building the CPU kernels only: ${_why}")
    set(_warned ON)
  endif()
endif()

if(_build_cuda)
  if(DEFINED CMAKE_CUDA_ARCHITECTURES OR DEFINED ENV{CUDAARCHS})
    message(FATAL_ERROR "icpo: CMAKE_CUDA_ARCHITECTURES / CUDAARCHS are ignored by torch's CMake; "
                        "set TORCH_CUDA_ARCH_LIST instead, e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0;10.0\"")
  endif()
  if(DEFINED TORCH_CUDA_ARCH_LIST)
    set(_arch_source "-DTORCH_CUDA_ARCH_LIST")
  elseif(DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(_arch_source "environment TORCH_CUDA_ARCH_LIST")
    set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
  else()
    set(_arch_source "icpo's default; set TORCH_CUDA_ARCH_LIST to change")
    set(TORCH_CUDA_ARCH_LIST "${ICPO_DEFAULT_CUDA_ARCH_LIST}")
  endif()

  enable_language(CUDA)
  # CUDA sources take C++20 (from CMAKE_CUDA_STANDARD, or CMAKE_CXX_STANDARD when unset), but
  # CMake 3.25 knows no C++20 flag for nvcc and stops with "CMake does not know the flags to
  # enable CUDA20". Teach it (newer CMake defines these itself); set only after
  # enable_language, whose compiler checks would fail the same way.
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  # enable_language set a default CMAKE_CUDA_ARCHITECTURES, which torch would warn about and
  # ignore; architectures come from TORCH_CUDA_ARCH_LIST (torch adds the -gencode flags to
  # CMAKE_CUDA_FLAGS), so CMake itself adds none: OFF once torch is found.
  unset(CMAKE_CUDA_ARCHITECTURES)
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)

  find_package(CUDAToolkit REQUIRED)
  if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR)
    get_filename_component(CUDA_TOOLKIT_ROOT_DIR "${CUDAToolkit_BIN_DIR}" DIRECTORY)
  endif()
  string(REGEX MATCH "^[0-9]+" _nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
  string(REGEX MATCH "^[0-9]+" _torch_cuda_major "${ICPO_TORCH_CUDA}")
  if(NOT _nvcc_major STREQUAL _torch_cuda_major)
    message(WARNING "icpo: nvcc is CUDA ${CMAKE_CUDA_COMPILER_VERSION} but torch "
                    "${ICPO_TORCH_VERSION} was built with CUDA ${ICPO_TORCH_CUDA}; use a toolkit "
                    "of the same major version")
  endif()
elseif(NOT ICPO_TORCH_CUDA STREQUAL "")
  # CPU kernels against a CUDA torch: torch's cuda.cmake returns at its include guard, so
  # find_package(Torch) needs no toolkit (we link libtorch_cuda, which brings its own cudart).
  add_library(torch::cudart INTERFACE IMPORTED)
endif()

find_package(Torch REQUIRED)

if(_build_cuda)
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  # TORCH_LIBRARIES names the toolkit's libnvrtc, which a compiler-only toolkit lacks (torch
  # loads its own from the nvidia-cuda-nvrtc wheel); our kernels are compiled ahead and never
  # use it.
  list(FILTER TORCH_LIBRARIES EXCLUDE REGEX "-NOTFOUND$")
  message(STATUS "icpo: CUDA kernels for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} "
                 "(${_arch_source}), nvcc ${CMAKE_CUDA_COMPILER_VERSION}, torch ${ICPO_TORCH_VERSION}")
elseif(NOT _warned)
  message(STATUS "icpo: CPU kernels only (${_why})")
endif()

# What this build was made against, for icpo/__init__.py: an extension built against one torch
# does not load (or misbehaves) with another, which a build in an isolated environment (torch
# from build-system.requires) can cause; the import check names the fix instead.
if(_build_cuda)
  set(_info_cuda "True")
else()
  set(_info_cuda "False")
endif()
file(WRITE "${CMAKE_CURRENT_BINARY_DIR}/_build_info.py"
  "\"\"\"Written by cmake/TorchCuda.cmake when icpo._C was built.\"\"\"\n"
  "torch_version = \"${ICPO_TORCH_VERSION}\"\n"
  "cuda = ${_info_cuda}\n"
  "cuda_arch_list = \"${TORCH_CUDA_ARCH_LIST}\"\n"
  "cpu_only_reason = \"${_why}\"\n")
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/_build_info.py" DESTINATION icpo)
