"""The compiled extension records the torch it was built against, and importing icpo with another
torch (on import icpo.ops, which loads it) fails with the fix named (an extension built in an isolated environment can differ)."""

import subprocess
import sys

import torch

import icpo._build_info as build_info


def test_build_matches_installed_torch():
    assert build_info.torch_version == torch.__version__
    assert build_info.cuda in (True, False)
    assert build_info.cuda or build_info.cpu_only_reason  # CPU-only builds say why


def test_import_refuses_another_torch():
    code = ("import sys, types; sys.modules['icpo._build_info'] = types.SimpleNamespace("
            "torch_version='1.0.0+old', cuda=False, cuda_arch_list='', cpu_only_reason='x')\n"
            "import icpo.ops")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "built against torch 1.0.0+old" in proc.stderr
    assert "--no-build-isolation" in proc.stderr
