"""Every op on random inputs: the device's kernel against the CPU kernel and a float64 reference.

Each check runs on "cpu" here (the CPU kernel against float64: these run in CI) and on "cuda"
(marked ``cuda``; skipped without a GPU), where it also compares the CUDA kernel with the CPU
kernel on the same inputs. Inputs are fresh random draws with ragged groups and segments,
ignored rows and temperatures; ``test_token_logprobs_over_2_31_elements`` takes a bf16 [T, V]
with T x V > 2^31 elements (4.3 GB) on the GPU and checks rows on both sides of element 2^31.
tools/gpu_check.sh runs the ``cuda`` ones on the GPU machine.

Errors are measured as ||out - ref|| / ||ref|| against float64 (a norm-wise relative error).
"""

from __future__ import annotations

import pytest
import torch

import icpo  # noqa: F401  (registers torch.ops.icpo.*)
from icpo.ops import (grpo_advantages, icpo_advantages, preference_scores, reference,
                      segment_mean, token_logprobs)

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")])]
LOWP = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-5}  # gradient rel. error


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _logits(t: int, v: int, dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """N(0, 3^2) logits with a few peaked rows (one logit +25), made in fp32 then cast."""
    x = torch.randn(t, v, generator=gen, device=device).mul_(3.0)
    peaked = torch.randint(0, v, (t,), generator=gen, device=device)
    x[torch.arange(0, t, 5, device=device), peaked[::5]] += 25.0
    return x.to(dtype)


def _labels(t: int, v: int, gen: torch.Generator, ignore_frac=0.2, device="cpu") -> torch.Tensor:
    labels = torch.randint(0, v, (t,), generator=gen, device=device)
    labels[torch.rand(t, generator=gen, device=device) < ignore_frac] = -100
    return labels


def _fwd_bwd(logits, labels, temperature, g_logp, g_ent, fn=token_logprobs):
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = fn(x, labels, temperature=temperature)
    (grad,) = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), x)
    return logp.detach(), ent.detach(), grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t,v,temperature", [(37, 32000, 1.0), (64, 1031, 0.7), (9, 151936, 1.3),
                                             (128, 4099, 0.35)])
def test_token_logprobs_cross(device, dtype, t, v, temperature):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    logits, labels = _logits(t, v, dtype, gen), _labels(t, v, gen)
    g_logp, g_ent = torch.randn(t, generator=gen), torch.randn(t, generator=gen)
    ref = _fwd_bwd(logits.double(), labels, temperature, g_logp.double(), g_ent.double(),
                   fn=reference.token_logprobs)
    cpu = _fwd_bwd(logits, labels, temperature, g_logp, g_ent)
    dev = _fwd_bwd(logits.to(device), labels.to(device), temperature, g_logp.to(device),
                   g_ent.to(device))
    ignored = labels == -100
    for name, got in (("cpu", cpu), (device, dev)):
        assert rel_err(got[0], ref[0]) < 2e-6, f"{name} logp"
        assert rel_err(got[1], ref[1]) < 2e-6, f"{name} entropy"
        assert rel_err(got[2], ref[2]) < LOWP[dtype], f"{name} grad"
        assert got[2].dtype == dtype
        assert not got[2][ignored.to(got[2].device)].any(), f"{name}: ignored rows get gradient"
        assert not got[0][ignored.to(got[0].device)].any()
    # The two kernels agree more closely than either does with float64 in low precision.
    torch.testing.assert_close(dev[0].cpu(), cpu[0], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(dev[1].cpu(), cpu[1], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(dev[2].cpu().float(), cpu[2].float(), atol=LOWP[dtype],
                               rtol=LOWP[dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_token_logprobs_over_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    v = 151936
    t = (2**31 // v) + 200  # 14334 rows: 2.18e9 elements, 4.4 GB in bf16
    if free < 3 * t * v * 2 + (2 << 30):  # logits, gradient, one fp32 slice
        pytest.skip(f"needs ~{3 * t * v * 2 / 2**30:.0f} GB of free GPU memory, "
                    f"{free / 2**30:.0f} GB free")
    errors = large_logprobs_errors("cuda", t, v)
    assert errors["rows_past_2_31"] > 0
    for key, bound in (("logp", 2e-6), ("entropy", 2e-6), ("grad", 1e-2)):
        assert errors[key] < bound, (key, errors)


def test_large_logprobs_plumbing_on_cpu():
    # The same check at a small size, so its code runs in CI.
    errors = large_logprobs_errors("cpu", 300, 1031, rows=40)
    assert errors["rows_past_2_31"] == 0
    for key, bound in (("logp", 2e-6), ("entropy", 2e-6), ("grad", 1e-2)):
        assert errors[key] < bound, (key, errors)


def large_logprobs_errors(device: str, t: int, v: int, rows: int = 96) -> dict:
    """bf16 [t, v] logits on ``device``, forward and backward through the kernel; the ``rows``
    first and last rows (for t * v > 2^31, on both sides of element 2^31) recomputed in float64
    on the same device. Returns the relative errors and how many checked rows start past 2^31."""
    gen = torch.Generator(device=device).manual_seed(torch.seed() % 2**31)
    logits = torch.empty(t, v, dtype=torch.bfloat16, device=device)
    step = max(1, (1 << 26) // v)
    for start in range(0, t, step):  # fill in slices: no fp32 copy of the whole tensor
        logits[start:start + step] = _logits(min(step, t - start), v, torch.bfloat16, gen, device)
    labels = _labels(t, v, gen, device=device)
    labels[-1] = v - 1  # the tensor's very last element is the label of its last row
    g_logp = torch.randn(t, generator=gen, device=device)
    g_ent = torch.randn(t, generator=gen, device=device)
    x = logits.requires_grad_(True)
    logp, ent = token_logprobs(x, labels, temperature=1.1)
    (grad,) = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), x)
    idx = torch.cat([torch.arange(rows), torch.arange(t - rows, t)]).to(device)
    ref = _fwd_bwd(logits.detach()[idx].double(), labels[idx], 1.1, g_logp[idx].double(),
                   g_ent[idx].double(), fn=reference.token_logprobs)
    return {"logp": rel_err(logp[idx], ref[0]), "entropy": rel_err(ent[idx], ref[1]),
            "grad": rel_err(grad[idx], ref[2]),
            "rows_past_2_31": int(((idx * v) >= 2**31).sum())}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_segment_mean_cross(device, dtype):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    lengths = torch.cat([torch.randint(1, 40, (300,), generator=gen), torch.tensor([1, 70000])])
    lengths = lengths[torch.randperm(len(lengths), generator=gen)]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    values = (torch.randn(int(cu[-1]), generator=gen) * 2 + 0.5).to(dtype)
    g = torch.randn(len(lengths), generator=gen, dtype=torch.float64)
    ref = reference.segment_mean(values.double(), cu)
    ref_grad = torch.repeat_interleave(g / lengths, lengths)
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 4e-3}[dtype]
    outs = {}
    for where in ("cpu", device):
        for cu_dtype in (torch.int32, torch.int64):
            x = values.to(where).requires_grad_(True)
            out = segment_mean(x, cu.to(where, cu_dtype))
            (grad,) = torch.autograd.grad((out * g.to(where, out.dtype)).sum(), x)
            assert out.dtype == dtype and grad.dtype == dtype
            assert rel_err(out, ref) < tol and rel_err(grad, ref_grad) < tol, (where, cu_dtype)
            outs[where] = out.cpu()
    torch.testing.assert_close(outs[device], outs["cpu"], atol=tol, rtol=tol)


def _ragged(gen: torch.Generator) -> torch.Tensor:
    """Group sizes 1..64 (several of 1 and 2) plus one group of 1000, in random order."""
    sizes = torch.cat([torch.randint(1, 65, (60,), generator=gen), torch.tensor([1, 1, 2, 1000])])
    sizes = sizes[torch.randperm(len(sizes), generator=gen)]
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    return offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale,unbiased", [(True, False), (True, True), (False, False)])
def test_group_advantages_cross(device, dtype, scale, unbiased):
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    offsets = _ragged(gen)
    n = int(offsets[-1])
    conf = (-torch.rand(n, generator=gen, dtype=torch.float64) * 3)
    conf[torch.randint(0, n, (n // 10,), generator=gen)] = 0.0  # exact zeros
    rewards = (torch.randint(0, 2, (n,), generator=gen) + 0.2 * torch.randn(n, generator=gen,
                                                                          dtype=torch.float64))
    rewards[offsets[3]:offsets[4]] = 1.0  # one group of equal rewards
    # The reference sees the inputs the kernels see (rounded to dtype): the scores' ratios of
    # log-probs near 0 amplify input rounding up to ~2e-4 in fp32, which is the inputs', not
    # the kernels' error (measured against the rounded inputs: <= 6e-7).
    conf, rewards = conf.to(dtype).double(), rewards.to(dtype).double()
    kw = dict(scale=scale, unbiased=unbiased)
    ref = reference.icpo_advantages(conf, rewards, group_offsets=offsets, **kw)
    ref_grpo = reference.grpo_advantages(rewards, group_offsets=offsets, **kw)
    tol = {torch.float32: 2e-5, torch.float64: 1e-10}[dtype]
    results = {}
    for where in ("cpu", device):
        c, r, o = conf.to(where, dtype), rewards.to(where, dtype), offsets.to(where)
        got = icpo_advantages(c, r, group_offsets=o, **kw)
        grpo = grpo_advantages(r, group_offsets=o, **kw)
        scores = preference_scores(c, group_offsets=o)
        for name, x, y in (("scores", got.scores, ref.scores), ("rewards", got.rewards, ref.rewards),
                           ("advantages", got.advantages, ref.advantages),
                           ("grpo", grpo, ref_grpo), ("preference_scores", scores, ref.scores)):
            assert x.dtype == dtype
            assert rel_err(x, y) < tol, (where, name, rel_err(x, y), f"seed {seed}")
        results[where] = (got.advantages.cpu(), grpo.cpu())
    for a, b in zip(results[device], results["cpu"]):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)
