"""``algorithm.compat: verl | trl`` reproduces the peers' advantages and losses.

The peers' formulas are re-implemented here, independently and on their padded ``[B, L]``
layout, from their documented behaviour: verl 0.9.1's ``core_algos`` (GRPO outcome advantage,
``agg_loss``, vanilla policy loss with dual-clip, ``low_var_kl``) and TRL 1.16's
``GRPOTrainer`` (group / batch / no reward scaling with eps 1e-4, the grpo / bnpo / dr_grpo /
dapo loss types over gradient-accumulation micro-batches, sequence-level importance sampling,
the micro-batch token-mean entropy bonus). icpo runs its own packed path with the preset.
"""

from collections import defaultdict

import pytest
import torch

from icpo.algorithms import compute_advantages, grpo_loss
from icpo.config import load_config

L = 12  # max response length: verl's padded width / loss_scale_factor, TRL's max_completion_length


def batch(lengths, seed=0):
    """Packed tokens (icpo) and the same numbers padded to [B, L] with a mask (the peers)."""
    g = torch.Generator().manual_seed(seed)
    T, B = sum(lengths), len(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    logp = -torch.rand(T, generator=g) * 3
    old = logp + (torch.rand(T, generator=g) - 0.5) * 0.8
    ref = logp + (torch.rand(T, generator=g) - 0.5) * 0.4
    ent = torch.rand(T, generator=g) * 2
    adv = torch.randn(B, generator=g)
    pad = {}
    for name, x in dict(logp=logp, old=old, ref=ref, ent=ent).items():
        pad[name] = torch.zeros(B, L)
        for b in range(B):
            pad[name][b, :lengths[b]] = x[cu[b]:cu[b + 1]]
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).float()
    packed = dict(cu=cu, logp=logp, old=old, ref=ref, ent=ent, adv=adv)
    return packed, dict(pad, adv=adv, mask=mask)


def icpo_loss(cfg, packed, micro):
    """icpo's mini-batch loss: grpo_loss per micro-batch (lists of response indices) with the
    mini-batch totals, summed (what the trainer backpropagates)."""
    cu, total = packed["cu"], 0.0
    for idx in micro:
        s, e = cu[idx[0]].item(), cu[idx[-1] + 1].item()
        tok = lambda x: x[s:e]  # noqa: E731  (a one-line helper)
        adv_tok = torch.repeat_interleave(packed["adv"][idx], (cu[1:] - cu[:-1])[idx])
        loss, _ = grpo_loss(tok(packed["logp"]), tok(packed["old"]), tok(packed["ref"]),
                            tok(packed["ent"]), adv_tok, cu[idx[0]:idx[-1] + 2] - s, cfg.actor, L,
                            global_tokens=cu[-1].item(), global_seqs=len(cu) - 1,
                            num_micro_batches=len(micro))
        total += loss
    return total


# ---------------------------------------------------------------- verl, re-implemented

def verl_grpo_advantage(scores, index, eps=1e-6, norm_adv_by_std_in_grpo=True):
    """verl compute_grpo_outcome_advantage: per-uid mean / torch.std; a uid seen once gets
    mean 0 and std 1."""
    by_uid = defaultdict(list)
    for s, u in zip(scores.tolist(), index):
        by_uid[u].append(s)
    out = torch.empty_like(scores)
    for i, u in enumerate(index):
        group = torch.tensor(by_uid[u])
        mean, std = (0.0, 1.0) if len(group) == 1 else (group.mean(), group.std())
        out[i] = (scores[i] - mean) / (std + eps) if norm_adv_by_std_in_grpo else scores[i] - mean
    return out


def verl_agg_loss(mat, mask, mode, loss_scale_factor=None):
    if mode == "token-mean":
        return (mat * mask).sum() / mask.sum()
    if mode == "seq-mean-token-sum":
        return (mat * mask).sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return ((mat * mask).sum(-1) / (mask.sum(-1) + 1e-8)).mean()
    assert mode == "seq-mean-token-sum-norm"  # verl >= 0.9: the seq-mean, then / the horizon
    horizon = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
    return (mat * mask).sum(-1).mean() / horizon


def verl_actor_loss(p, mode, clip=0.2, clip_ratio_c=3.0, kl_coef=0.001, entropy_coeff=0.01):
    """verl's vanilla PPO loss with dual-clip, + kl_coef * low_var_kl - entropy_coeff * entropy,
    each aggregated with agg_loss(mode)."""
    adv, mask = p["adv"][:, None].expand(-1, L), p["mask"]
    ratio = torch.exp((p["logp"] - p["old"]).clamp(-20, 20))
    loss1, loss2 = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    clipped = torch.maximum(loss1, loss2)
    dual = torch.minimum(-adv * clip_ratio_c, clipped)
    pg = verl_agg_loss(torch.where(adv < 0, dual, clipped), mask, mode)
    kl = (p["ref"] - p["logp"]).clamp(-20, 20)
    kld = (torch.exp(kl) - kl - 1).clamp(-10, 10)
    return (pg + kl_coef * verl_agg_loss(kld, mask, mode)
            - entropy_coeff * verl_agg_loss(p["ent"], mask, mode))


@pytest.mark.parametrize("scale", [True, False])
def test_verl_advantages(scale):
    cfg = load_config(None, ["algorithm.compat=verl", "algorithm.name=grpo",
                             f"algorithm.scale_advantages={str(scale).lower()}"])
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(9, generator=g).round(decimals=1)
    sizes = [2, 4, 1, 2]  # ragged, with a group of one
    index = [k for k, n in enumerate(sizes) for _ in range(n)]
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    ours = compute_advantages(None, rewards, None, cfg.algorithm, 0.0, group_offsets=offsets)
    want = verl_grpo_advantage(rewards, index, norm_adv_by_std_in_grpo=scale)
    torch.testing.assert_close(ours.advantages, want, rtol=1e-6, atol=1e-6)
    assert ours.advantages[6] != 0  # the group of one keeps its reward, as in verl


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_verl_loss(mode):
    cfg = load_config(None, ["algorithm.compat=verl", f"actor.loss_agg_mode={mode}",
                             "actor.entropy_coef=0.01", "actor.kl_coef=0.001"])
    packed, padded = batch([3, 12, 1, 7, 5, 9], seed=1)
    want = verl_actor_loss(padded, mode)
    # One micro-batch (verl's mini-batch as one piece) and icpo's own split: the same number.
    for micro in ([list(range(6))], [[0, 1], [2], [3, 4, 5]]):
        torch.testing.assert_close(icpo_loss(cfg, packed, micro), want, rtol=2e-6, atol=1e-7)


def test_verl_dual_clip_caps_negative_advantages():
    cfg = load_config(None, ["algorithm.compat=verl", "actor.kl_coef=0"])
    packed, _ = batch([4, 4])
    packed["adv"] = torch.tensor([-1.0, -1.0])
    packed["logp"] = packed["old"] + 3.0  # ratio e^3 > clip_ratio_c = 3: the cap is active
    capped = icpo_loss(cfg, packed, [[0, 1]])
    assert capped.item() == pytest.approx(3.0)  # -A * clip_ratio_c on every token
    off = load_config(None, ["algorithm.compat=verl", "actor.kl_coef=0", "actor.clip_ratio_c=null"])
    assert icpo_loss(off, packed, [[0, 1]]).item() == pytest.approx(torch.e ** 3, rel=1e-5)


# ---------------------------------------------------------------- TRL 1.16, re-implemented

def trl_advantages(rewards, G, scale_rewards="group"):
    """GRPOTrainer: group mean; std of the group or of the batch (Bessel) + 1e-4, or none."""
    grouped = rewards.view(-1, G)
    adv = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if scale_rewards == "group":
        adv = adv / (grouped.std(1).repeat_interleave(G) + 1e-4)
    elif scale_rewards == "batch":
        adv = adv / (rewards.std() + 1e-4)
    return adv


def trl_loss(padded, micro, loss_type, is_level="token", eps=0.2, entropy_coef=0.01):
    """GRPOTrainer._compute_loss summed over one accumulation window of micro-batches
    (beta = 0, one process, steps_per_generation = gradient_accumulation_steps)."""
    ga, total_tokens = len(micro), padded["mask"].sum()
    out = 0.0
    for idx in micro:
        p = {k: v[idx] for k, v in padded.items()}
        mask, adv = p["mask"], p["adv"][:, None]
        log_ratio = p["logp"] - p["old"]
        if is_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
        coef1 = torch.exp(log_ratio)
        per_tok = -torch.min(coef1 * adv, coef1.clamp(1 - eps, 1 + eps) * adv) * mask
        if loss_type == "grpo":
            loss = (per_tok.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
        elif loss_type == "bnpo":
            loss = per_tok.sum() / mask.sum().clamp(min=1.0) / ga
        elif loss_type == "dr_grpo":
            loss = per_tok.sum() / (per_tok.size(0) * L) / ga
        else:
            loss = per_tok.sum() / total_tokens
        ent = (p["ent"] * mask).sum() / mask.sum().clamp(min=1.0) / ga
        out = out + loss - entropy_coef * ent
    return out


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_trl_advantages(scale_rewards):
    overrides = ["algorithm.compat=trl", "algorithm.name=grpo"]
    if scale_rewards == "batch":
        overrides.append("algorithm.std_scope=batch")
    if scale_rewards == "none":
        overrides.append("algorithm.scale_advantages=false")
    cfg = load_config(None, overrides)
    rewards = torch.rand(12, generator=torch.Generator().manual_seed(5)).round(decimals=1)
    rewards[:4] = 0.5  # a group with zero std
    ours = compute_advantages(None, rewards, 4, cfg.algorithm, 0.0)
    torch.testing.assert_close(ours.advantages, trl_advantages(rewards, 4, scale_rewards),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_trl_loss(loss_type, is_level):
    cfg = load_config(None, ["algorithm.compat=trl", f"actor.loss_agg_mode={loss_type}",
                             f"actor.importance_sampling_level={is_level}",
                             "actor.entropy_coef=0.01"])
    packed, padded = batch([3, 12, 1, 7, 5, 9, 2, 6], seed=2)
    # per_device_train_batch_size = 2, 4 accumulation steps
    micro = [[0, 1], [2, 3], [4, 5], [6, 7]]
    torch.testing.assert_close(icpo_loss(cfg, packed, micro),
                               trl_loss(padded, micro, loss_type, is_level), rtol=2e-6, atol=1e-7)


def test_presets_yield_to_explicit_settings():
    cfg = load_config(None, ["actor.loss_agg_mode=grpo", "algorithm.compat=trl"])
    assert cfg.actor.loss_agg_mode == "grpo" and cfg.algorithm.eps == 1e-4
    default = load_config(None)
    assert (default.algorithm.unbiased_std, default.actor.clip_ratio_c) == (False, None)


# ---------------------------------------------------------------- empty responses

def test_immediate_eos_is_a_one_token_response():
    """The rule (docs/compat.md): the EOS is part of the response, so a rollout that stops at
    once is a one-token response with its reward, confidence (the EOS's log-prob) and loss
    term, like any other; a zero-token response cannot come out of the engines and is refused
    by name rather than silently dropped."""
    from icpo.rollout.base import truncate_at_eos
    from icpo.trainer.batching import pack_samples

    eos = 7
    response, reason = truncate_at_eos([eos, 3, 3], [eos], 16)
    assert (response, reason) == ([eos], "stop")
    mb = pack_samples([[1, 2], [1, 2]], [response, [4, 5, eos]], [0, 1])
    assert mb.resp_cu_seqlens.tolist() == [0, 1, 4] and mb.labels.tolist() == [eos, 4, 5, eos]
    cfg = load_config(None, ["actor.kl_coef=0"])
    logp = torch.tensor([-0.5, -1.0, -2.0, -0.1], requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), None, None, torch.tensor([1.0, -1.0, -1.0, -1.0]),
                        mb.resp_cu_seqlens, cfg.actor, 16)
    loss.backward()
    assert logp.grad[0] < 0  # the one-token response is trained: its EOS is made more likely
    with pytest.raises(ValueError, match="sample 1 has an empty prompt or response"):
        pack_samples([[1, 2], [1, 2]], [[eos], []], [0, 1])


@pytest.mark.parametrize("override, field", [
    ("actor.clip_ratio_c=1.0", "actor.clip_ratio_c"),
    ("actor.entropy_agg_mode=mean", "actor.entropy_agg_mode"),
    ("algorithm.compat=openrlhf", "algorithm.compat"),
    ("algorithm.std_scope=global", "algorithm.std_scope"),
    ("actor.importance_sampling_level=seq", "actor.importance_sampling_level"),
])
def test_bad_compat_settings_name_the_field(override, field):
    from icpo.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        load_config(None, [override])
