"""One small launch of every icpo kernel (forward and backward), for compute-sanitizer.

Inputs are made on the CPU and copied, so that the device runs few kernels besides ours; sizes
are awkward (odd vocabulary, a row of one token, groups of 1 and of 37, ignored rows, a
non-contiguous row stride) so that edge paths run. Every output is checked against the CPU
kernel, so a run that launches nothing or computes garbage fails too.

Usage: python tools/kernel_cases.py [--device cuda|cpu]
Run it under ``compute-sanitizer --tool memcheck|racecheck --error-exitcode 9`` with
PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that an out-of-bounds access cannot land inside a block
torch's allocator cached. Exit 0 when every case ran and matched.
"""

from __future__ import annotations

import argparse
import sys

import torch

import icpo  # noqa: F401  (registers torch.ops.icpo.*)
from icpo.ops import (
    grpo_advantages,
    icpo_advantages,
    preference_scores,
    segment_mean,
    token_logprobs,
)


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    ok = torch.allclose(got.detach().cpu().float(), want.detach().float(), atol=tol, rtol=tol)
    print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    dev = p.parse_args(argv).device
    gen = torch.Generator().manual_seed(0)
    ok = True

    # token_logprobs: 2 x 3 rows of V = 1031 (one ignored), bf16 and fp32, strided rows.
    for dtype in (torch.float32, torch.bfloat16):
        base = (torch.randn(6, 1100, generator=gen) * 3).to(dtype)
        logits = base[:, :1031]  # row stride 1100: not contiguous
        labels = torch.randint(0, 1031, (6,), generator=gen)
        labels[4] = -100
        g = torch.randn(6, generator=gen)
        outs = {}
        for where in ("cpu", dev):
            x = logits.to(where).requires_grad_(True)
            logp, ent = token_logprobs(x, labels.to(where), temperature=0.9)
            (grad,) = torch.autograd.grad((logp * g.to(where)).sum() + ent.sum(), x)
            outs[where] = (logp, ent, grad)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for i, name in enumerate(("logp", "entropy", "grad")):
            ok &= _close(f"token_logprobs {dtype} {name}", outs[dev][i], outs["cpu"][i], tol)
    # one row of one token
    one = torch.randn(1, 1, generator=gen)
    ok &= _close("token_logprobs V=1", token_logprobs(one.to(dev), torch.zeros(1, dtype=torch.long,
                                                     device=dev))[0], torch.zeros(1), 1e-6)

    # segment_mean: segments of 1, 5 and 300; int32 offsets; backward.
    values = torch.randn(306, generator=gen)
    cu = torch.tensor([0, 1, 6, 306], dtype=torch.int32)
    x = values.to(dev).requires_grad_(True)
    out = segment_mean(x, cu.to(dev))
    (grad,) = torch.autograd.grad(out.sum(), x)
    ok &= _close("segment_mean", out, segment_mean(values, cu), 1e-5)
    ok &= _close("segment_mean grad", grad, torch.repeat_interleave(1 / (cu[1:] - cu[:-1]).float(),
                                                                   (cu[1:] - cu[:-1]).long()), 1e-6)

    # group ops: groups of 1, 2, 37 and 8.
    offsets = torch.tensor([0, 1, 3, 40, 48])
    conf = -torch.rand(48, generator=gen, dtype=torch.float64) * 2
    rewards = torch.randint(0, 2, (48,), generator=gen).double()
    got = icpo_advantages(conf.to(dev), rewards.to(dev), group_offsets=offsets.to(dev))
    want = icpo_advantages(conf, rewards, group_offsets=offsets)
    for name, a, b in zip(("scores", "rewards", "advantages"), got, want):
        ok &= _close(f"icpo_advantages {name}", a, b, 1e-9)
    ok &= _close("grpo_advantages", grpo_advantages(rewards.to(dev), group_offsets=offsets.to(dev)),
                 grpo_advantages(rewards, group_offsets=offsets), 1e-9)
    ok &= _close("preference_scores",
                 preference_scores(conf.to(dev), group_offsets=offsets.to(dev)),
                 preference_scores(conf, group_offsets=offsets), 1e-9)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("kernel_cases:", "all match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
