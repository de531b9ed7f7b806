"""GRPO/ICPO policy loss on packed response tokens (docs/algorithm.md step 8, paper Eq. 4).

Every tensor here is *packed*: the response tokens of B responses concatenated into ``[T]``,
with ``cu_seqlens`` (int32/int64 ``[B+1]``, 0 first, T last, non-decreasing, no empty segment)
saying which tokens belong to which response (flash-attention's varlen convention).

Micro-batching. A mini-batch (one optimizer step) is often split into micro-batches whose
gradients are accumulated. Pass the *mini-batch* totals as ``global_tokens`` (token-mean) and
``global_seqs`` (the two seq-mean modes): each micro-batch's loss is then its share of the
mini-batch loss, and the micro-batch losses **sum** to the loss of the whole mini-batch (so
accumulate with ``loss.backward()`` and no further scaling). Without them each call normalizes
by its own token/sequence count.
"""

from __future__ import annotations

from typing import Any

import torch

from icpo import ops

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")

#: Bounds that keep exp() finite in the ratio and in k3 (the same as verl's ``low_var_kl``).
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def check_packed(cu_seqlens: torch.Tensor, num_tokens: int, name: str = "cu_seqlens") -> None:
    """Validate ``cu_seqlens`` for ``num_tokens`` packed tokens; raises ValueError naming it."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor [B+1] with B >= 1")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != num_tokens:
        raise ValueError(f"{name} must start at 0 and end at T={num_tokens}, "
                         f"got {bounds[0]} ... {bounds[-1]}")
    if any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{name} must be strictly increasing (every response has >= 1 token)")


def _check_tokens(**tensors: torch.Tensor | None) -> int:
    """All given tensors are floating ``[T]`` with the same T; returns T."""
    size = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 1-D floating tensor [T] of packed tokens")
        if size is not None and t.numel() != size:
            raise ValueError(f"{name} has {t.numel()} tokens, expected {size}")
        size = t.numel()
    return size


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 ``[T]``: index of the response each packed token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def broadcast_to_tokens(per_seq: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Repeat a per-response value ``[B]`` over its tokens -> ``[T]`` (e.g. the advantage)."""
    if per_seq.dim() != 1 or per_seq.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"per_seq must be [B={cu_seqlens.numel() - 1}], "
                         f"got {tuple(per_seq.shape)}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(per_seq.device)
    return torch.repeat_interleave(per_seq, lengths)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, fp32 ``[T]``.

    k1 = logp - ref_logp; k2 = 0.5 * (logp - ref_logp)^2; k3 (Schulman's low-variance
    estimator, verl's ``low_var_kl``) = exp(d) - d - 1 with d = ref_logp - logp, d clamped to
    +-20 and the result to [-10, 10] so one wild token cannot dominate the loss.
    """
    _check_tokens(logp=logp, ref_logp=ref_logp)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    diff = logp.float() - ref_logp.float()
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    d = (-diff).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1.0).clamp(-K3_CLAMP, K3_CLAMP)


def aggregate(values: torch.Tensor, cu_seqlens: torch.Tensor, mode: str = "token-mean",
              max_response_length: int | None = None, *, global_tokens: int | None = None,
              global_seqs: int | None = None) -> torch.Tensor:
    """Reduce per-token values ``[T]`` to a scalar (differentiable).

    - ``token-mean``: sum over all tokens / ``global_tokens`` (default T).
    - ``seq-mean-token-mean``: each response's token mean, summed / ``global_seqs`` (default B).
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): each response's token *sum* / max_response_length,
      summed / ``global_seqs`` (default B). Needs ``max_response_length``.
    """
    T = _check_tokens(values=values)
    check_packed(cu_seqlens, T)
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
    num_seqs = cu_seqlens.numel() - 1
    if mode == "token-mean":
        return values.sum() / _positive("global_tokens", global_tokens, T)
    seq_means = ops.segment_mean(values, cu_seqlens)
    denom = _positive("global_seqs", global_seqs, num_seqs)
    if mode == "seq-mean-token-mean":
        return seq_means.sum() / denom
    if max_response_length is None or max_response_length <= 0:
        raise ValueError("max_response_length must be a positive int for "
                         f"seq-mean-token-sum-norm, got {max_response_length!r}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(seq_means)
    return (seq_means * lengths).sum() / (max_response_length * denom)


def _positive(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                cu_seqlens: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                agg_mode: str = "token-mean", max_response_length: int | None = None, *,
                global_tokens: int | None = None,
                global_seqs: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with separate low/high clip ("clip-higher" when clip_high > clip_low).

    Per token: ``-min(r * A, clamp(r, 1 - clip_low, 1 + clip_high) * A)`` with
    ``r = exp(logp - old_logp)``, aggregated by :func:`aggregate`. logp (with grad),
    old_logp, advantages: float ``[T]``.

    Returns ``(loss, stats)``; stats are this call's token means, as floats: ``clipfrac``
    (share of tokens where the clipped term is the active one), ``approx_kl`` (mean of
    old_logp - logp), ``ratio_mean``.
    """
    T = _check_tokens(logp=logp, old_logp=old_logp, advantages=advantages)
    check_packed(cu_seqlens, T)
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    log_ratio = (logp.float() - old_logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = aggregate(per_token, cu_seqlens, agg_mode, max_response_length,
                     global_tokens=global_tokens, global_seqs=global_seqs)
    with torch.no_grad():
        stats = {
            "clipfrac": (clipped < unclipped).float().mean().item(),
            "approx_kl": (-log_ratio).mean().item(),
            "ratio_mean": ratio.mean().item(),
        }
    return loss, stats


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              entropy: torch.Tensor | None, advantages: torch.Tensor, cu_seqlens: torch.Tensor,
              actor_cfg: Any, max_response_length: int | None = None, *,
              global_tokens: int | None = None,
              global_seqs: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Full actor loss: policy loss + kl_coef * agg(KL to ref) - entropy_coef * agg(entropy).

    Args:
        logp, old_logp, advantages: float ``[T]`` (logp carries the gradient).
        ref_logp: float ``[T]`` reference-model log-probs; required when ``kl_coef > 0``.
        entropy: float ``[T]`` per-token entropy; required when ``entropy_coef != 0``, otherwise
            only reported (detached).
        actor_cfg: has ``clip_low``, ``clip_high``, ``kl_coef``, ``kl_estimator``,
            ``entropy_coef``, ``loss_agg_mode`` (e.g. ``icpo.config.ActorConfig``).
        global_tokens, global_seqs: mini-batch totals; see the module docstring.

    Returns ``(loss, metrics)``. Metrics ending in ``_loss`` are this call's share of the
    mini-batch value (they sum over micro-batches like the loss); the others (``clipfrac``,
    ``approx_kl``, ``ratio_mean``, ``kl``, ``entropy``) are this call's token means, with
    ``num_tokens`` / ``num_seqs`` to weight them by.
    """
    mode = actor_cfg.loss_agg_mode
    agg = dict(mode=mode, max_response_length=max_response_length,
               global_tokens=global_tokens, global_seqs=global_seqs)
    loss, stats = policy_loss(logp, old_logp, advantages, cu_seqlens, actor_cfg.clip_low,
                              actor_cfg.clip_high, mode, max_response_length,
                              global_tokens=global_tokens, global_seqs=global_seqs)
    metrics = {"pg_loss": loss.item(), **stats, "num_tokens": float(logp.numel()),
               "num_seqs": float(cu_seqlens.numel() - 1)}
    if actor_cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("ref_logp is required when actor kl_coef > 0")
        kl = kl_penalty(logp, ref_logp, actor_cfg.kl_estimator)
        kl_loss = aggregate(kl, cu_seqlens, **agg)
        loss = loss + actor_cfg.kl_coef * kl_loss
        metrics.update(kl_loss=kl_loss.item(), kl=kl.detach().mean().item())
    if actor_cfg.entropy_coef != 0:
        if entropy is None:
            raise ValueError("entropy is required when actor entropy_coef != 0")
        ent_loss = aggregate(entropy, cu_seqlens, **agg)
        loss = loss - actor_cfg.entropy_coef * ent_loss
        metrics["entropy_loss"] = ent_loss.item()
    if entropy is not None:
        _check_tokens(logp=logp, entropy=entropy)
        metrics["entropy"] = entropy.detach().float().mean().item()
    return loss, metrics
