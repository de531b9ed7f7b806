"""The compiled extension records what it was built with, and that record is true: the torch it
was built against (importing icpo.ops with another torch fails with the fix named; an extension
built in an isolated environment can differ) and whether it holds CUDA kernels (every kernel op
has a CUDA kernel exactly when icpo._build_info.cuda says so)."""

import subprocess
import sys

import torch

import icpo._build_info as build_info
import icpo.ops  # noqa: F401  (registers torch.ops.icpo.*)

# Ops that take no tensor (csrc/cpu_dispatch.cpp) have no per-backend kernels.
TENSORLESS = {"icpo::cpu_capability", "icpo::supported_cpu_capabilities",
              "icpo::set_cpu_capability"}


def _kernel_ops() -> list[str]:
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("icpo::")]
    return sorted(set(names) - TENSORLESS)


def test_build_matches_installed_torch():
    assert build_info.torch_version == torch.__version__


def test_cuda_flag_matches_the_registered_kernels():
    ops = _kernel_ops()
    assert {"icpo::token_logprobs_fwd", "icpo::token_logprobs_bwd", "icpo::segment_mean",
            "icpo::segment_mean_bwd", "icpo::preference_scores", "icpo::icpo_advantages",
            "icpo::grpo_advantages"} <= set(ops)
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        assert has_cuda == build_info.cuda, (op, has_cuda, build_info.cuda)
    if build_info.cuda:
        assert torch.backends.cuda.is_built(), "CUDA kernels need a torch built with CUDA"
        assert build_info.cuda_arch_list and not build_info.cpu_only_reason
    else:
        assert build_info.cpu_only_reason  # a CPU-only build says why


def test_import_refuses_another_torch():
    code = ("import sys, types; sys.modules['icpo._build_info'] = types.SimpleNamespace("
            "torch_version='1.0.0+old', cuda=False, cuda_arch_list='', cpu_only_reason='x')\n"
            "import icpo.ops")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "built against torch 1.0.0+old" in proc.stderr
    assert "--no-build-isolation" in proc.stderr
