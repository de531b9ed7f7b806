"""Guards against a poisoned run: non-finite updates are skipped, a destroyed policy stops the
run, and nothing non-finite is ever checkpointed (docs/failure_behaviour.md).

Every decision is taken from values reduced over all ranks, so all ranks skip, continue or stop
together and no rank is left waiting in a collective.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from icpo.errors import TrainingStopped
from icpo.trainer import distributed as dist


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    return dist.all_reduce_sum(torch.tensor([float(flag)])).item() > 0


def local_grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of the gradients held in ``module``'s parameters on this rank (0 when none)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.float()) for g in grads])).item()


def optimizer_step(actor, local_bad: bool) -> tuple[bool, float | None]:
    """Apply the accumulated gradients unless the update is non-finite. Returns ``(skipped,
    grad_norm)``, ``skipped`` alike on every rank; ``grad_norm`` is this rank's gradient norm
    before reduction when computed here, else None (DeepSpeed has the global one).

    A plain torch optimizer (ZeRO-0, fp32) has no check of its own: the step is skipped when
    ``local_bad`` (a non-finite loss) or the gradient norm is non-finite on any rank; gradients
    are dropped and DeepSpeed's ``step()`` is never called, so weights, optimizer moments and
    the lr schedule stay as they were (one NaN would otherwise reach every weight through the
    clip factor and Adam's moments). DeepSpeed's own wrappers (ZeRO-1/2/3, bf16, fp16) check
    the reduced gradient norm in ``step()`` and skip the same way (their ``overflow`` path, as
    for fp16 loss-scale overflows); ``skipped_steps`` tells."""
    if not hasattr(actor.optimizer, "overflow"):
        norm = local_grad_norm(actor.module)
        if any_rank(local_bad or not math.isfinite(norm)):
            actor.zero_grad()
            actor.skipped_steps += 1  # as DeepSpeed counts its own overflow skips
            return True, norm
        actor.step()
        return False, norm
    before = actor.skipped_steps
    actor.step()
    return actor.skipped_steps > before, None


def weights_finite(module: torch.nn.Module) -> bool:
    """True on every rank when all of the policy's weights are finite on all ranks (ZeRO-3:
    each rank checks its own partition)."""
    bad = False
    with torch.no_grad():
        for p in module.parameters():
            local = getattr(p, "ds_tensor", p)
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad = True
                break
    return not any_rank(bad)


class Guard:
    """Counts skipped optimizer steps and watches the policy; raises TrainingStopped when the
    run must end. Its state travels in checkpoints so a resumed run decides exactly alike."""

    def __init__(self, max_skipped_steps: int, collapse_entropy_frac: float, vocab_size: int):
        self.max_skipped = max_skipped_steps
        self.collapse_frac = collapse_entropy_frac
        self.log_vocab = math.log(vocab_size) if vocab_size > 1 else 0.0
        self.consecutive = 0
        self.total = 0
        self.armed = False  # set once entropy was seen below the collapse level

    def record(self, skipped: bool, step: int, may_stop: bool = True) -> None:
        """One optimizer step of rollout step ``step`` was skipped (or not). ``may_stop`` False
        (fp16): skips are how dynamic loss scaling finds its scale, so they are only counted;
        DeepSpeed stops itself at its minimum scale."""
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if may_stop and self.consecutive >= self.max_skipped:
            raise TrainingStopped(
                f"stopped at step {step}: {self.consecutive} consecutive optimizer steps had a "
                f"non-finite loss or gradient norm and were skipped (trainer.max_skipped_steps="
                f"{self.max_skipped}); lower actor.lr or set actor.grad_clip, and resume from the "
                "last checkpoint")

    def check_policy(self, step: int, entropy: float | None, module: torch.nn.Module) -> None:
        """After an update: stop when the weights are non-finite or the policy has become
        uniform (mean token entropy at ``collapse_entropy_frac * log V``). A model that starts
        out uniform (random weights) is not flagged: the sentinel arms once entropy is below."""
        if not weights_finite(module):
            raise TrainingStopped(
                f"stopped at step {step}: the policy's weights hold NaN or inf; nothing was "
                "checkpointed from them (lower actor.lr and resume from the last checkpoint)")
        if not self.collapse_frac or entropy is None or not self.log_vocab:
            return
        level = self.collapse_frac * self.log_vocab
        if entropy < level:
            self.armed = True
        elif self.armed:
            raise TrainingStopped(
                f"stopped at step {step}: the policy collapsed to uniform (mean token entropy "
                f"{entropy:.4f} >= {self.collapse_frac} * log(vocab size) = {level:.4f}; "
                "trainer.collapse_entropy_frac); lower actor.lr and resume from the last "
                "checkpoint")

    def check_checkpointable(self, step: int, module: torch.nn.Module,
                             probe_logits: torch.Tensor) -> None:
        """Before writing checkpoint ``step``: the weights, and the logits ``probe_logits``
        of a probe prompt under them, must be finite, and the probe's next-token distribution
        not uniform once the sentinel is armed. Finite weights can still overflow the forward
        pass or flatten the policy (``actor.lr=1e30``): such a state must not become ``latest``."""
        bad = not bool(torch.isfinite(probe_logits).all())
        uniform = False
        if not bad and self.armed and self.collapse_frac and self.log_vocab:
            logp = probe_logits.float().log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1).mean().item()
            uniform = entropy >= self.collapse_frac * self.log_vocab
        if not weights_finite(module) or any_rank(bad) or any_rank(uniform):
            raise TrainingStopped(
                f"stopped at step {step}: the policy's weights or outputs are "
                f"{'uniform' if uniform else 'NaN/inf'}, so this step was not checkpointed "
                "(earlier checkpoints are intact); lower actor.lr or set actor.grad_clip and "
                "resume from the last one")

    def metrics(self, skipped_now: int) -> dict[str, float]:
        return {"guard/skipped_steps": float(skipped_now), "guard/skipped_total": float(self.total)}

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total, "armed": self.armed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))
        self.armed = bool(state.get("armed", False))
