"""Every op on random inputs: the device's kernel against plain PyTorch and a float64 reference.

Each check runs on "cpu" here (the CPU kernel: these run in CI) and on "cuda" (marked ``cuda``;
skipped without a GPU), where it holds the CUDA kernel and the CPU kernel to the same bound on
the same inputs. Inputs are random with ragged groups and segments, ignored rows and
temperatures, drawn from ``_accuracy.SEED`` (``ICPO_TEST_SEED=N`` draws others);
``test_token_logprobs_over_2_31_elements`` takes a bf16 [T, V] with T x V > 2^31 elements
(4.3 GB) on the GPU and checks rows on both sides of element 2^31. tools/gpu_check.sh runs the
``cuda`` ones on the GPU machine.

The bound is the rule of tests/_accuracy.py: max-abs error against float64 at most twice plain
PyTorch's at the kernel's precision (fp32 for token_logprobs, whatever the input dtype; the
inputs' dtype for segment_mean and the group ops), plus a floor: for token_logprobs those of
test_token_logprobs.forward_floor / backward_floor, for the others rounding_floor.
"""

from __future__ import annotations

import pytest
import torch
from _accuracy import SEED, assert_within_2x_plain, rounding_floor
from test_token_logprobs import backward_floor, forward_floor, plain

import icpo  # noqa: F401  (registers torch.ops.icpo.*)
from icpo.ops import (
    grpo_advantages,
    icpo_advantages,
    preference_scores,
    reference,
    segment_mean,
    token_logprobs,
)

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")])]


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


def _plain(x, labels, *, temperature):
    return plain(x, labels, temperature)


def check_token_logprobs(device: str, dtype: torch.dtype, t: int, v: int, temperature: float,
                         seed: int = SEED) -> None:
    """The CPU kernel and ``device``'s on the same random inputs, forward and backward, each held
    to the rule (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    logits, labels = _logits(t, v, dtype, gen), _labels(t, v, gen)
    g_logp, g_ent = torch.randn(t, generator=gen), torch.randn(t, generator=gen)
    ref = _fwd_bwd(logits.double(), labels, temperature, g_logp.double(), g_ent.double(),
                   fn=reference.token_logprobs)
    plain = _fwd_bwd(logits, labels, temperature, g_logp, g_ent, fn=_plain)
    floor = forward_floor(logits, temperature)
    ignored = labels == -100
    for where in dict.fromkeys(("cpu", device)):
        got = _fwd_bwd(logits.to(where), labels.to(where), temperature, g_logp.to(where),
                       g_ent.to(where))
        grad_floor = backward_floor(logits, labels, temperature, g_logp, g_ent, got[1])
        for i, (name, fl) in enumerate((("logp", floor), ("entropy", floor),
                                        ("grad", grad_floor))):
            assert_within_2x_plain(got[i], plain[i], ref[i], floor=fl, seed=seed,
                                   what=f"{where} {dtype} [{t}, {v}] T={temperature} {name}")
        assert got[2].dtype == dtype
        assert not got[2][ignored.to(where)].any(), f"{where}: ignored rows get gradient"
        assert not got[0][ignored.to(where)].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t,v,temperature", [(37, 32000, 1.0), (64, 1031, 0.7), (9, 151936, 1.3),
                                             (128, 4099, 0.35)])
def test_token_logprobs_cross(device, dtype, t, v, temperature):
    check_token_logprobs(device, dtype, t, v, temperature)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_token_logprobs_over_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    v = 151936
    t = (2**31 // v) + 200  # 14334 rows: 2.18e9 elements, 4.4 GB in bf16
    if free < 3 * t * v * 2 + (2 << 30):  # logits, gradient, one fp32 slice
        pytest.skip(f"needs ~{3 * t * v * 2 / 2**30:.0f} GB of free GPU memory, "
                    f"{free / 2**30:.0f} GB free")
    assert check_large_logprobs("cuda", t, v) > 0  # rows past element 2^31 were checked


def test_large_logprobs_plumbing_on_cpu():
    # The same check at a small size, so its code runs in CI.
    assert check_large_logprobs("cpu", 300, 1031, rows=40) == 0


def check_large_logprobs(device: str, t: int, v: int, rows: int = 96, seed: int = SEED) -> int:
    """bf16 [t, v] logits on ``device``, forward and backward through the kernel; the ``rows``
    first and last rows (for t * v > 2^31, on both sides of element 2^31) recomputed in float64
    and in plain bf16 PyTorch on the same device, and held to the rule. Returns how many checked
    rows start past element 2^31."""
    gen = torch.Generator(device=device).manual_seed(seed)
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
    sub = logits.detach()[idx]
    ref = _fwd_bwd(sub.double(), labels[idx], 1.1, g_logp[idx].double(), g_ent[idx].double(),
                   fn=reference.token_logprobs)
    plain = _fwd_bwd(sub, labels[idx], 1.1, g_logp[idx], g_ent[idx], fn=_plain)
    floor = forward_floor(sub, 1.1)
    grad_floor = backward_floor(sub, labels[idx], 1.1, g_logp[idx], g_ent[idx], ent[idx])
    for got, p, r, name, fl in ((logp[idx], plain[0], ref[0], "logp", floor),
                                (ent[idx], plain[1], ref[1], "entropy", floor),
                                (grad[idx], plain[2], ref[2], "grad", grad_floor)):
        assert_within_2x_plain(got, p, r, floor=fl, seed=seed, what=f"{device} [{t}, {v}] {name}")
    return int(((idx * v) >= 2**31).sum())


def check_segment_mean(device: str, dtype: torch.dtype, seed: int = SEED) -> None:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.randint(1, 40, (300,), generator=gen), torch.tensor([1, 70000])])
    lengths = lengths[torch.randperm(len(lengths), generator=gen)]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    values = (torch.randn(int(cu[-1]), generator=gen) * 2 + 0.5).to(dtype)
    g = torch.randn(len(lengths), generator=gen, dtype=torch.float64).to(dtype)
    ref = reference.segment_mean(values.double(), cu)
    ref_grad = torch.repeat_interleave(g.double() / lengths, lengths)
    plain = reference.segment_mean(values, cu)
    plain_grad = torch.repeat_interleave(g / lengths.to(dtype), lengths)
    floor = rounding_floor(dtype, values.double().abs().max().item(), int(lengths.max()))
    grad_floor = rounding_floor(dtype, g.double().abs().max().item())
    for where in dict.fromkeys(("cpu", device)):
        for cu_dtype in (torch.int32, torch.int64):
            x = values.to(where).requires_grad_(True)
            out = segment_mean(x, cu.to(where, cu_dtype))
            (grad,) = torch.autograd.grad((out * g.to(where)).sum(), x)
            assert out.dtype == dtype and grad.dtype == dtype
            what = f"{where} {dtype} cu_seqlens {cu_dtype}"
            assert_within_2x_plain(out, plain, ref, floor=floor, seed=seed, what=what)
            assert_within_2x_plain(grad, plain_grad, ref_grad, floor=grad_floor, seed=seed,
                                   what=f"{what} grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_segment_mean_cross(device, dtype):
    check_segment_mean(device, dtype)


def _ragged(gen: torch.Generator) -> torch.Tensor:
    """Group sizes 1..64 (several of 1 and 2) plus one group of 1000, in random order."""
    sizes = torch.cat([torch.randint(1, 65, (60,), generator=gen), torch.tensor([1, 1, 2, 1000])])
    sizes = sizes[torch.randperm(len(sizes), generator=gen)]
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    return offsets


def check_group_advantages(device: str, dtype: torch.dtype, scale: bool, unbiased: bool,
                           seed: int = SEED) -> None:
    gen = torch.Generator().manual_seed(seed)
    offsets = _ragged(gen)
    n = int(offsets[-1])
    conf = (-torch.rand(n, generator=gen, dtype=torch.float64) * 3)
    conf[torch.randint(0, n, (n // 10,), generator=gen)] = 0.0  # exact zeros
    rewards = (torch.randint(0, 2, (n,), generator=gen) + 0.2 * torch.randn(n, generator=gen,
                                                                          dtype=torch.float64))
    rewards[offsets[3]:offsets[4]] = 1.0  # one group of equal rewards
    # The inputs as the kernels see them, rounded to dtype: the scores' ratios of log-probs near
    # 0 amplify input rounding (up to ~2e-4 in fp32), which is the inputs' error, not the kernels'.
    conf, rewards = conf.to(dtype), rewards.to(dtype)
    kw = dict(scale=scale, unbiased=unbiased)
    ref = reference.icpo_advantages(conf.double(), rewards.double(), group_offsets=offsets, **kw)
    ref_grpo = reference.grpo_advantages(rewards.double(), group_offsets=offsets, **kw)
    plain = reference.icpo_advantages(conf, rewards, group_offsets=offsets, **kw)
    plain_grpo = reference.grpo_advantages(rewards, group_offsets=offsets, **kw)
    largest = int(offsets.diff().max())
    for where in dict.fromkeys(("cpu", device)):
        c, r, o = conf.to(where), rewards.to(where), offsets.to(where)
        got = icpo_advantages(c, r, group_offsets=o, **kw)
        grpo = grpo_advantages(r, group_offsets=o, **kw)
        scores = preference_scores(c, group_offsets=o)
        for name, x, p, y in (("scores", got.scores, plain.scores, ref.scores),
                              ("rewards", got.rewards, plain.rewards, ref.rewards),
                              ("advantages", got.advantages, plain.advantages, ref.advantages),
                              ("grpo", grpo, plain_grpo, ref_grpo),
                              ("preference_scores", scores, plain.scores, ref.scores)):
            assert x.dtype == dtype
            floor = rounding_floor(dtype, y.abs().max().item(), largest)
            assert_within_2x_plain(x, p, y, floor=floor, seed=seed,
                                   what=f"{where} {dtype} {kw} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale,unbiased", [(True, False), (True, True), (False, False)])
def test_group_advantages_cross(device, dtype, scale, unbiased):
    check_group_advantages(device, dtype, scale, unbiased)
