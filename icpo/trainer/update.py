"""The policy update of one step: ``ppo_epochs`` passes over mini-batches of prompts, each one
DeepSpeed optimizer step over token-budget micro-batches.

The scoring pass hands the update one :class:`ScoredRollout`. :class:`PolicyUpdate` holds the
wiring (models, guard, ranks), runs the update on it (:meth:`Trainer._update
<icpo.trainer.trainer.Trainer._update>` calls it once per step), and decides beforehand whether
the scoring pass may run the update's forward for it (:meth:`PolicyUpdate.scoring_plan`), since
what makes that forward reusable is how the update batches. Every rank takes as many optimizer
steps and, under ZeRO-2/3, as many backward passes as every other, since each of them is a
collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from icpo.algorithms import grpo_loss
from icpo.config import Config
from icpo.rollout import RolloutBatch
from icpo.trainer import distributed as dist
from icpo.trainer.batching import micro_batches, segment_positions
from icpo.trainer.guard import Guard, optimizer_step
from icpo.trainer.scoring import filler_batch, response_logprobs

if TYPE_CHECKING:
    from icpo.trainer.setup import TrainingModels


@dataclass
class ScoredRollout:
    """One step's samples on this rank and what the update needs of them. Tensors are on the
    CPU and packed: the response tokens of all samples in sample order, ``resp_cu`` bounding
    each response's."""

    samples: RolloutBatch
    """The step's samples (groups of ``rollout.n`` consecutive)."""
    old_logp: torch.Tensor
    """fp32 ``[T]``: log-probs under the policy that sampled them (the PPO ratio's old side)."""
    ref_logp: torch.Tensor | None
    """fp32 ``[T]`` under the reference model, or None without a KL term."""
    advantages: torch.Tensor
    """fp32 ``[T]``: each response's advantage on each of its tokens."""
    resp_cu: torch.Tensor
    """int64 ``[B+1]``: response boundaries in the packed tensors."""
    forward: tuple[torch.Tensor, torch.Tensor | None] | None = None
    """``(log-prob, entropy)`` ``[T]`` with grad, on the training device, when the scoring pass
    ran the update's only forward (:meth:`PolicyUpdate.scoring_plan`); else None."""
    rollout_is_weights: torch.Tensor | None = None
    """fp32 ``[T]`` rollout-correction weights on the policy-gradient term
    (``algorithm.rollout_correction``), or None."""
    token_weights: torch.Tensor | None = None
    """fp32 ``[T]`` loss weight of each token (0 on responses ``actor.mask_truncated`` masks),
    or None (all 1)."""


class PolicyUpdate:
    """PPO updates of the actor. ``mini_prompts``: prompts per mini-batch on this rank;
    ``lockstep``: ranks run forwards in step (ZeRO-3 across processes)."""

    def __init__(self, cfg: Config, models: TrainingModels, guard: Guard, device: torch.device,
                 pad_token_id: int, *, world: int, mini_prompts: int, lockstep: bool):
        self.cfg, self.models, self.guard, self.device = cfg, models, guard, device
        self.pad_token_id, self.world = pad_token_id, world
        self.mini_prompts, self.lockstep = mini_prompts, lockstep

    def scoring_plan(self, num_samples: int, num_micro_batches: int) -> tuple[bool, int | None]:
        """``(reuse, lockstep_batches)`` for a scoring pass over ``num_micro_batches``.

        ``reuse``: the update would run exactly the scoring forward again (one epoch, so still
        on-policy; one mini-batch; one micro-batch), so scoring should run it once, with grad,
        and hand it over as :attr:`ScoredRollout.forward`. In lockstep every rank must decide
        alike, and ``lockstep_batches`` is the most micro-batches any rank scores (else None).
        """
        reuse = (self.cfg.actor.ppo_epochs == 1 and num_micro_batches == 1
                 and num_samples // self.cfg.rollout.n <= self.mini_prompts)
        if not self.lockstep:
            return reuse, None
        counts = dist.all_gather_floats(torch.tensor([float(num_micro_batches), float(reuse)]))
        return bool(counts[1::2].min()), int(counts[0::2].max())

    def __call__(self, scored: ScoredRollout, step: int, seed: int) -> dict:
        """``ppo_epochs`` passes over mini-batches of prompts, shuffled by ``seed``; each a
        DeepSpeed step. The reused forward (``scored.forward``) serves the first mini-batch,
        which then holds every sample (see :meth:`scoring_plan`)."""
        cfg, n = self.cfg, self.cfg.rollout.n
        num_groups = len(scored.samples) // n
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        # Every rank must take as many optimizer steps (each reduces gradients over ranks), but
        # drop_mixed_groups leaves ranks with different numbers of groups: the short ones take
        # steps on empty mini-batches (zero gradient).
        local_steps = -(-num_groups // self.mini_prompts)
        per_epoch = max(1, int(dist.all_gather_floats(torch.tensor([float(local_steps)])).max()))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(cfg.actor.ppo_epochs):
            order = torch.randperm(num_groups, generator=gen).tolist()
            for start in range(0, per_epoch * self.mini_prompts, self.mini_prompts):
                groups = order[start:start + self.mini_prompts]
                idx = [g * n + j for g in groups for j in range(n)]
                stats = self._mini_batch_step(scored, idx, step, reuse=start == 0)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        # Skipped optimizer steps are counted, everything else averaged over the mini-batches.
        return {k: v if k.startswith("guard/") else v / counts[k] for k, v in sums.items()}

    def _mini_batch_step(self, scored: ScoredRollout, idx: list[int], step: int,
                         reuse: bool) -> dict:
        cfg, actor, ro = self.cfg, self.models.actor, scored.samples
        cu, offsets = scored.resp_cu, scored.resp_cu.tolist()
        forward = scored.forward if reuse else None
        if scored.token_weights is None:
            tokens = sum(offsets[i + 1] - offsets[i] for i in idx)
        else:  # token-mean's N counts the weighted tokens, clamped >= 1 as TRL clamps it
            tokens = float(scored.token_weights[segment_positions(cu, idx)].double().sum())
        total_tokens, total_seqs = dist.all_reduce_sum(torch.tensor([tokens, len(idx)])).tolist()
        if scored.token_weights is not None:
            total_tokens = max(total_tokens, 1.0)
        global_tokens, global_seqs = total_tokens / self.world, total_seqs / self.world
        sums: dict[str, float] = {}
        batches = micro_batches(ro.prompt_ids, ro.response_ids, idx,
                                cfg.actor.max_tokens_per_micro_batch)
        padding, bad_loss = 0, False
        if actor.zero_optimization_partition_gradients():
            # ZeRO-2/3 reduce gradients inside every backward, so every rank must run as many
            # backward passes; token-budget packing gives ranks different micro-batch counts.
            most = int(dist.all_gather_floats(torch.tensor([float(len(batches))])).max())
            padding = most - len(batches)
        with_entropy = cfg.actor.entropy_coef > 0
        for mb in batches:
            sel = segment_positions(cu, mb.idx)  # this micro-batch's tokens in the step's order
            mb = mb.to(self.device)
            if forward is not None:  # this batch's forward already ran, with grad, in scoring
                logp = forward[0][sel.to(self.device)]
                ent = forward[1][sel.to(self.device)] if with_entropy else None
            else:
                _begin_micro_batch(actor)
                logp, ent = response_logprobs(actor.module, mb, cfg.rollout.temperature,
                                              with_entropy=with_entropy, lockstep=self.lockstep,
                                              fused_linear=cfg.actor.fused_linear)
            old, ref, adv, is_w, tok_w = (
                None if t is None else t[sel].to(self.device)
                for t in (scored.old_logp, scored.ref_logp, scored.advantages,
                          scored.rollout_is_weights, scored.token_weights))
            loss, m = grpo_loss(logp, old, ref, ent, adv, mb.resp_cu_seqlens, cfg.actor,
                                cfg.rollout.max_response_length, global_tokens=global_tokens,
                                global_seqs=global_seqs, num_micro_batches=len(batches),
                                rollout_is_weights=is_w, token_weights=tok_w)
            bad_loss = bad_loss or not bool(torch.isfinite(loss.detach()))
            actor.backward(loss, scale_wrt_gas=False)
            # "_loss" metrics are shares that sum to the mini-batch value; the rest are token
            # means of this micro-batch, weighted here by its token count.
            w = m.pop("num_tokens")
            m.pop("num_seqs", None)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if k.endswith("_loss") else w)
            sums["_tokens"] = sums.get("_tokens", 0.0) + w
        for _ in range(padding):
            self._zero_backward()
        tokens = sums.pop("_tokens", 0.0)
        sums = {f"actor/{k}": (v if k.endswith("_loss") else v / tokens) for k, v in sums.items()}
        skipped, grad_norm = optimizer_step(actor, bad_loss)
        self.guard.record(skipped, step + 1, may_stop=not actor.fp16_enabled())
        sums["guard/skipped_steps"] = float(skipped)
        if grad_norm is None:
            gn = actor.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
        sums["actor/grad_norm"] = grad_norm
        sums["actor/lr"] = self.models.optimizer.param_groups[0]["lr"]
        return sums

    def _zero_backward(self) -> None:
        """A backward pass through the whole model that adds nothing to any gradient."""
        mb = filler_batch(self.device, self.pad_token_id)
        _begin_micro_batch(self.models.actor)
        logp, _ = response_logprobs(self.models.actor.module, mb, self.cfg.rollout.temperature,
                                    with_entropy=False, lockstep=self.lockstep,
                                    fused_linear=self.cfg.actor.fused_linear)
        self.models.actor.backward(logp.sum() * 0.0, scale_wrt_gas=False)


def _begin_micro_batch(actor) -> None:
    """Before a forward that will be backpropagated, what DeepSpeed's ``engine.forward`` does
    first and calling ``actor.module`` (as scoring does) skips: ZeRO-3 counts a step's backward
    passes there, and its first backward writes the gradient partitions where later ones add
    to them, so without this each backward replaced the last one's gradient (ZeRO-1/2 reset
    hook counters there). The scoring forward the update reuses is a step's first: no call."""
    reset = getattr(actor.optimizer, "clear_backward_seen_flag", None)
    if reset is not None:
        reset()
