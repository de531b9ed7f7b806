"""Confidence and advantages for GRPO and ICPO (algorithm.md steps 3-7) on top of :mod:`icpo.ops`.

Responses are grouped per prompt: by default consecutive blocks of ``group_size`` (the rollout
engines return the n samples of a prompt consecutively); ragged groups (e.g. after dropping
some prompts) go through ``group_offsets`` instead.
"""

from __future__ import annotations

from typing import Any, Callable, get_args

import torch

from icpo import ops
from icpo.algorithms.losses import (
    _check_tokens,
    broadcast_to_tokens,
    check_packed,
    seq_ids_from_cu_seqlens,
)
from icpo.config.schema import Algorithm, Confidence, GroupOfOne, StdScope
from icpo.ops import ICPOAdvantages

ALGORITHMS = get_args(Algorithm)
CONFIDENCE_KINDS = get_args(Confidence)
STD_SCOPES = get_args(StdScope)
GROUP_OF_ONE = get_args(GroupOfOne)


@torch.no_grad()
def confidence_from_logprobs(logp: torch.Tensor, cu_seqlens: torch.Tensor,
                             kind: str = "mean_logprob") -> torch.Tensor:
    """Length-normalized confidence of each response (step 3, Eq. 6-7), fp32 ``[B]``, <= 0.

    Args:
        logp: float ``[T]`` packed log-probs of the sampled response tokens under the policy
            that sampled them (at the sampling temperature).
        cu_seqlens: int32/int64 ``[B+1]`` response boundaries.
        kind: ``mean_logprob`` (default; the paper's printed numbers) = mean of logp;
            ``log_mean_prob`` (Eq. 7 as printed) = log of the mean token probability,
            computed as ``m + log(mean(exp(logp - m)))`` with m the response's max log-prob.

    No gradient flows through the result: it is a reward input.
    """
    _check_tokens(logp=logp)
    check_packed(cu_seqlens, logp.numel())
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence kind must be one of {CONFIDENCE_KINDS}, got {kind!r}")
    logp = logp.detach().float()
    if kind == "mean_logprob":
        return ops.segment_mean(logp, cu_seqlens)
    seq_ids = seq_ids_from_cu_seqlens(cu_seqlens).to(logp.device)
    num_seqs = cu_seqlens.numel() - 1
    seq_max = torch.full((num_seqs,), float("-inf"), device=logp.device)
    seq_max = seq_max.scatter_reduce(0, seq_ids, logp, reduce="amax")
    shifted = torch.exp(logp - seq_max[seq_ids])
    # Each mean includes its own max term exp(0) = 1, so it is >= 1/L: the log is finite.
    return (seq_max + torch.log(ops.segment_mean(shifted, cu_seqlens))).clamp(max=0.0)


def compute_advantages(confidence: torch.Tensor | None, rewards: torch.Tensor,
                       group_size: int | None, algo_cfg: Any, omega: float, *,
                       group_offsets: torch.Tensor | None = None,
                       gather: Callable[[torch.Tensor], torch.Tensor] | None = None
                       ) -> ICPOAdvantages:
    """Scores, final rewards and advantages of N responses, each ``[N]`` (an ``ICPOAdvantages``).

    Args:
        confidence: float ``[N]`` (<= 0), from :func:`confidence_from_logprobs`; may be None
            for GRPO.
        rewards: float ``[N]`` verifiable rewards R_verif.
        group_size: G, responses per prompt in consecutive blocks (None with group_offsets).
        algo_cfg: has ``name`` ("icpo" | "grpo"), ``delta`` (resolved to a float, see
            :func:`icpo.algorithms.default_delta`), ``tau``, ``scale_advantages``,
            ``unbiased_std``, ``eps`` and optionally ``std_scope`` ("group" | "batch") and
            ``group_of_one`` ("zero" | "reward") (e.g. ``icpo.config.AlgorithmConfig``).
        omega: weight of the preference score at this step (:func:`icpo.algorithms.omega_at`).
        group_offsets: int ``[num_groups+1]`` ragged group boundaries instead of group_size.
        gather: for ``std_scope="batch"``, maps this process's ``[N]`` to the whole batch's
            (all processes; e.g. ``icpo.trainer.distributed.all_gather_floats``); None = the
            local batch is the whole batch.

    ICPO: ``icpo.ops.icpo_advantages`` (Eq. 9, 11, 5). GRPO: ``icpo.ops.grpo_advantages``
    with scores all 0 and rewards unchanged. With omega = 0 ICPO gives GRPO's advantages.

    ``std_scope="batch"`` (TRL's ``scale_rewards="batch"``): centred per group, divided by the
    std of all the batch's final rewards + eps. ``group_of_one="reward"`` (verl): a group of one
    response gets ``R_final / (1 + eps)`` (``R_final`` unscaled) instead of 0.
    """
    name = algo_cfg.name
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm name must be one of {ALGORITHMS}, got {name!r}")
    scope = getattr(algo_cfg, "std_scope", "group")
    singleton = getattr(algo_cfg, "group_of_one", "zero")
    if scope not in STD_SCOPES:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {scope!r}")
    if singleton not in GROUP_OF_ONE:
        raise ValueError(f"group_of_one must be one of {GROUP_OF_ONE}, got {singleton!r}")
    scale, unbiased, eps = (bool(algo_cfg.scale_advantages), bool(algo_cfg.unbiased_std),
                            float(algo_cfg.eps))
    # Batch scope: the kernels only centre; the batch std divides below.
    norm = dict(scale=scale and scope == "group", unbiased=unbiased, eps=eps)
    if name == "grpo":
        scores, final = torch.zeros_like(rewards), rewards
        adv = ops.grpo_advantages(rewards, group_size, group_offsets=group_offsets, **norm)
    else:
        if confidence is None:
            raise ValueError("confidence is required for algorithm 'icpo'")
        if algo_cfg.delta is None:
            raise ValueError("algorithm delta is None: resolve it first, e.g. "
                             "default_delta(num_params) from icpo.algorithms")
        scores, final, adv = ops.icpo_advantages(
            confidence, rewards, group_size, group_offsets=group_offsets,
            delta=float(algo_cfg.delta), tau=float(algo_cfg.tau), omega=float(omega), **norm)
    if scale and scope == "batch":
        everything = (gather or (lambda x: x))(final.detach())
        std = everything.std(correction=1 if unbiased else 0) if everything.numel() > 1 else 0.0
        adv = adv / (torch.as_tensor(std, dtype=adv.dtype) + eps)
    if singleton == "reward":
        sizes = (torch.full_like(rewards, float(group_size)) if group_offsets is None else
                 broadcast_to_tokens(group_offsets.diff().to(rewards), group_offsets))
        alone = final / (1.0 + eps) if scale else final
        adv = torch.where(sizes == 1, alone.to(adv.dtype), adv)
    return ICPOAdvantages(scores, final, adv)
