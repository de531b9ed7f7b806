"""Group ops at the edges of float arithmetic: a group of equal rewards gets EXACTLY 0 (kernels
and reference, every dtype, G = 1..64); large finite rewards never overflow into 0 or NaN
advantages (computed safely or refused); delta / tau / omega / eps validated (issues 10 and 13)."""

from __future__ import annotations

import math

import pytest
import torch

import icpo  # noqa: F401  (registers torch.ops.icpo.*)
from icpo.ops import grpo_advantages, icpo_advantages, preference_scores, reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Values whose float32 / float64 mean over G copies is not always exact (0.9 at G = 8 gave -0.056
# per response before the fix, 0.107 at G = 16), plus a few ordinary ones.
EQUAL_VALUES = (0.9, 0.1, 0.7, 1 / 3, -0.3, 1e-3, 123.456, 0.0, -0.0, 1.0)
NORM = [dict(scale=True, unbiased=False), dict(scale=True, unbiased=True),
        dict(scale=False, unbiased=False)]
SIZES = list(range(1, 65))  # every G in 1..64, one group each, in one ragged batch


def _all_sizes_offsets() -> torch.Tensor:
    cu = torch.zeros(len(SIZES) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(SIZES).cumsum(0)
    return cu


def _nonzero(x: torch.Tensor, offsets: torch.Tensor) -> list[int]:
    """The group sizes G whose advantages are not all exactly 0."""
    bounds = offsets.tolist()
    return [e - s for s, e in zip(bounds[:-1], bounds[1:]) if bool((x[s:e] != 0).any())]


@pytest.mark.parametrize("norm", NORM, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_rewards_give_exact_zero_grpo(dtype, norm):
    offsets = _all_sizes_offsets()
    n = int(offsets[-1])
    for value in EQUAL_VALUES:
        rewards = torch.full((n,), value, dtype=dtype)
        got = grpo_advantages(rewards, group_offsets=offsets, **norm)
        assert _nonzero(got, offsets) == [], f"kernel, R = {value}"
        ref = reference.grpo_advantages(rewards, group_offsets=offsets, **norm)
        assert _nonzero(ref, offsets) == [], f"reference, R = {value}"
        # ICPO with omega = 0 is GRPO: also exactly 0.
        conf = -torch.linspace(0.01, 2.0, n, dtype=torch.float64).to(dtype)
        got = icpo_advantages(conf, rewards, group_offsets=offsets, omega=0.0, **norm)
        assert _nonzero(got.advantages, offsets) == [], f"icpo omega=0, R = {value}"


@pytest.mark.parametrize("norm", NORM, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_fused_rewards_give_exact_zero_icpo(dtype, norm):
    # Every confidence <= -2 and delta = 0.4: every S >= 0.4 * 2 = 0.8 > |R| / tau = 0.45, so the
    # bonus sits at its cap for every response and R_final = 1.35 for the whole group.
    offsets = _all_sizes_offsets()
    n = int(offsets[-1])
    gen = torch.Generator().manual_seed(0)
    conf = (-2.0 - 3.0 * torch.rand(n, generator=gen, dtype=torch.float64)).to(dtype)
    for value in (0.9, -0.9, 0.0):
        rewards = torch.full((n,), value, dtype=dtype)
        for fn in (icpo_advantages, reference.icpo_advantages):
            out = fn(conf, rewards, group_offsets=offsets, delta=0.4, tau=2.0, omega=1.0, **norm)
            assert bool((out.rewards == out.rewards[0]).all())  # the premise of the test
            assert _nonzero(out.advantages, offsets) == [], f"{fn.__module__}, R = {value}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_equal_groups_and_large_rewards(dtype):
    offsets = _all_sizes_offsets().cuda()
    n = int(offsets[-1])
    gen = torch.Generator().manual_seed(0)
    conf = (-2.0 - torch.rand(n, generator=gen, dtype=torch.float64)).to(dtype).cuda()
    for norm in NORM:
        for value in EQUAL_VALUES:
            rewards = torch.full((n,), value, dtype=dtype, device="cuda")
            got = grpo_advantages(rewards, group_offsets=offsets, **norm)
            assert _nonzero(got.cpu(), offsets.cpu()) == [], (norm, value)
            out = icpo_advantages(conf, rewards, group_offsets=offsets, omega=1.0, **norm)
            if bool((out.rewards == out.rewards[0]).all()):
                assert _nonzero(out.advantages.cpu(), offsets.cpu()) == [], (norm, value)
    if dtype in (torch.float32, torch.bfloat16):
        r = (torch.tensor([1.0, -1.0] * 4) * 1e37).to(dtype).cuda()
        torch.testing.assert_close(grpo_advantages(r, 8).cpu(), grpo_advantages(r.cpu(), 8))


def test_issue_figures_eight_and_sixteen_rewards_of_0_9():
    """The issue's figures: eight rewards of 0.9 gave -0.056 each, sixteen 0.107 (float32)."""
    for g in (8, 16):
        rewards = torch.full((g,), 0.9)
        assert torch.equal(grpo_advantages(rewards, g), torch.zeros(g))
        assert torch.equal(grpo_advantages(rewards, g, unbiased=True), torch.zeros(g))
        assert torch.equal(reference.grpo_advantages(rewards, g), torch.zeros(g))


def test_nearly_equal_rewards_still_normalize():
    # One ulp apart is not equal: the group keeps its (tiny, eps-dominated) signal, centered.
    r = torch.tensor([0.9, 0.9, 0.9, float(torch.nextafter(torch.tensor(0.9), torch.tensor(1.0)))])
    got = grpo_advantages(r, 4)
    assert bool((got != 0).any()) and abs(float(got.double().sum())) < 1e-6
    torch.testing.assert_close(got, reference.grpo_advantages(r, 4))


# -- large finite rewards ----------------------------------------------------------------------

@pytest.mark.parametrize("magnitude", [1e20, 1e37], ids=str)
def test_large_float32_rewards_normalize_without_overflow(magnitude):
    # (R - mean)^2 overflows float32 above ~1.8e19: the std became inf and every advantage 0.
    r = torch.tensor([1.0, -1.0] * 4) * magnitude
    for kw, want in (({}, 1.0), ({"unbiased": True}, math.sqrt(7 / 8))):
        got = grpo_advantages(r, 8, **kw)
        torch.testing.assert_close(got, torch.tensor([want, -want] * 4), rtol=1e-6, atol=0)
        ref = reference.grpo_advantages(r, 8, **kw)
        torch.testing.assert_close(ref, got, rtol=1e-6, atol=0)
    conf = -torch.linspace(0.1, 1.0, 8)
    out = icpo_advantages(conf, r, 8, omega=1.0, tau=2.0)
    assert bool(torch.isfinite(out.rewards).all()) and bool(torch.isfinite(out.advantages).all())
    assert bool((out.advantages != 0).all())


@pytest.mark.parametrize("dtype, value", [(torch.float32, 3e38), (torch.float32, 1e38),
                                          (torch.bfloat16, 3e38), (torch.float16, 30000.0),
                                          (torch.float64, 1e200)], ids=str)
def test_rewards_too_large_for_the_dtype_are_refused(dtype, value):
    r = torch.tensor([value, -value, value, -value], dtype=torch.float64).to(dtype)
    with pytest.raises(ValueError, match=r"grpo_advantages: rewards must satisfy \|R\| <= .*"
                                         r"got rewards\[0\] = "):
        grpo_advantages(r, 2)
    with pytest.raises(ValueError, match=r"icpo_advantages: rewards must satisfy \|R\| <= "):
        icpo_advantages(torch.full((4,), -0.5).to(dtype), r, 2)


def test_reward_limit_accounts_for_the_bonus():
    # |R_final| <= |R| * (1 + omega / tau): a reward GRPO accepts may be refused with a large
    # omega / tau, and the message says why.
    r = torch.tensor([1e37, -1e37])
    grpo_advantages(r, 2)
    with pytest.raises(ValueError, match=r"omega = 100.0, tau = 0.5"):
        icpo_advantages(torch.tensor([-0.5, -0.1]), r, 2, omega=100.0, tau=0.5)


def test_largest_accepted_rewards_give_finite_outputs():
    for dtype in DTYPES:
        limit = torch.finfo(dtype).max
        for omega, tau in ((0.0, 2.0), (1.0, 2.0), (3.0, 0.5)):
            r = _largest_accepted(dtype, omega, tau, limit)
            conf = torch.tensor([-3.0, -1e-3, -2.0]).to(dtype)
            for scale in (True, False):
                out = icpo_advantages(conf, r, 3, omega=omega, tau=tau, scale=scale)
                for t in out:
                    assert bool(torch.isfinite(t).all()), (dtype, omega, tau, scale)
                assert bool((out.advantages != 0).any())


def _largest_accepted(dtype, omega, tau, limit):
    """Rewards [b, -b, -b] with b the largest the wrapper accepts (bisection on log2 b)."""
    def accepted(b):
        r = torch.tensor([b, -b, -b], dtype=torch.float64).to(dtype)
        try:
            icpo_advantages(torch.full((3,), -0.5).to(dtype), r, 3, omega=omega, tau=tau)
            return True
        except ValueError:
            return False

    lo, hi = 0.0, min(math.log2(float(limit)), 1023.9)
    assert accepted(2.0 ** lo) and not accepted(2.0 ** hi)
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if accepted(2.0 ** mid) else (lo, mid)
    return torch.tensor([2.0 ** lo, -2.0 ** lo, -2.0 ** lo], dtype=torch.float64).to(dtype)


# -- parameters --------------------------------------------------------------------------------

C4, R4 = torch.tensor([-0.5, -0.1, -0.2, -0.9]), torch.tensor([1.0, 0.0, 0.1, 0.9])
BAD_PARAMS = [
    ("icpo_advantages", "tau", 0.0, "tau must be a finite number > 0, got 0.0"),
    ("icpo_advantages", "tau", -2.0, "tau must be a finite number > 0, got -2.0"),
    ("icpo_advantages", "tau", float("nan"), "tau must be a finite number > 0, got nan"),
    ("icpo_advantages", "tau", float("inf"), "tau must be a finite number > 0, got inf"),
    ("icpo_advantages", "delta", -0.4, "delta must be a finite number >= 0, got -0.4"),
    ("icpo_advantages", "delta", float("nan"), "delta must be a finite number >= 0, got nan"),
    ("preference_scores", "delta", float("inf"), "delta must be a finite number >= 0, got inf"),
    ("icpo_advantages", "omega", -1.0, "omega must be a finite number >= 0, got -1.0"),
    ("icpo_advantages", "omega", float("nan"), "omega must be a finite number >= 0, got nan"),
    ("icpo_advantages", "eps", -1e-6, "eps must be a finite number >= 0, got -1e-06"),
    ("grpo_advantages", "eps", float("nan"), "eps must be a finite number >= 0, got nan"),
    ("icpo_advantages", "tau", "2", "tau must be a real number, got str"),
    ("icpo_advantages", "omega", True, "omega must be a real number, got bool"),
]


@pytest.mark.parametrize("op, name, value, match", BAD_PARAMS, ids=lambda x: str(x)[:20])
def test_bad_parameters_are_refused(op, name, value, match):
    call = {"icpo_advantages": lambda **k: icpo_advantages(C4, R4, 2, **k),
            "preference_scores": lambda **k: preference_scores(C4, 2, **k),
            "grpo_advantages": lambda **k: grpo_advantages(R4, 2, **k)}[op]
    with pytest.raises((ValueError, TypeError), match=f"^{op}: " + match.replace("+", r"\+")):
        call(**{name: value})


def test_zero_delta_and_omega_are_allowed():
    out = icpo_advantages(C4, R4, 2, delta=0.0, omega=0.0, eps=0.0)
    assert bool((out.scores == 0).all())
    torch.testing.assert_close(out.advantages, grpo_advantages(R4, 2, eps=0.0))
    # numpy and torch scalars are real numbers too
    import numpy as np
    icpo_advantages(C4, R4, 2, tau=np.float32(2.0), omega=torch.tensor(0.5).item())
