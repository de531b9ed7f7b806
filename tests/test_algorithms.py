"""icpo.algorithms: omega schedules, default delta, KL estimators, loss aggregation, the clipped
policy loss, confidence and advantages (all on CPU, small inputs)."""

import math
from types import SimpleNamespace

import pytest
import torch

from icpo.algorithms import (
    AGG_MODES,
    aggregate,
    broadcast_to_tokens,
    compute_advantages,
    confidence_from_logprobs,
    default_delta,
    grpo_loss,
    kl_penalty,
    omega_at,
    policy_loss,
)


def omega_cfg(schedule, hi=0.9, lo=0.1, peak=0.4):
    return SimpleNamespace(schedule=schedule, omega_max=hi, omega_min=lo, peak_fraction=peak)


def actor_cfg(**kw):
    base = dict(clip_low=0.2, clip_high=0.2, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
                loss_agg_mode="token-mean")
    base.update(kw)
    return SimpleNamespace(**base)


def algo_cfg(name="icpo", **kw):
    base = dict(name=name, delta=0.4, tau=2.0, scale_advantages=True, unbiased_std=False,
                eps=1e-6)
    base.update(kw)
    return SimpleNamespace(**base)


def packed(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    logp = -torch.rand(T, generator=g, dtype=torch.float64).float() * 3
    old = logp + (torch.rand(T, generator=g) - 0.5) * 0.6
    ref = logp + (torch.rand(T, generator=g) - 0.5) * 0.4
    adv = broadcast_to_tokens(torch.randn(len(lengths), generator=g), cu)
    ent = torch.rand(T, generator=g) * 2
    return cu, logp, old, ref, adv, ent


# ---------------------------------------------------------------- omega schedule

def test_warmup_decay_key_points():
    # 25 steps, peak 0.4: t_peak = 10, last = 24, decay midpoint 17.
    cfg = omega_cfg("warmup_decay")
    assert omega_at(0, 25, cfg) == pytest.approx(0.1)
    assert omega_at(5, 25, cfg) == pytest.approx(0.5)           # cosine rise half-way
    assert omega_at(2, 25, cfg) == pytest.approx(0.1 + 0.8 * 0.5 * (1 - math.cos(math.pi * 0.2)))
    assert omega_at(10, 25, cfg) == pytest.approx(0.9)
    assert omega_at(17, 25, cfg) == pytest.approx(0.5)          # linear fall half-way
    assert omega_at(24, 25, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["warmup_decay", "warmup_retention"])
def test_warmup_monotone(schedule):
    values = [omega_at(t, 500, omega_cfg(schedule)) for t in range(500)]
    rise, rest = values[:201], values[200:]
    assert all(b > a for a, b in zip(rise, rise[1:]))
    assert max(values) == pytest.approx(0.9) and values[200] == pytest.approx(0.9)
    if schedule == "warmup_decay":
        assert all(b < a for a, b in zip(rest, rest[1:]))
        assert values[-1] == pytest.approx(0.1)
    else:
        assert all(v == pytest.approx(0.9) for v in rest)


def test_warmup_retention_matches_rise_then_holds():
    dec, ret = omega_cfg("warmup_decay"), omega_cfg("warmup_retention")
    for t in range(11):
        assert omega_at(t, 25, ret) == omega_at(t, 25, dec)
    assert omega_at(24, 25, ret) == pytest.approx(0.9)


def test_linear_decay_and_constant():
    lin = omega_cfg("linear_decay")
    assert omega_at(0, 11, lin) == pytest.approx(0.9)
    assert omega_at(5, 11, lin) == pytest.approx(0.5)
    assert omega_at(10, 11, lin) == pytest.approx(0.1)
    values = [omega_at(t, 11, lin) for t in range(11)]
    assert all(b < a for a, b in zip(values, values[1:]))
    assert {omega_at(t, 7, omega_cfg("constant")) for t in range(7)} == {0.9}


def test_schedule_edge_cases():
    for s in ("warmup_decay", "warmup_retention", "linear_decay", "constant"):
        assert 0.1 <= omega_at(0, 1, omega_cfg(s)) <= 0.9
    assert omega_at(0, 10, omega_cfg("warmup_decay", peak=0.0)) == pytest.approx(0.9)
    assert omega_at(9, 10, omega_cfg("warmup_decay", peak=0.0)) == pytest.approx(0.1)
    assert omega_at(9, 10, omega_cfg("warmup_decay", peak=1.0)) < 0.9


@pytest.mark.parametrize("args, match", [
    ((10, 10, omega_cfg("constant")), "step"),
    ((-1, 10, omega_cfg("constant")), "step"),
    ((0, 0, omega_cfg("constant")), "total_steps"),
    ((0.5, 10, omega_cfg("constant")), "step"),
    ((0, 10, omega_cfg("cosine")), "schedule"),
    ((0, 10, omega_cfg("warmup_decay", peak=1.5)), "peak_fraction"),
    ((0, 10, omega_cfg("constant", hi=float("nan"))), "omega_max"),
])
def test_schedule_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        omega_at(*args)


def test_default_delta():
    assert default_delta(494_000_000) == 0.5
    assert default_delta(3_090_000_000) == 0.5      # Qwen2.5-3B
    assert default_delta(4_020_000_000) == 0.4      # Qwen3-4B
    assert default_delta(7_620_000_000) == 0.4      # Qwen2.5-7B
    assert default_delta(8_190_000_000) == 0.4      # Qwen3-8B
    assert default_delta(14_770_000_000) == 0.3     # Qwen2.5-14B
    with pytest.raises(ValueError, match="num_params"):
        default_delta(0)


# ---------------------------------------------------------------- KL and aggregation

def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = [-0.5, 1.0, 0.0]  # ref - logp
    k3 = torch.tensor([math.exp(x) - x - 1 for x in d])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), k3)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.5, 0.0]))


def test_k3_clamped_and_nonnegative():
    extreme = kl_penalty(torch.tensor([0.0, -50.0]), torch.tensor([-50.0, 0.0]))
    assert torch.equal(extreme, torch.tensor([10.0, 10.0]))
    _, logp, _, ref, _, _ = packed([5, 7])
    assert (kl_penalty(logp, ref) >= 0).all()
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref, "k4")


def test_aggregate_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    cu = torch.tensor([0, 1, 3, 6])
    assert aggregate(values, cu, "token-mean").item() == pytest.approx(3.5)
    assert aggregate(values, cu, "seq-mean-token-mean").item() == pytest.approx((1 + 2.5 + 5) / 3)
    assert aggregate(values, cu, "seq-mean-token-sum", 4).item() == pytest.approx(21 / 3)
    assert aggregate(values, cu, "seq-mean-token-sum-norm", 4).item() == pytest.approx(21 / 12)
    assert aggregate(values, cu, "dr_grpo", 4).item() == pytest.approx(21 / 12)
    assert aggregate(values, cu, "dapo").item() == pytest.approx(3.5)
    assert aggregate(values, cu, "grpo").item() == pytest.approx((1 + 2.5 + 5) / 3)
    assert aggregate(values, cu, "bnpo", num_micro_batches=2).item() == pytest.approx(3.5 / 2)
    assert aggregate(values, cu, "token-mean", global_tokens=12).item() == pytest.approx(21 / 12)


def padded_reference(values, cu, mode, max_len):
    """verl-style masked aggregation on a padded [B, L] layout, written independently."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    grid = torch.zeros(len(lengths), max(lengths))
    mask = torch.zeros_like(grid)
    for b, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        grid[b, :n], mask[b, :n] = values[s:s + n], 1.0
    if mode in ("token-mean", "dapo", "bnpo"):
        return (grid * mask).sum() / mask.sum()
    if mode in ("seq-mean-token-mean", "grpo"):
        return ((grid * mask).sum(-1) / mask.sum(-1)).mean()
    if mode == "seq-mean-token-sum":
        return (grid * mask).sum(-1).mean()
    assert mode in ("seq-mean-token-sum-norm", "dr_grpo")
    return ((grid * mask).sum(-1) / max_len).mean()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_packed_equals_padded(mode):
    cu, logp, old, _, adv, _ = packed([3, 1, 6, 2])
    per_token = -torch.minimum(torch.exp(logp - old) * adv,
                               torch.exp(logp - old).clamp(0.8, 1.2) * adv)
    loss, _ = policy_loss(logp, old, adv, cu, 0.2, 0.2, mode, 8)
    torch.testing.assert_close(loss, padded_reference(per_token, cu, mode, 8))


@pytest.mark.parametrize("mode", [m for m in AGG_MODES if m != "bnpo"])
def test_micro_batches_sum_to_full_batch(mode):
    lengths = [4, 1, 7, 3, 2, 5]
    cu, logp, old, ref, adv, ent = packed(lengths)
    cfg = actor_cfg(loss_agg_mode=mode, kl_coef=0.05, entropy_coef=0.01, clip_high=0.28)
    full_logp = logp.clone().requires_grad_()
    full, _ = grpo_loss(full_logp, old, ref, ent, adv, cu, cfg, 8)
    full.backward()
    total, grads = 0.0, []
    for seqs in ([0, 1], [2], [3, 4, 5]):
        s, e = cu[seqs[0]].item(), cu[seqs[-1] + 1].item()
        mb_cu = cu[seqs[0]:seqs[-1] + 2] - s
        mb_logp = logp[s:e].clone().requires_grad_()
        loss, _ = grpo_loss(mb_logp, old[s:e], ref[s:e], ent[s:e], adv[s:e], mb_cu, cfg, 8,
                            global_tokens=cu[-1].item(), global_seqs=len(lengths))
        loss.backward()
        total, grads = total + loss.item(), grads + [mb_logp.grad]
    assert total == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(torch.cat(grads), full_logp.grad)


# ---------------------------------------------------------------- policy loss

def test_ratio_one_gives_minus_mean_advantage():
    cu, logp, _, _, adv, _ = packed([3, 5, 2])
    logp = logp.clone().requires_grad_()
    loss, stats = policy_loss(logp, logp.detach(), adv, cu)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / adv.numel())
    assert stats["clipfrac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["approx_kl"] == 0.0


@pytest.mark.parametrize("ratio, adv, clipped", [
    (1.5, 1.0, True),     # good token pushed too far up: clipped, no gradient
    (0.5, 1.0, False),    # good token below the range: full gradient
    (0.5, -1.0, True),    # bad token pushed too far down: clipped
    (1.5, -1.0, False),   # bad token above the range: full gradient
    (1.25, 1.0, False),   # inside clip-higher's wider upper bound (0.28)
])
def test_clipping(ratio, adv, clipped):
    old = torch.tensor([-1.0])
    logp = (old + math.log(ratio)).requires_grad_()
    cu = torch.tensor([0, 1])
    loss, stats = policy_loss(logp, old, torch.tensor([adv]), cu, clip_low=0.2, clip_high=0.28)
    bound = min(max(ratio, 0.8), 1.28)
    expected = -min(ratio * adv, bound * adv)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert stats["clipfrac"] == (1.0 if clipped else 0.0)
    if clipped:
        assert logp.grad.item() == 0.0
    else:
        assert logp.grad.item() == pytest.approx(-adv * ratio, rel=1e-5)


def test_grpo_loss_terms():
    cu, logp, old, ref, adv, ent = packed([3, 4])
    cfg = actor_cfg(kl_coef=0.1, entropy_coef=0.02, kl_estimator="k3")
    loss, m = grpo_loss(logp, old, ref, ent, adv, cu, cfg, 8)
    pg, _ = policy_loss(logp, old, adv, cu)
    expected = pg + 0.1 * kl_penalty(logp, ref).mean() - 0.02 * ent.mean()
    torch.testing.assert_close(loss, expected)
    assert m["pg_loss"] == pytest.approx(pg.item())
    for key in ("kl_loss", "kl", "entropy_loss", "entropy", "clipfrac", "approx_kl", "ratio_mean"):
        assert math.isfinite(m[key])
    plain, m0 = grpo_loss(logp, old, None, None, adv, cu, actor_cfg(), 8)
    torch.testing.assert_close(plain, pg)
    assert "kl_loss" not in m0 and "entropy" not in m0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, ent, adv, cu, cfg, 8)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(logp, old, ref, None, adv, cu, actor_cfg(entropy_coef=0.1), 8)


@pytest.mark.parametrize("call, match", [
    (lambda v, cu: aggregate(v, torch.tensor([0, 2, 5]), "token-mean"), "cu_seqlens"),
    (lambda v, cu: aggregate(v, cu.float(), "token-mean"), "cu_seqlens"),
    (lambda v, cu: aggregate(v, torch.tensor([0, 0, 6]), "token-mean"), "cu_seqlens"),
    (lambda v, cu: aggregate(v, cu, "sum"), "loss_agg_mode"),
    (lambda v, cu: aggregate(v, cu, "seq-mean-token-sum-norm"), "max_response_length"),
    (lambda v, cu: aggregate(v, cu, global_tokens=0), "global_tokens"),
    (lambda v, cu: policy_loss(v, v[:5], v, cu), "old_logp"),
    (lambda v, cu: policy_loss(v, v, v, cu, clip_low=1.0), "clip_low"),
])
def test_bad_input(call, match):
    values, cu = torch.randn(6), torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match=match):
        call(values, cu)


# ---------------------------------------------------------------- confidence and advantages

def test_confidence_by_hand():
    logp = torch.tensor([-1.0, -3.0, -2.0], requires_grad=True)
    cu = torch.tensor([0, 2, 3])
    torch.testing.assert_close(confidence_from_logprobs(logp, cu), torch.tensor([-2.0, -2.0]))
    lmp = confidence_from_logprobs(logp, cu, "log_mean_prob")
    expected = torch.tensor([math.log((math.exp(-1) + math.exp(-3)) / 2), -2.0])
    torch.testing.assert_close(lmp, expected)
    assert not lmp.requires_grad
    far = confidence_from_logprobs(torch.tensor([-1000.0, -1001.0]), torch.tensor([0, 2]),
                                   "log_mean_prob")
    assert far.item() == pytest.approx(-1000 + math.log((1 + math.exp(-1)) / 2))
    with pytest.raises(ValueError, match="kind"):
        confidence_from_logprobs(logp, cu, "max")


def test_paper_table7_first_group():
    conf = torch.tensor([-0.0135, -0.0583, -0.0216, -0.0090, -0.0407])
    rewards = torch.tensor([0.1, 0.1, 1.0, 0.1, 1.0])
    out = compute_advantages(conf, rewards, 5, algo_cfg("icpo"), omega=1.0)
    torch.testing.assert_close(out.advantages,
                               torch.tensor([-0.7917, -0.7917, 1.2108, -0.8649, 1.2376]),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(out.scores, torch.tensor([0.2704, 0.5852, 0.4202, 0.0036, 0.4372]),
                               atol=5e-4, rtol=0)
    grpo = compute_advantages(None, rewards, 5, algo_cfg("grpo"), omega=1.0)
    torch.testing.assert_close(grpo.advantages,
                               torch.tensor([-0.816, -0.816, 1.225, -0.816, 1.225]),
                               atol=1e-3, rtol=0)
    assert torch.equal(grpo.scores, torch.zeros(5)) and torch.equal(grpo.rewards, rewards)


@pytest.mark.parametrize("scale, unbiased", [(True, False), (True, True), (False, False)])
def test_icpo_at_omega_zero_is_grpo(scale, unbiased):
    g = torch.Generator().manual_seed(3)
    conf = -torch.rand(24, generator=g) - 0.01
    rewards = (torch.rand(24, generator=g) > 0.5).float() * 0.9 + 0.1
    kw = dict(scale_advantages=scale, unbiased_std=unbiased)
    icpo = compute_advantages(conf, rewards, 4, algo_cfg("icpo", **kw), omega=0.0)
    grpo = compute_advantages(conf, rewards, 4, algo_cfg("grpo", **kw), omega=0.0)
    assert torch.equal(icpo.advantages, grpo.advantages)
    assert torch.equal(icpo.rewards, rewards)
    assert not torch.equal(
        compute_advantages(conf, rewards, 4, algo_cfg("icpo", **kw), omega=1.0).advantages,
        grpo.advantages)


def test_grpo_normalization_options_and_ragged_groups():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 1.0])
    unb = compute_advantages(None, rewards, 3, algo_cfg("grpo", unbiased_std=True), 0.0)
    first = rewards[:3]
    torch.testing.assert_close(unb.advantages[:3], (first - first.mean()) / (first.std() + 1e-6))
    centered = compute_advantages(None, rewards, 3, algo_cfg("grpo", scale_advantages=False), 0.0)
    torch.testing.assert_close(centered.advantages[:3], first - first.mean())
    ragged = compute_advantages(None, rewards, None, algo_cfg("grpo"), 0.0,
                                group_offsets=torch.tensor([0, 2, 6]))
    torch.testing.assert_close(ragged.advantages[:2], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)


def test_compute_advantages_bad_config():
    conf, rewards = -torch.rand(4) - 0.1, torch.rand(4)
    with pytest.raises(ValueError, match="name"):
        compute_advantages(conf, rewards, 2, algo_cfg("ppo"), 1.0)
    with pytest.raises(ValueError, match="delta"):
        compute_advantages(conf, rewards, 2, algo_cfg("icpo", delta=None), 1.0)
    with pytest.raises(ValueError, match="confidence"):
        compute_advantages(None, rewards, 2, algo_cfg("icpo"), 1.0)
