"""Dynamic sampling (DAPO): drop the groups whose metric has zero spread and keep generating
until the step has ``train_batch_size`` groups, with verl's ``algorithm.filter_groups``
semantics (the DAPO recipe's ``RayDAPOTrainer.fit``, verl-recipe ``dapo/dapo_ray_trainer.py``).

verl, per generation batch: every prompt's ``rollout.n`` responses form a group (one ``uid``);
a group is kept when ``np.std`` of its metric values is > 0, or when it has one response; the
kept responses are appended to the step's batch and ``num_gen_batches`` counts the generation
batches drawn. While fewer than ``train_batch_size`` groups are kept it draws another batch,
unless ``0 < max_num_gen_batches <= num_gen_batches``, which raises. Once enough are kept the
batch is cut to its first ``train_batch_size * n`` responses: the surplus dropped is the *last*
kept groups of the *last* batch drawn. Nothing is carried over to the next step.

The metric (``algorithm.filter_groups.metric``), in verl and here (:func:`filter_metric`):

- ``acc``: whether the answer is right. verl: the reward function's ``"acc"`` value as
  returned (its score when it returns a bare number); icpo: ``RewardBatch.acc``, which is
  ``acc != 0`` (``score > 0`` for a bare number). Same groups when acc is 0/1 or a bool.
- ``score``: the reward function's score (verl: ``reward_extra_info["score"]``, before the
  overlong penalty; icpo: ``RewardBatch.score``, before noise and the overlong penalty).
- ``seq_reward``: verl's sum of ``token_level_scores``, i.e. the score *with* the DAPO overlong
  penalty added; icpo: the per-response reward the advantages start from (score, + noise,
  + overlong penalty). It equals ``score`` when neither shaping is on.

verl's ``seq_final_reward`` (``token_level_rewards``: ``seq_reward`` minus a KL-in-reward
penalty, which icpo does not have) is not provided.

Zero spread is decided exactly: a group is dropped when all its values are equal. verl's
``np.std`` agrees except on rounding: three equal values of 0.1 have ``np.std`` 1.4e-17 > 0, so
verl keeps that group (it cannot learn from it: its advantages are all 0).

Several processes: each process generates a slice of the batch's prompts. Gather the metric of
every response of the batch (``icpo.trainer.distributed.all_gather_floats``, rank order = the
sampler's prompt order) and feed the same gathered tensor to :class:`GroupAccumulator` on
every rank: every decision here is a pure function of that tensor, so all ranks agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch

from icpo.config.schema import FilterMetric

FILTER_METRICS = get_args(FilterMetric)


class FilterGroupsLimitError(RuntimeError):
    """Raised when ``algorithm.filter_groups.max_num_gen_batches`` batches did not fill a step."""


def filter_metric(name: str, *, acc: torch.Tensor, score: torch.Tensor,
                  seq_reward: torch.Tensor) -> torch.Tensor:
    """The per-response metric named ``algorithm.filter_groups.metric`` (see the module doc)."""
    table = {"acc": acc, "score": score, "seq_reward": seq_reward}
    if name not in table:
        raise ValueError(f"algorithm.filter_groups.metric must be one of {FILTER_METRICS}, "
                         f"got {name!r}")
    return table[name]


def _check_metric(metric: torch.Tensor, n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (responses per prompt) must be an int >= 1, got {n!r}")
    if not isinstance(metric, torch.Tensor) or metric.dim() != 1 or metric.numel() == 0:
        raise ValueError("metric must be a non-empty 1-D tensor [B] (one value per response)")
    if metric.numel() % n:
        raise ValueError(f"metric has {metric.numel()} responses, not a multiple of n={n}")
    if metric.is_floating_point() and not bool(torch.isfinite(metric).all()):
        raise ValueError("metric has non-finite values (NaN or inf): the filter_groups metric "
                         "must be a finite number for every response")


def keep_groups(metric: torch.Tensor, n: int) -> torch.Tensor:
    """bool ``[B / n]``: True for the groups filter_groups keeps.

    Args:
        metric: ``[B]`` per-response metric (float, int or bool), groups of ``n`` consecutive
            responses (the rollout engines' order).
        n: responses per prompt. With n = 1 every group is kept, as in verl (a group of one has
            zero spread but verl keeps it explicitly), so filtering does nothing.

    A group is kept when its values are not all equal (nonzero spread).
    """
    _check_metric(metric, n)
    grouped = metric.reshape(-1, n)
    if n == 1:
        return torch.ones(grouped.shape[0], dtype=torch.bool, device=metric.device)
    return (grouped != grouped[:, :1]).any(dim=1)


@dataclass(frozen=True)
class FilterStats:
    """What one step's dynamic sampling drew and kept (over all processes)."""

    num_gen_batches: int
    """Generation batches drawn (verl's ``train/num_gen_batches``)."""
    groups_generated: int
    """Groups (= prompts) generated over those batches."""
    groups_kept: int
    """Groups with nonzero spread, before the surplus is dropped."""
    groups_trained: int
    """Groups in the trained batch: ``train_batch_size`` once full."""

    def metrics(self, prefix: str = "filter_groups/") -> dict[str, float]:
        return {f"{prefix}num_gen_batches": float(self.num_gen_batches),
                f"{prefix}groups_generated": float(self.groups_generated),
                f"{prefix}groups_kept": float(self.groups_kept),
                f"{prefix}groups_trained": float(self.groups_trained),
                f"{prefix}kept_frac": self.groups_kept / max(1, self.groups_generated)}


class GroupAccumulator:
    """Collects kept groups over generation batches until a step is full (verl's loop).

    Usage, per training step::

        acc = GroupAccumulator(cfg.trainer.train_batch_size, cfg.rollout.n,
                               cfg.algorithm.filter_groups.max_num_gen_batches)
        while not acc.full:
            ...generate a batch, score it, gather its metric over ranks...
            acc.add(gathered_metric)          # raises FilterGroupsLimitError at the limit
        for batch_index, group_index in acc.selection(): ...

    Args:
        train_batch_size: groups (prompts) to train on per step.
        n: responses per prompt.
        max_num_gen_batches: most generation batches per step; 0 (or negative, as in verl)
            = no limit.
    """

    def __init__(self, train_batch_size: int, n: int, max_num_gen_batches: int = 0) -> None:
        for name, v in (("train_batch_size", train_batch_size), ("n", n)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(max_num_gen_batches, int) or isinstance(max_num_gen_batches, bool):
            raise ValueError("algorithm.filter_groups.max_num_gen_batches must be an int "
                             f"(0 = no limit), got {max_num_gen_batches!r}")
        self.train_batch_size, self.n = train_batch_size, n
        self.max_num_gen_batches = max_num_gen_batches
        self._kept: list[list[int]] = []  # per batch drawn: indices of its kept groups, in order
        self._generated = 0

    @property
    def num_gen_batches(self) -> int:
        return len(self._kept)

    @property
    def num_kept(self) -> int:
        return sum(map(len, self._kept))

    @property
    def full(self) -> bool:
        return self.num_kept >= self.train_batch_size

    def add(self, metric: torch.Tensor) -> torch.Tensor:
        """Record one generation batch's gathered metric ``[B]`` (all processes' responses in
        the sampler's prompt order); returns its keep mask ``[B / n]``.

        Raises FilterGroupsLimitError when this batch was the ``max_num_gen_batches``-th and
        the step is still not full; RuntimeError when called on a full accumulator.
        """
        if self.full:
            raise RuntimeError("GroupAccumulator.add: the step is already full; call reset() "
                               "or start a new accumulator for the next step")
        keep = keep_groups(metric, self.n)
        self._kept.append(torch.nonzero(keep).flatten().tolist())
        self._generated += keep.numel()
        limit = self.max_num_gen_batches
        if not self.full and 0 < limit <= self.num_gen_batches:
            raise FilterGroupsLimitError(
                f"dynamic sampling drew {self.num_gen_batches} generation batches "
                f"(algorithm.filter_groups.max_num_gen_batches={limit}) and kept only "
                f"{self.num_kept} of the {self.train_batch_size} groups a step needs "
                f"({self._generated} generated): most groups' rewards all agree; use easier "
                "data, a larger rollout.n, or raise max_num_gen_batches (0 = no limit)")
        return keep

    def selection(self) -> list[tuple[int, int]]:
        """``(batch index, group index within that batch)`` of the trained groups, in draw
        order: the first ``train_batch_size`` kept groups (verl's ``batch[:traj_bsz]``), or all
        kept so far when not full."""
        out = [(b, g) for b, kept in enumerate(self._kept) for g in kept]
        return out[:self.train_batch_size]

    def local_selection(self, rank: int, groups_per_rank: int) -> list[tuple[int, int]]:
        """The part of :meth:`selection` this process generated, when every process generates
        ``groups_per_rank`` consecutive groups of each batch: ``(batch index, local group
        index)``. Ranks may get different counts (verl rebalances afterwards)."""
        lo, hi = rank * groups_per_rank, (rank + 1) * groups_per_rank
        return [(b, g - lo) for b, g in self.selection() if lo <= g < hi]

    def stats(self) -> FilterStats:
        return FilterStats(self.num_gen_batches, self._generated, self.num_kept,
                           min(self.num_kept, self.train_batch_size))

    def reset(self) -> None:
        self._kept, self._generated = [], 0
