#!/usr/bin/env bash
# CI check of the CUDA build through the real CMake path, on a machine with nvcc and no GPU.
#
# Runs our CMakeLists.txt against the CMake files, headers and libraries of a CUDA build of
# torch (a wheel from PyPI: only its files are read, it is never imported, so none of its
# nvidia-* dependencies are needed), with no TORCH_CUDA_ARCH_LIST set, as a user's build would:
#   1. ICPO_CUDA=ON: configure, then check the nvcc command of every .cu file in
#      compile_commands.json: code for exactly the expected architectures (default sm_80 and
#      sm_90; PTX allowed only for those), nothing else (e.g. torch's no-GPU fallback list,
#      which starts at compute_50 and which nvcc 13 rejects);
#   2. unless --configure-only: build it (compile every .cpp and .cu, link _C) and check the
#      cubins embedded in the library: exactly the expected architectures;
#   3. AUTO with nvcc hidden from PATH: configures CPU-only and says why in one warning;
#   4. ICPO_CUDA=ON with nvcc hidden: fails, naming the fix.
# Cost: ~10 s of CPU for the three configures, ~3 min of CPU for the build (2-4 min of wall time
# on an idle 2-core machine); the wheel (~0.55 GB) is downloaded once and the files CMake reads
# (1.1 GB) kept under ${XDG_CACHE_HOME:-~/.cache}/icpo-cuda-torch.
#
# Usage: tools/check_cuda_build.sh [--configure-only] [--keep DIR]
# Env:   PYTHON (default python3; needs pip), NVCC (default: nvcc on PATH, else
#        /usr/local/cuda/bin/nvcc), ICPO_CUDA_TORCH (default torch==2.14.1: the CUDA torch
#        whose CMake files are used), ICPO_EXPECT_ARCHS (default "80 90").
# Exit:  0 all checks pass, 1 a check fails, 2 set-up fails.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
torch_req=${ICPO_CUDA_TORCH:-torch==2.14.1}
read -r -a expect <<<"${ICPO_EXPECT_ARCHS:-80 90}"
build=1 keep=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --configure-only) build=0 ;;
    --keep) keep=$2; shift ;;
    *) echo "usage: $0 [--configure-only] [--keep DIR]" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "check_cuda_build: $*" >&2; exit 2; }
fail() { echo "check_cuda_build: FAIL: $*" >&2; failed=1; }
failed=0

nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[[ -x $nvcc ]] || die "nvcc not found (put it on PATH or set NVCC)"
command -v cmake >/dev/null || die "cmake not found"
command -v ninja >/dev/null || die "ninja not found"

# --- a CUDA torch's files, once ---
cache=${XDG_CACHE_HOME:-$HOME/.cache}/icpo-cuda-torch/${torch_req//[^A-Za-z0-9.]/_}
if [[ ! -f $cache/.complete ]]; then
  start=$SECONDS
  rm -rf "$cache.partial" && mkdir -p "$cache.partial/dl"
  echo "check_cuda_build: downloading $torch_req (the CUDA build; files only) into $cache"
  "$python" -m pip download -q --no-deps --only-binary=:all: -d "$cache.partial/dl" "$torch_req" ||
    die "pip could not download $torch_req"
  wheel=$(ls "$cache.partial"/dl/torch-*.whl) || die "no torch wheel downloaded"
  # Only what CMake reads: the package marker and version, CMake files, headers, libraries.
  "$python" - "$wheel" "$cache.partial" <<'EOF' || die "could not unpack $wheel"
import sys, zipfile
keep = ("torch/__init__.py", "torch/version.py", "torch/include/", "torch/lib/", "torch/share/")
with zipfile.ZipFile(sys.argv[1]) as wheel:
    wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if n.startswith(keep)])
EOF
  rm -rf "$cache.partial/dl"
  touch "$cache.partial/.complete"
  rm -rf "$cache" && mv "$cache.partial" "$cache"
  echo "check_cuda_build: unpacked in $((SECONDS - start)) s"
fi
torch_cuda=$(sed -n "s/^cuda: Optional\[str\] = '\(.*\)'/\1/p" "$cache/torch/version.py")
[[ -n $torch_cuda ]] || die "$torch_req from pip is not a CUDA build ($cache/torch/version.py)"

tmp=${keep:-$(mktemp -d)}
mkdir -p "$tmp"
[[ -n $keep ]] || trap 'rm -rf "$tmp"' EXIT

configure() {  # configure NAME PATH [cmake args...]: logs to $tmp/NAME.log, returns cmake's rc
  local name=$1 path=$2
  shift 2
  rm -rf "$tmp/$name"
  env -u TORCH_CUDA_ARCH_LIST -u CUDACXX -u CUDAARCHS PATH="$path" PYTHONPATH="$cache" \
    cmake -S "$repo" -B "$tmp/$name" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v "$python")" -DCMAKE_EXPORT_COMPILE_COMMANDS=ON "$@" \
    >"$tmp/$name.log" 2>&1
}

# --- 1. ICPO_CUDA=ON, nvcc present: the architectures ---
nvcc_dir=$(dirname "$nvcc")
start=$SECONDS
if configure cuda "$nvcc_dir:$PATH" -DICPO_CUDA=ON; then
  echo "check_cuda_build: configured with CUDA ($((SECONDS - start)) s): $(
    grep -o 'icpo: CUDA kernels for.*' "$tmp/cuda.log")"
  if "$python" "$repo/tools/cuda_arch_flags.py" "$tmp/cuda/compile_commands.json" "${expect[@]}"; then
    :
  else
    fail "nvcc architecture flags (above)"
  fi
else
  tail -40 "$tmp/cuda.log" >&2
  fail "configure with ICPO_CUDA=ON failed (log above)"
fi

# --- 2. build it ---
if [[ $build == 1 && $failed == 0 ]]; then
  start=$SECONDS
  if cmake --build "$tmp/cuda" -j "$(nproc)" >"$tmp/build.log" 2>&1; then
    echo "check_cuda_build: built in $((SECONDS - start)) s; GPU code in the library:"
    "$python" "$repo/tools/cuda_arch_flags.py" --so "$tmp"/cuda/_C*.so "${expect[@]}" ||
      fail "the built library's cubins (above)"
  else
    grep -B2 -A20 -m3 'error' "$tmp/build.log" >&2 || tail -40 "$tmp/build.log" >&2
    fail "CUDA build failed (log above)"
  fi
fi

# --- 3./4. no nvcc on PATH ---
no_nvcc_path=""
IFS=: read -r -a dirs <<<"$PATH"
for d in "${dirs[@]}"; do [[ -e $d/nvcc ]] || no_nvcc_path+="${no_nvcc_path:+:}$d"; done
if configure auto "$no_nvcc_path" -DICPO_CUDA=AUTO; then
  if grep -q 'icpo: building the CPU kernels only' "$tmp/auto.log" &&
     ! grep -q '\.cu"' "$tmp/auto/compile_commands.json"; then
    echo "check_cuda_build: AUTO without nvcc builds CPU kernels only, and says so"
  else
    fail "AUTO without nvcc: no 'building the CPU kernels only' warning, or .cu files compiled"
  fi
else
  tail -40 "$tmp/auto.log" >&2
  fail "AUTO without nvcc must configure CPU-only, but configure failed (log above)"
fi
if configure on "$no_nvcc_path" -DICPO_CUDA=ON; then
  fail "ICPO_CUDA=ON without nvcc configured; it must fail"
elif grep -q 'ICPO_CUDA=ON but no CUDA compiler (nvcc) was found' "$tmp/on.log"; then
  echo "check_cuda_build: ICPO_CUDA=ON without nvcc fails with the fix named"
else
  tail -40 "$tmp/on.log" >&2
  fail "ICPO_CUDA=ON without nvcc failed without icpo's message (log above)"
fi

if [[ $failed != 0 ]]; then
  echo "check_cuda_build: FAILED (torch files from $torch_req, CUDA $torch_cuda)" >&2
  exit 1
fi
echo "check_cuda_build: all checks pass (torch files from $torch_req, CUDA $torch_cuda," \
  "nvcc $("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
