#!/usr/bin/env bash
# Runs the installed icpo CPU kernels on emulated older CPUs (qemu user mode, `apt-get install
# qemu-user`): Nehalem (SSE4.2, no AVX) must pick "default", Haswell (AVX2, no AVX-512) "avx2";
# each must match the reference and refuse "avx512". Proves the portable build does not need the
# build machine's instructions (a -march=native build dies with SIGILL on the Haswell run).
# Usage: tools/check_cpu_emulated.sh [python]   (default: .venv/bin/python). Takes ~1-3 min.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
command -v qemu-x86_64 >/dev/null || { echo "check_cpu_emulated: needs qemu-x86_64 (qemu-user)"; exit 2; }
read -r -d '' CODE <<'PYEOF' || true
import sys, torch, icpo
from icpo.ops import reference
want = sys.argv[1]
got = icpo.ops.cpu_capability()
x = torch.randn(8, 300) * 3
labels = torch.randint(0, 300, (8,))
logp, entropy = icpo.ops.token_logprobs(x, labels)
ref_logp, ref_entropy = reference.token_logprobs(x, labels)
torch.testing.assert_close(logp, ref_logp, atol=2e-5, rtol=1e-5)
torch.testing.assert_close(entropy, ref_entropy, atol=2e-5, rtol=1e-5)
try:
    icpo.ops.set_cpu_capability("avx512")
    sys.exit("avx512 was accepted on a CPU without AVX-512")
except RuntimeError:
    pass
print(f"chose {got} (want {want}), matches the reference, refuses avx512")
sys.exit(0 if got == want else 1)
PYEOF
status=0
for pair in Nehalem:default Haswell:avx2; do
  cpu=${pair%%:*}; want=${pair##*:}
  printf '%-8s ' "$cpu"
  OMP_NUM_THREADS=1 qemu-x86_64 -cpu "$cpu" "$PY" -c "$CODE" "$want" 2> >(grep -v "TCG doesn't support" >&2) || status=1
done
exit $status
