#!/usr/bin/env bash
# The prepared GPU check: one call of at most 8 minutes on a lent H100/H200 (torch 2.11+cu130,
# nvcc, cmake, ninja, scikit-build-core, no network; deepspeed, math-verify and pydantic come as
# wheels in .whl/, made here by tools/gpu_wheels.sh).
#
# Steps (each logged; a step past the overall deadline is skipped and recorded as such):
#   build      pip install -e . with ICPO_CUDA=ON against the machine's torch (TORCH_CUDA_ARCH_LIST
#              left unset: the default sm_80 + sm_90 is what gets built)
#   tests      pytest -m cuda: every CUDA test, including tests/test_cross_devices.py (CUDA vs CPU
#              vs float64 on random inputs, T x V > 2^31 bf16, ragged groups, ignored rows,
#              temperature)
#   memcheck   compute-sanitizer --tool memcheck on tools/kernel_cases.py (every kernel, small)
#   racecheck  the same with --tool racecheck
#   vllm       only where vLLM imports (the 2-rank vLLM path needs 2 GPUs; this is its 1-GPU
#              part): tools/gpu_vllm_check.py, the colocated engine in bf16 on the bundled model:
#              sampling log-probs against the trainer's, sleep (level 1) / wake around an
#              optimizer step with torch.cuda.mem_get_info free bytes awake / asleep / woken,
#              sync_from, log-prob gap stale vs synced, greedy tokens against the HF engine
#   bench      bench/bench_token_logprobs.py on the GPU: fwd and fwd+bwd, icpo vs eager vs
#              TRL-style chunked, fp32 and bf16, V = 32000 and 151936, bandwidth over measured
#              copy bandwidth
#   bench_linear  bench/bench_linear_token_logprobs.py on the GPU: the fused LM head + log-prob
#              op, T = 8192, H = 4096, V = 151936, bf16, icpo vs materialized logits vs the
#              GEMM alone, TFLOP/s over the device's dense bf16 peak (PEAK_TFLOPS, default 989:
#              H100/H200 SXM)
#   train      examples/train_icpo.py on the GPU: bundled model, bf16, HF engine, DeepSpeed in one
#              process, a few steps; must end with finite losses and metrics.jsonl
# Results: $OUT (or bench/results/gpu_check/ when OUT is unset, or --out DIR): gpu_check.json
# (device, driver, versions, every step's status and figures), gpu_check.log (all output),
# cuda_tests.xml, logprobs_cuda.json, linear_logprobs_cuda.json, vllm_check.json,
# train_metrics.jsonl. At most 8 files, as the device tool returns.
#
# --dry-run: the same plumbing on this CPU (no build unless --build; tests collected and skipped;
# kernel cases unsanitized on the CPU; small CPU benchmarks; the vLLM step in fp32 with
# .venv-vllm's python when that venv exists (tools/vllm_cpu_env.sh; PYTHON_VLLM picks another);
# a 2-step CPU training run), to check the script where no GPU is. Its budget defaults to 1200 s
# (the shared 2-core machine is slower than the GPU machine's 16 cores).
#
# Usage: tools/gpu_check.sh [--dry-run] [--build] [--out DIR] [--budget SECONDS (default 450)]
# On the lent machine: run tools/gpu_wheels.sh here first, then the device tool's run with
# command "bash tools/gpu_check.sh", carry [".whl"], timeout_s 540; copy what comes back into
# bench/results/ and the README's performance table (marked with the device).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
dry=0 build=1 budget= out=${OUT:-}
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1; build=${build_forced:-0} ;;
    --build) build=1; build_forced=1 ;;
    --out) out=$2; shift ;;
    --budget) budget=$2; shift ;;
    *) echo "usage: $0 [--dry-run] [--build] [--out DIR] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
budget=${budget:-$((dry ? 1200 : 450))}
out=${out:-$repo/bench/results/gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/gpu_check.log
steps=$out/.steps.jsonl
: >"$log"
: >"$steps"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$work/torch_extensions}
python=${PYTHON:-python3}
[[ -x $repo/.venv/bin/python && -z ${PYTHON:-} && $dry == 1 ]] && python=$repo/.venv/bin/python
device=cuda
if [[ $dry == 1 ]]; then
  device=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do  # nvcc, compute-sanitizer
  [[ -x $d/nvcc ]] && ! command -v nvcc >/dev/null && export PATH=$PATH:$d
  [[ -x $d/compute-sanitizer ]] && ! command -v compute-sanitizer >/dev/null && export PATH=$PATH:$d
done

say() { echo "gpu_check: $*" | tee -a "$log"; }

# step NAME BUDGET_S CMD...: runs CMD with its output in the log, under the smaller of its budget
# and the time left; records status and seconds in .steps.jsonl.
step() {
  local name=$1 want=$2 left status rc start
  shift 2
  left=$((budget - SECONDS))
  start=$SECONDS
  ((dry)) && want=$((want * 4))  # a shared CPU is slower than the GPU machine's 16 cores
  if ((left < 15)); then
    status=skipped
    say "--- $name: SKIPPED (no time left in the ${budget} s budget)"
  else
    ((want > left)) && want=$left
    say "--- $name (at most ${want} s): $*"
    timeout --kill-after=10 "$want" "$@" >>"$log" 2>&1
    rc=$?
    if ((rc == 0)); then status=ok; elif ((rc == 124 || rc == 137)); then status=timeout
    else status="failed (exit $rc)"; fi
    say "--- $name: $status in $((SECONDS - start)) s"
  fi
  printf '{"step": "%s", "status": "%s", "seconds": %d}\n' "$name" "$status" \
    $((SECONDS - start)) >>"$steps"
}

# --- carried wheels (deepspeed, math-verify, pydantic, ...: tools/gpu_wheels.sh) ---
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
  if [[ $dry == 0 ]]; then
    target=()
  else  # install them as for the GPU machine's Python 3.12, but use this venv's packages
    target=(--python-version 3.12 --implementation cp --only-binary=:all:
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
  fi
  step wheels 60 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$work/site" "${target[@]}" "$repo"/.whl/*.whl
  [[ $dry == 0 ]] && export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi

# --- what the machine is ---
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv 2>&1 || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
  "$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
} >>"$log" 2>&1

# --- build ---
if [[ $build == 1 ]]; then
  cuda_flag=ON
  [[ $dry == 1 ]] && cuda_flag=AUTO
  step build 240 env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$python" -m pip install -v \
    --no-deps --no-build-isolation -C "cmake.define.ICPO_CUDA=$cuda_flag" -e .
fi
step build_info 60 "$python" -c '
import torch, icpo, icpo._build_info as b
print("icpo built against torch", b.torch_version, "cuda", b.cuda, "archs", b.cuda_arch_list,
      b.cpu_only_reason)
assert b.cuda == torch.cuda.is_available(), "CUDA kernels built iff a GPU is here"'

# --- tests ---
step tests 150 "$python" -m pytest -q -m cuda -p no:cacheprovider -rs \
  --junitxml="$out/cuda_tests.xml" tests

# --- the colocated vLLM engine on one device ---
vllm_python=${PYTHON_VLLM:-$python}
[[ $dry == 1 && -z ${PYTHON_VLLM:-} && -x $repo/.venv-vllm/bin/python ]] &&
  vllm_python=$repo/.venv-vllm/bin/python
if "$vllm_python" -c 'import vllm' >/dev/null 2>&1; then
  step vllm 120 "$vllm_python" tools/gpu_vllm_check.py --device "$device" \
    --out "$out/vllm_check.json"
else
  say "no vLLM for $vllm_python: vllm step not run (pip install 'icpo[gpu]' for it)"
fi

# --- sanitizer ---
if [[ $dry == 0 ]] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 9 --print-limit 20 "$python" tools/kernel_cases.py --device cuda
  done
else
  say "no compute-sanitizer here (or --dry-run): kernel cases run unsanitized on $device"
  step kernel_cases 90 "$python" tools/kernel_cases.py --device "$device"
fi

# --- kernel benchmark ---
if [[ $dry == 0 ]]; then
  bench_args=(--shapes 8192x32000,8192x151936 --max-mem-gb 60 --warmup 3 --iters 20)
else
  bench_args=(--shapes 256x32000,64x151936 --warmup 1 --iters 2)
fi
step bench 150 "$python" bench/bench_token_logprobs.py --device "$device" --isolate no \
  --dtypes fp32 bf16 --name "logprobs_${device}_gpu_check" "${bench_args[@]}"
cp -f "bench/results/logprobs_${device}_gpu_check.json" "$out/logprobs_${device}.json" 2>/dev/null
if [[ $dry == 0 ]]; then
  linear_args=(--shapes 8192x4096 --vocab 151936 --dtypes bf16 --methods icpo materialized gemm
               --peak-tflops "${PEAK_TFLOPS:-989}" --max-mem-gb 60 --warmup 2 --iters 5)
else
  linear_args=(--quick --dtypes fp32 --methods icpo materialized gemm)
fi
step bench_linear 90 "$python" bench/bench_linear_token_logprobs.py --device "$device" \
  --name "linear_logprobs_${device}_gpu_check" "${linear_args[@]}"
cp -f "bench/results/linear_logprobs_${device}_gpu_check.json" \
  "$out/linear_logprobs_${device}.json" 2>/dev/null

# --- a short training run ---
train_dir=$work/train
if [[ $dry == 0 ]]; then
  train_args=(trainer.device=cuda model.dtype=bfloat16 trainer.total_steps=8
              trainer.train_batch_size=32 actor.ppo_mini_batch_size=16 trainer.eval_every=4)
else
  train_args=(trainer.device=cpu model.dtype=float32 trainer.total_steps=2
              trainer.train_batch_size=8 actor.ppo_mini_batch_size=8 trainer.eval_every=2)
fi
step train 150 "$python" examples/train_icpo.py --train-size 400 --val-size 40 \
  rollout.engine=hf trainer.zero_stage=0 trainer.save_every=0 trainer.progress_bar=false \
  "trainer.output_dir=$train_dir" "${train_args[@]}"
cp -f "$train_dir/metrics.jsonl" "$out/train_metrics.jsonl" 2>/dev/null

# --- summary ---
"$python" tools/gpu_check_summary.py --out "$out" --device "$device" --dry-run "$dry" \
  2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
rm -f "$steps"
exit "$rc"
