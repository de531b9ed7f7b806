"""GRPO/ICPO policy loss on packed response tokens (docs/algorithm.md step 8, paper Eq. 4).

Every tensor here is *packed*: the response tokens of B responses concatenated into ``[T]``,
with ``cu_seqlens`` (int32/int64 ``[B+1]``, 0 first, T last, non-decreasing, no empty segment)
saying which tokens belong to which response (flash-attention's varlen convention).

Micro-batching. A mini-batch (one optimizer step) is often split into micro-batches whose
gradients are accumulated. Pass the *mini-batch* totals as ``global_tokens`` (token-mean) and
``global_seqs`` (the two seq-mean modes): each micro-batch's loss is then its share of the
mini-batch loss, and the micro-batch losses **sum** to the loss of the whole mini-batch (so
accumulate with ``loss.backward()`` and no further scaling). Without them each call normalizes
by its own token/sequence count. TRL's ``bnpo`` is the one mode defined per micro-batch (the mean
of the micro-batches' token means): pass ``num_micro_batches`` for it.

Mode names are the peers' and do the peers' arithmetic (docs/compat.md): verl's
``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``
(``verl.trainer.ppo.core_algos.agg_loss``) and TRL's loss types ``grpo``, ``bnpo``, ``dr_grpo``,
``dapo`` (``GRPOTrainer._compute_loss``), as of verl 0.9.1 and TRL 1.16.0.
"""

from __future__ import annotations

from typing import Any, get_args

import torch

from icpo import ops
from icpo.config.schema import AggMode, ISLevel, KLEstimator
from icpo.ops._checks import check_index_tensor, check_offsets

AGG_MODES = get_args(AggMode)
#: Modes that divide by max_response_length (verl's loss_scale_factor, TRL's max_completion_length).
LENGTH_NORM_MODES = ("seq-mean-token-sum-norm", "dr_grpo")
KL_ESTIMATORS = get_args(KLEstimator)
IS_LEVELS = get_args(ISLevel)

#: Bounds that keep exp() finite in the ratio and in k3 (the same as verl's ``low_var_kl``).
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def check_packed(cu_seqlens: torch.Tensor, num_tokens: int, name: str = "cu_seqlens") -> None:
    """Validate ``cu_seqlens`` (int32/int64 ``[B+1]``, B >= 1, on any device) for ``num_tokens``
    packed tokens: 0 first, ``num_tokens`` last, no empty response. Raises ValueError naming it
    (the checks of :mod:`icpo.ops`, whose type errors become ValueError here, as always)."""
    try:
        check_index_tensor(cu_seqlens, name, min_numel=2)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    check_offsets(cu_seqlens, num_tokens, op=None, name=name, part="response", total_name="T")


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
              max_response_length: int | None = None, *, global_tokens: float | None = None,
              global_seqs: int | None = None, num_micro_batches: int | None = None,
              token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-token values ``[T]`` to a scalar (differentiable). With S the token sum of all
    responses, s_i / n_i response i's token sum / count, L = ``max_response_length``,
    N = ``global_tokens`` (default T), B = ``global_seqs`` (default this call's responses):

    - ``token-mean`` (verl) = ``dapo`` (TRL): S / N.
    - ``seq-mean-token-mean`` (verl) = ``grpo`` (TRL): sum_i (s_i / n_i) / B.
    - ``seq-mean-token-sum`` (verl): sum_i s_i / B.
    - ``seq-mean-token-sum-norm`` (verl >= 0.9, ``loss_scale_factor`` = L) = ``dr_grpo`` (TRL,
      L = ``max_completion_length``): S / (B * L). (verl 0.8 divided by L only: docs/compat.md.)
    - ``bnpo`` (TRL): (S / T) / ``num_micro_batches`` -- this call's own token mean, so the
      mini-batch value is the mean of its micro-batches' token means (TRL's definition).

    ``token_weights`` (float ``[T]``, no gradient; ``actor.mask_truncated``'s 0/1 per response):
    TRL's ``completion_mask``. Every value is multiplied by its weight, and the token counts
    become weighted counts clamped to >= 1 as TRL clamps them: T in ``bnpo``, n_i in
    ``seq-mean-token-mean``, and N's default (pass the weighted mini-batch total as
    ``global_tokens``). The response count B still counts every response.
    """
    T = _check_tokens(values=values, token_weights=token_weights)
    check_packed(cu_seqlens, T)
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
    num_seqs = cu_seqlens.numel() - 1
    if token_weights is not None:
        return _weighted_aggregate(values, cu_seqlens, mode, max_response_length,
                                   token_weights.detach().to(values.dtype), global_tokens,
                                   global_seqs, num_micro_batches)
    if mode in ("token-mean", "dapo"):
        return values.sum() / _positive("global_tokens", global_tokens, T)
    if mode == "bnpo":
        return values.sum() / T / _positive("num_micro_batches", num_micro_batches, 1)
    if mode in LENGTH_NORM_MODES:
        if max_response_length is None or max_response_length <= 0:
            raise ValueError(f"max_response_length must be a positive int for {mode}, "
                             f"got {max_response_length!r}")
        seqs = _positive("global_seqs", global_seqs, num_seqs)
        return values.sum() / (max_response_length * seqs)
    denom = _positive("global_seqs", global_seqs, num_seqs)
    if mode == "seq-mean-token-sum":  # the responses' token sums add up to S
        return values.sum() / denom
    return ops.segment_mean(values, cu_seqlens).sum() / denom


def _weighted_aggregate(values, cu_seqlens, mode, max_response_length, w, global_tokens,
                        global_seqs, num_micro_batches) -> torch.Tensor:
    """:func:`aggregate` with TRL's ``completion_mask`` arithmetic (its docstring)."""
    num_seqs = cu_seqlens.numel() - 1
    weighted = values * w
    if mode in ("token-mean", "dapo"):
        return weighted.sum() / _positive("global_tokens", global_tokens,
                                          w.sum().clamp(min=1.0))
    if mode == "bnpo":
        return (weighted.sum() / w.sum().clamp(min=1.0)
                / _positive("num_micro_batches", num_micro_batches, 1))
    if mode in ("seq-mean-token-mean", "grpo"):
        # s_i / max(n_i^w, 1) as mean(v w) / max(mean(w), 1 / n_i): no segment sum needed
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(values.dtype)
        seq = ops.segment_mean(weighted, cu_seqlens) / torch.maximum(
            ops.segment_mean(w, cu_seqlens), 1.0 / lengths)
        return seq.sum() / _positive("global_seqs", global_seqs, num_seqs)
    # the token-sum modes: the weights are all they change
    return aggregate(weighted, cu_seqlens, mode, max_response_length, global_tokens=global_tokens,
                     global_seqs=global_seqs, num_micro_batches=num_micro_batches)


def _positive(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                cu_seqlens: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                agg_mode: str = "token-mean", max_response_length: int | None = None, *,
                global_tokens: int | None = None, global_seqs: int | None = None,
                num_micro_batches: int | None = None, clip_ratio_c: float | None = None,
                importance_sampling_level: str = "token",
                rollout_is_weights: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with separate low/high clip ("clip-higher" when clip_high > clip_low).

    Per token: ``-min(r * A, clamp(r, 1 - clip_low, 1 + clip_high) * A)``, aggregated by
    :func:`aggregate`. logp (with grad), old_logp, advantages: float ``[T]``.

    - ``importance_sampling_level="token"``: ``r = exp(logp - old_logp)`` per token (PPO, GRPO);
      ``"sequence"`` (GSPO; TRL's ``importance_sampling_level="sequence"``): every token of a
      response uses ``r = exp(mean over the response of (logp - old_logp))``.
    - ``clip_ratio_c`` (verl's dual-clip, arXiv 1912.09729; None = off): where A < 0 the
      per-token loss is capped at ``-A * clip_ratio_c`` (> 1).

    - ``rollout_is_weights`` (float ``[T]``, detached; None = off): rollout correction
      (``icpo.algorithms.rollout_correction.rollout_is_weights``), multiplying the per-token
      loss after dual-clip and before aggregation, as verl and TRL place it
      (``rollout_correction.apply_rollout_is``, not imported: that module imports this one).
    - ``token_weights``: see :func:`aggregate` (``actor.mask_truncated``).

    Log-ratios are clamped to +-20 before exp (as verl; TRL does not clamp: equal unless a
    token's log-ratio exceeds 20).

    Returns ``(loss, stats)``; stats are this call's token means, as floats: ``clipfrac``
    (share of tokens where the clipped term is the active one), ``approx_kl`` (mean of
    old_logp - logp), ``ratio_mean``, and with dual-clip ``clipfrac_lower`` (share of tokens
    where the cap is active).
    """
    T = _check_tokens(logp=logp, old_logp=old_logp, advantages=advantages,
                      rollout_is_weights=rollout_is_weights)
    check_packed(cu_seqlens, T)
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual-clip) must be > 1 or None, got {clip_ratio_c!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    token_log_ratio = logp.float() - old_logp.float()
    log_ratio = token_log_ratio
    if importance_sampling_level == "sequence":
        log_ratio = broadcast_to_tokens(ops.segment_mean(token_log_ratio, cu_seqlens), cu_seqlens)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    capped = None
    if clip_ratio_c is not None:
        cap = -adv * clip_ratio_c
        capped = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights.detach().to(per_token.dtype)
    loss = aggregate(per_token, cu_seqlens, agg_mode, max_response_length,
                     global_tokens=global_tokens, global_seqs=global_seqs,
                     num_micro_batches=num_micro_batches, token_weights=token_weights)
    with torch.no_grad():
        stats = {
            "clipfrac": (clipped < unclipped).float().mean().item(),
            "approx_kl": (-token_log_ratio).mean().item(),
            "ratio_mean": ratio.mean().item(),
        }
        if capped is not None:
            stats["clipfrac_lower"] = capped.float().mean().item()
    return loss, stats


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              entropy: torch.Tensor | None, advantages: torch.Tensor, cu_seqlens: torch.Tensor,
              actor_cfg: Any, max_response_length: int | None = None, *,
              global_tokens: float | None = None, global_seqs: int | None = None,
              num_micro_batches: int | None = None, rollout_is_weights: torch.Tensor | None = None,
              token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Full actor loss: policy loss + kl_coef * agg(KL to ref) - entropy_coef * agg'(entropy).

    Args:
        logp, old_logp, advantages: float ``[T]`` (logp carries the gradient).
        ref_logp: float ``[T]`` reference-model log-probs; required when ``kl_coef > 0``.
        entropy: float ``[T]`` per-token entropy; required when ``entropy_coef != 0``, otherwise
            only reported (detached).
        actor_cfg: has ``clip_low``, ``clip_high``, ``kl_coef``, ``kl_estimator``,
            ``entropy_coef``, ``loss_agg_mode`` and optionally ``clip_ratio_c``,
            ``importance_sampling_level``, ``entropy_agg_mode`` (e.g. ``icpo.config.ActorConfig``).
            agg' is ``entropy_agg_mode`` when set (TRL: ``bnpo``, the micro-batch token mean
            whatever the loss type), else ``loss_agg_mode`` (verl).
        global_tokens, global_seqs, num_micro_batches: mini-batch totals; see the module
            docstring.
        rollout_is_weights: rollout-correction weights ``[T]`` on the policy-gradient term only
            (:func:`policy_loss`); the KL and entropy terms stay unweighted, as in verl and TRL.
        token_weights: per-token weights ``[T]`` of all three terms (``actor.mask_truncated``,
            :func:`aggregate`); the metrics below stay means over all tokens.

    Returns ``(loss, metrics)``. Metrics ending in ``_loss`` are this call's share of the
    mini-batch value (they sum over micro-batches like the loss); the others (``clipfrac``,
    ``approx_kl``, ``ratio_mean``, ``kl``, ``entropy``) are this call's token means, with
    ``num_tokens`` / ``num_seqs`` to weight them by.
    """
    mode = actor_cfg.loss_agg_mode
    totals = dict(global_tokens=global_tokens, global_seqs=global_seqs,
                  num_micro_batches=num_micro_batches)
    agg = dict(mode=mode, max_response_length=max_response_length, **totals,
               token_weights=token_weights)
    loss, stats = policy_loss(
        logp, old_logp, advantages, cu_seqlens, actor_cfg.clip_low, actor_cfg.clip_high, mode,
        max_response_length, **totals, clip_ratio_c=getattr(actor_cfg, "clip_ratio_c", None),
        importance_sampling_level=getattr(actor_cfg, "importance_sampling_level", "token"),
        rollout_is_weights=rollout_is_weights, token_weights=token_weights)
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
        ent_mode = getattr(actor_cfg, "entropy_agg_mode", None) or mode
        ent_loss = aggregate(entropy, cu_seqlens, **{**agg, "mode": ent_mode})
        loss = loss - actor_cfg.entropy_coef * ent_loss
        metrics["entropy_loss"] = ent_loss.item()
    if entropy is not None:
        _check_tokens(logp=logp, entropy=entropy)
        metrics["entropy"] = entropy.detach().float().mean().item()
    return loss, metrics
