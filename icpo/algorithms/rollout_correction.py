"""Rollout correction: importance weights between the engine that sampled the responses
(pi_rollout: vLLM in bf16, the HF engine at the sampling temperature) and the trainer's policy
before the update (pi_old), truncated above (TIS). verl's decoupled mode
(``algorithm.rollout_correction``, ``verl/trainer/ppo/rollout_corr_helper.py``
``compute_rollout_correction_weights``) and TRL's ``vllm_importance_sampling_correction``
(``GRPOTrainer._generate_and_score_completions``).

Per token t of a response, with d_t = log pi_old(t) - log pi_rollout(t):

- ``token`` (verl ``rollout_is: token``; TRL ``token_truncate`` / ``token_mask``):
  w_t = exp(d_t).
- ``sequence`` (verl ``rollout_is: sequence``; TRL ``sequence_truncate`` / ``sequence_mask``):
  every token of the response gets w = exp(sum_t d_t) -- the product of the token ratios, the
  SUM of the log-ratios (not their mean, which GSPO's policy ratio uses).

Then ``mode="truncate"`` (verl; TRL's ``*_truncate``): w = min(w, threshold) (and
max(w, threshold_lower) when set); ``mode="mask"`` (TRL's ``*_mask``, TRL's default
``sequence_mask``): w = 0 where w > threshold (or < threshold_lower). The weights carry no
gradient. verl clamps the log-ratio (or its sum) to +-20 before exp, TRL does not; icpo clamps
as verl, which changes a TRL weight only where the log-ratio is below -20, by < 2.1e-9.
Defaults: verl ``rollout_is: null``, ``rollout_is_threshold: 2.0``; TRL on (with vLLM),
``sequence_mask``, ``vllm_importance_sampling_clip_max: 3.0``, ``clip_min: None``.

How the weight enters the loss (:func:`apply_rollout_is`): it multiplies the per-token
policy-gradient loss -- the clipped surrogate, after dual-clip -- before aggregation. verl:
``pg_losses = pg_losses * rollout_is_weights`` in ``compute_policy_loss_vanilla``, then
``agg_loss``; TRL: ``per_token_loss = per_token_loss * importance_sampling_ratio`` before the
KL term is added. The KL and entropy terms are not weighted; clip fractions and the PPO ratio
pi / pi_old are unchanged.

Packed layout as in :mod:`icpo.algorithms.losses`: per-token ``[T]`` tensors and
``cu_seqlens [B+1]``, every response at least one token (an empty response is refused).
"""

from __future__ import annotations

import math
from typing import Callable, get_args

import torch

from icpo.algorithms.losses import check_packed
from icpo.config.schema import ISLevel, RolloutISMode

ROLLOUT_IS_LEVELS = get_args(ISLevel)
ROLLOUT_IS_MODES = get_args(RolloutISMode)
#: verl's SAFETY_BOUND: exp(+-20) stays finite in float32.
SAFETY_BOUND = 20.0
#: TRL's ``vllm_importance_sampling_mode`` names -> (level, mode) here.
TRL_IS_MODES = {"token_truncate": ("token", "truncate"), "token_mask": ("token", "mask"),
                "sequence_truncate": ("sequence", "truncate"),
                "sequence_mask": ("sequence", "mask")}

_N_STATS = 9


def _check_inputs(old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                  cu_seqlens: torch.Tensor, allow_empty: bool = False) -> None:
    for name, t in (("old_logp", old_logp), ("rollout_logp", rollout_logp)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 1-D floating tensor [T] of packed tokens")
    if old_logp.numel() != rollout_logp.numel():
        raise ValueError(f"rollout_logp has {rollout_logp.numel()} tokens, old_logp "
                         f"{old_logp.numel()}: the engine must return one log-prob per token")
    if not (allow_empty and old_logp.numel() == 0 and cu_seqlens.numel() == 1):
        check_packed(cu_seqlens, old_logp.numel())
    if bool(torch.isnan(rollout_logp).any()):
        raise ValueError(f"rollout_logp has {int(torch.isnan(rollout_logp).sum())} NaN values: "
                         "the engine did not return a sampling log-prob for every token")


def _check_config(level: str, threshold: float, mode: str, threshold_lower: float | None) -> None:
    if level not in ROLLOUT_IS_LEVELS:
        raise ValueError(f"algorithm.rollout_correction.rollout_is must be null or one of "
                         f"{ROLLOUT_IS_LEVELS}, got {level!r}")
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"algorithm.rollout_correction.rollout_is_mode must be one of "
                         f"{ROLLOUT_IS_MODES}, got {mode!r}")
    if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"algorithm.rollout_correction.rollout_is_threshold must be a finite "
                         f"number > 0, got {threshold!r}")
    if threshold_lower is not None and not 0 <= threshold_lower < threshold:
        raise ValueError(f"algorithm.rollout_correction.rollout_is_threshold_lower must be null "
                         f"or in [0, rollout_is_threshold={threshold}), got {threshold_lower!r}")


def _segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]`` per-response sums. A float64 prefix sum: deterministic on every device
    (index_add_ uses atomics on CUDA) and exact enough (|error| ~ 1e-16 * prefix)."""
    cs = torch.zeros(x.numel() + 1, dtype=torch.float64, device=x.device)
    cs[1:] = torch.cumsum(x.double(), 0)
    cu = cu_seqlens.long().to(x.device)
    return cs[cu[1:]] - cs[cu[:-1]]


def _raw_log_weights(old_logp, rollout_logp, cu_seqlens, level) -> torch.Tensor:
    """float32 log-weights per unit: ``[T]`` (token) or ``[B]`` (sequence), clamped to +-20."""
    d = old_logp.detach().float() - rollout_logp.detach().float()
    if level == "sequence":
        d = _segment_sum(d, cu_seqlens).float()
    return d.clamp(-SAFETY_BOUND, SAFETY_BOUND)


def _bound(w: torch.Tensor, threshold: float, mode: str, threshold_lower: float | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(bounded weights, bool: the bound changed this weight)."""
    out = (w > threshold) if threshold_lower is None else (w > threshold) | (w < threshold_lower)
    if mode == "mask":
        return w.masked_fill(out, 0.0), out
    return w.clamp(min=threshold_lower, max=threshold), out


@torch.no_grad()
def rollout_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                       cu_seqlens: torch.Tensor, level: str = "token", threshold: float = 2.0, *,
                       mode: str = "truncate", threshold_lower: float | None = None
                       ) -> torch.Tensor:
    """Rollout-correction weight of every token, fp32 ``[T]``, detached.

    Args:
        old_logp: float ``[T]`` log pi_old: the trainer's log-probs of the sampled tokens before
            the update, at the sampling temperature (the scoring pass's ``old_logp``).
        rollout_logp: float ``[T]`` log pi_rollout: the engine's own log-probs of the same tokens.
        cu_seqlens: int ``[B+1]`` response boundaries.
        level: ``algorithm.rollout_correction.rollout_is``: ``"token"`` | ``"sequence"``.
        threshold: ``rollout_is_threshold`` (verl 2.0; TRL's ``clip_max`` 3.0).
        mode: ``"truncate"`` (verl) | ``"mask"`` (TRL's ``*_mask``).
        threshold_lower: TRL's ``vllm_importance_sampling_clip_min`` (None: no lower bound).
    """
    _check_inputs(old_logp, rollout_logp, cu_seqlens)
    _check_config(level, threshold, mode, threshold_lower)
    w, _ = _bound(torch.exp(_raw_log_weights(old_logp, rollout_logp, cu_seqlens, level)),
                  threshold, mode, threshold_lower)
    if level == "sequence":
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(w.device)
        w = torch.repeat_interleave(w, lengths)
    return w


def apply_rollout_is(pg_per_token: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The per-token policy-gradient loss ``[T]`` times the rollout weights (None: unchanged),
    before :func:`icpo.algorithms.losses.aggregate` -- verl's and TRL's placement (module doc).
    Add the KL and subtract the entropy terms afterwards, unweighted."""
    if weights is None:
        return pg_per_token
    if weights.shape != pg_per_token.shape:
        raise ValueError(f"rollout weights have shape {tuple(weights.shape)}, the per-token "
                         f"loss {tuple(pg_per_token.shape)}")
    return pg_per_token * weights.detach().to(pg_per_token.dtype)


@torch.no_grad()
def rollout_mismatch_metrics(old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                             cu_seqlens: torch.Tensor, level: str = "token",
                             threshold: float = 2.0, *, mode: str = "truncate",
                             threshold_lower: float | None = None,
                             gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                             prefix: str = "rollout_corr/") -> dict[str, float]:
    """How far the engine's log-probs are from the trainer's, over every process's tokens.

    Computed whether or not the weights are applied (``level`` and ``threshold`` then say what
    they would be). ``gather`` maps this process's 1-D float tensor to the concatenation over
    processes (``icpo.trainer.distributed.all_gather_floats``); None = one process. A process
    with no responses passes ``T = 0`` tensors and ``cu_seqlens = [0]`` (it must still take
    part in the gather).

    Returns (with ``prefix``):
        ``logp_abs_diff_mean``, ``logp_abs_diff_max``: |log pi_old - log pi_rollout| over all
            tokens (TRL's ``sampling/sampling_logp_difference/{mean,max}``; TRL averages the
            processes' means, this is the mean over all tokens).
        ``kl``: mean of log pi_rollout - log pi_old (verl's ``rollout_corr/kl``).
        ``is_truncated_frac``: share of weights the bound changed -- tokens (token level) or
            responses (sequence level) -- verl's ``rollout_is_ratio_fraction_high`` when there
            is no lower bound.
        ``is_weight_mean``, ``is_weight_min``, ``is_weight_max``: the bounded weights over the
            same units (TRL's ``sampling/importance_sampling_ratio/*``).
    """
    _check_inputs(old_logp, rollout_logp, cu_seqlens, allow_empty=True)
    _check_config(level, threshold, mode, threshold_lower)
    diff = old_logp.detach().double() - rollout_logp.detach().double()
    stats = torch.zeros(_N_STATS, dtype=torch.float64)  # no tokens: neutral for sum and max
    stats[7] = math.inf  # ... and for the minimum
    if diff.numel():
        w, out = _bound(torch.exp(_raw_log_weights(old_logp, rollout_logp, cu_seqlens, level)),
                        threshold, mode, threshold_lower)
        w = w.double()
        stats = torch.tensor([diff.abs().sum(), diff.numel(), diff.abs().max(), -diff.sum(),
                              out.sum(), w.numel(), w.sum(), w.min(), w.max()],
                             dtype=torch.float64)
    rows = (gather or (lambda x: x))(stats).reshape(-1, _N_STATS)
    total = rows.sum(0)
    tokens, units = total[1].item(), total[5].item()
    m = {"logp_abs_diff_mean": total[0].item() / tokens if tokens else 0.0,
         "logp_abs_diff_max": rows[:, 2].max().item(),
         "kl": total[3].item() / tokens if tokens else 0.0,
         "is_truncated_frac": total[4].item() / units if units else 0.0,
         "is_weight_mean": total[6].item() / units if units else 0.0,
         "is_weight_min": rows[:, 7].min().item() if units else 0.0,
         "is_weight_max": rows[:, 8].max().item() if units else 0.0}
    return {prefix + k: v for k, v in m.items()}
