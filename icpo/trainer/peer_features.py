"""The step's phases for the peers' GRPO features (issue 19; docs/compat.md, "Dynamic sampling,
overlong shaping, rollout correction"): the arithmetic is in :mod:`icpo.algorithms`
(``dynamic_sampling``, ``overlong``, ``rollout_correction``), this module wires it into
:meth:`Trainer.train_step <icpo.trainer.trainer.Trainer.train_step>`.

- :func:`draw_rollouts`: the step's samples. One generation batch, or with
  ``algorithm.filter_groups`` (dynamic sampling) as many as it takes to keep
  ``train_batch_size`` groups whose metric has nonzero spread; each batch draws its prompts
  from the sampler (so its resumable state covers them) and its own seeds. The keep/draw
  decision is a function of the metric gathered over all ranks, the same on each.
- :func:`overlong_penalty_of`: ``reward.overlong_buffer``'s penalty, added after the noise.
- :func:`loss_weights`: ``actor.mask_truncated``'s per-token weights and the rollout-correction
  weights of a scored rollout, with the mismatch metrics (logged whenever the engine gives
  sampling log-probs).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import torch

from icpo.algorithms.dynamic_sampling import FilterGroupsLimitError, GroupAccumulator, filter_metric
from icpo.algorithms.overlong import loss_token_weights, overlong_penalty, truncated_mask
from icpo.algorithms.rollout_correction import rollout_is_weights, rollout_mismatch_metrics
from icpo.config import Config
from icpo.errors import UserError
from icpo.rollout import RolloutBatch
from icpo.trainer import distributed as dist

if TYPE_CHECKING:
    from icpo.trainer.trainer import Trainer
    from icpo.trainer.update import ScoredRollout


class Rewarded(NamedTuple):
    """One generation batch's rewards on this rank (``Trainer._rewards``)."""

    rewards: torch.Tensor
    """fp32 ``[B]``: what the advantages start from (score, + noise, + overlong penalty)."""
    acc: torch.Tensor
    """fp32 ``[B]``: 1 where the answer is right."""
    score: torch.Tensor
    """fp32 ``[B]``: the reward function's score, before noise and penalty."""
    counts: dict[str, tuple[float, float]]
    """metric name -> ``(count, out of)`` on this rank: fractions over all ranks and batches."""


def overlong_penalty_of(cfg: Config, ro: RolloutBatch) -> tuple[torch.Tensor, int]:
    """``reward.overlong_buffer``'s penalty of each response (fp32 ``[B]``, <= 0) and how many
    got one; response length counts the EOS (verl's and TRL's rule)."""
    ob = cfg.reward.overlong_buffer
    lengths = [len(r) for r in ro.response_ids]
    out = overlong_penalty(lengths, cfg.rollout.max_response_length, ob.len, ob.penalty_factor)
    return out.penalty, out.num_penalized


def draw_rollouts(trainer: Trainer, step: int, t: dict[str, float]
                  ) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor, dict[str, float]]:
    """This rank's samples of the step, their rewards and accuracies, and the metrics of what
    was generated: ``(samples, rewards, acc, metrics)``; adds ``time/generation`` and
    ``time/reward`` to ``t``."""
    cfg, n = trainer.cfg, trainer.cfg.rollout.n
    fg = cfg.algorithm.filter_groups
    groups = (GroupAccumulator(cfg.trainer.train_batch_size, n, fg.max_num_gen_batches)
              if fg.enable else None)
    drawn: list[tuple[RolloutBatch, Rewarded]] = []
    t["time/generation"] = t["time/reward"] = 0.0
    while True:
        t0 = time.perf_counter()
        ro = trainer._generate(step, len(drawn))
        t1 = time.perf_counter()
        got = trainer._rewards(ro, step, len(drawn))
        drawn.append((ro, got))
        if groups is not None:
            metric = filter_metric(fg.metric, acc=got.acc, score=got.score,
                                   seq_reward=got.rewards)
            try:
                groups.add(dist.all_gather_floats(metric))  # every rank decides alike
            except FilterGroupsLimitError as e:
                raise UserError(f"algorithm.filter_groups: {e}") from None
        t["time/generation"] += t1 - t0
        t["time/reward"] += time.perf_counter() - t1
        if groups is None or groups.full:
            break
    t1 = time.perf_counter()
    ro = RolloutBatch.concat([d[0] for d in drawn])
    rewards = torch.cat([d[1].rewards for d in drawn])
    acc = torch.cat([d[1].acc for d in drawn])
    metrics = _fractions([d[1].counts for d in drawn])
    metrics.update(trainer._rollout_metrics(ro, rewards, acc))  # over everything generated
    if groups is not None:
        offsets = [0]
        for d in drawn:
            offsets.append(offsets[-1] + len(d[0]))
        rows = [offsets[b] + g * n + j
                for b, g in groups.local_selection(trainer.rank, trainer.local_prompts)
                for j in range(n)]
        ro, rewards, acc = ro.select(rows), rewards[rows], acc[rows]
        metrics.update(groups.stats().metrics())
        # what the update sees: 0 unless the rewards agree where the filter metric does not
        trained = dist.all_gather_floats(rewards).view(-1, n)
        metrics["filter_groups/zero_std_group_frac"] = (
            (trained == trained[:, :1]).all(dim=1).double().mean().item() if n > 1 else 1.0)
    if cfg.reward.drop_mixed_groups:
        ro, rewards, acc, kept = trainer._keep_groups(ro, rewards, acc)
        metrics["drop_mixed_groups/kept_group_frac"] = kept
    t["time/reward"] += time.perf_counter() - t1
    return ro, rewards, acc, metrics


def _fractions(counts: list[dict[str, tuple[float, float]]]) -> dict[str, float]:
    """``count / out of`` of each name, summed over batches and ranks (float64, one reduce)."""
    names = sorted({k for c in counts for k in c})
    if not names:
        return {}
    local = torch.tensor([[sum(c[k][i] for c in counts if k in c) for i in (0, 1)]
                          for k in names], dtype=torch.float64).flatten()
    total = dist.all_reduce_sum(local).view(-1, 2)
    return {k: (total[i, 0] / total[i, 1]).item() for i, k in enumerate(names)}


def loss_weights(cfg: Config, scored: ScoredRollout) -> dict[str, float]:
    """Set ``scored.token_weights`` (``actor.mask_truncated``) and ``scored.rollout_is_weights``
    (``algorithm.rollout_correction.rollout_is``) and return their metrics: the share of
    responses masked, and the rollout/trainer mismatch whenever the engine gave sampling
    log-probs (``rollout_corr/*``, also without ``rollout_is``). Every rank calls it."""
    ro, cu, metrics = scored.samples, scored.resp_cu, {}
    if cfg.actor.mask_truncated:
        mask = truncated_mask(ro.finish_reasons)
        scored.token_weights = loss_token_weights(mask.truncated, cu)
        count = dist.all_reduce_sum(torch.tensor([float(mask.num_truncated), float(len(ro))]))
        metrics["actor/masked_truncated_frac"] = (count[0] / count[1].clamp(min=1)).item()
    rc = cfg.algorithm.rollout_correction
    if ro.rollout_logprobs is None:
        if rc.rollout_is is not None:
            raise UserError("algorithm.rollout_correction.rollout_is needs the rollout engine's "
                            "sampling log-probs, and this engine gave none (the HF engine's "
                            "model.generate path, for models with sliding-window or hybrid "
                            "attention, has none): use rollout.engine=vllm or rollout_is=null")
        return metrics
    rollout_logp = torch.tensor([x for lp in ro.rollout_logprobs for x in lp],
                                dtype=torch.float32)
    bounds = dict(threshold=rc.rollout_is_threshold, mode=rc.rollout_is_mode,
                  threshold_lower=rc.rollout_is_threshold_lower)
    metrics.update(rollout_mismatch_metrics(scored.old_logp, rollout_logp, cu,
                                            rc.rollout_is or "token", **bounds,
                                            gather=dist.all_gather_floats))
    if rc.rollout_is is not None:
        scored.rollout_is_weights = (
            rollout_is_weights(scored.old_logp, rollout_logp, cu, rc.rollout_is, **bounds)
            if len(ro) else torch.zeros(0))
    return metrics
