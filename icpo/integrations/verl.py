"""ICPO's advantage as a verl advantage estimator (docs/compat.md, "verl users").

verl's estimator registry (``verl.trainer.ppo.core_algos.register_adv_est``) calls an estimator
with ``token_level_rewards``, ``response_mask``, ``index`` (the prompt uid) and ``config``; ICPO
also needs the sampling policy's log-probs, which verl's ``compute_advantage`` passes only to
its optimal-token-baseline estimators. :func:`register_icpo_estimator` registers ``"icpo"``; the
two-line patch in docs/compat.md makes ``compute_advantage`` pass ``old_log_probs`` to it.

:func:`icpo_outcome_advantage` itself needs only torch (and numpy for the uids): it follows
verl's GRPO conventions (unbiased std, eps 1e-6, a group of one keeps R / (1 + eps),
``norm_adv_by_std_in_grpo``), groups responses by uid wherever they sit in the batch (verl's
``balance_batch`` reorders them), and with omega = 0 equals verl's
``compute_grpo_outcome_advantage``. Tested against verl 0.9.1's own functions and ``DataProto``
(tests/test_verl_integration.py; CI installs verl without its dependencies to run it).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import torch

from icpo import ops
from icpo.algorithms import compute_advantages


def icpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                           index: Any, old_log_probs: torch.Tensor, *, delta: float,
                           tau: float = 2.0, omega: float = 1.0,
                           norm_adv_by_std_in_grpo: bool = True, epsilon: float = 1e-6
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """ICPO advantages on verl's padded layout: ``(advantages, returns)``, both ``[B, L]``.

    Args:
        token_level_rewards: ``[B, L]``; a response's reward is its row sum (as verl's GRPO).
        response_mask: ``[B, L]`` 0/1, the response tokens.
        index: ``[B]`` prompt uids (verl's ``non_tensor_batch["uid"]``); equal uid = one group.
        old_log_probs: ``[B, L]`` log-probs of the response tokens under the sampling policy.
        delta, tau, omega: ICPO's Eq. 9 / Eq. 11 parameters at this step.
    """
    mask = response_mask.bool()
    B = mask.size(0)
    if len(index) != B:
        raise ValueError(f"index has {len(index)} uids for {B} responses")
    rewards = (token_level_rewards * response_mask).sum(-1).float()
    lengths = mask.sum(-1)
    confidence = torch.zeros(B, dtype=torch.float32, device=mask.device)
    keep = lengths > 0  # no response token: no confidence, so no exploration bonus (c = 0)
    if keep.any():
        cu = torch.zeros(int(keep.sum()) + 1, dtype=torch.int64, device=mask.device)
        cu[1:] = lengths[keep].cumsum(0)
        packed = old_log_probs[keep][mask[keep]].float()
        confidence[keep] = ops.segment_mean(packed, cu).clamp(max=0.0)
    # Groups in order of first appearance, made contiguous for the kernels and put back after.
    first: dict[Any, int] = {}
    group = torch.tensor([first.setdefault(u, len(first)) for u in index], dtype=torch.int64)
    order = torch.argsort(group, stable=True)
    offsets = torch.zeros(len(first) + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(group, minlength=len(first)).cumsum(0)
    cfg = SimpleNamespace(name="icpo", delta=float(delta), tau=float(tau),
                          scale_advantages=bool(norm_adv_by_std_in_grpo), unbiased_std=True,
                          eps=float(epsilon), std_scope="group", group_of_one="reward")
    out = compute_advantages(confidence[order.to(mask.device)].cpu(), rewards[order].cpu(), None,
                             cfg, float(omega), group_offsets=offsets)
    adv = torch.empty(B, dtype=torch.float32)
    adv[order] = out.advantages.float()
    adv = adv.to(token_level_rewards.device).unsqueeze(-1) * response_mask
    return adv, adv


def register_icpo_estimator(*, delta: float, tau: float = 2.0,
                            omega: float | Callable[[int], float] = 1.0, start_step: int = 0,
                            name: str = "icpo") -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Register ICPO in verl's advantage-estimator registry as ``name`` (then set
    ``algorithm.adv_estimator=icpo``). ``omega`` is a constant or a function of the step: verl
    calls the estimator once per training step, counted here from ``start_step`` (pass the
    resumed step when resuming). Needs verl's ``compute_advantage`` to pass ``old_log_probs``
    (docs/compat.md shows the two-line patch). Returns the registered function."""
    from verl.trainer.ppo.core_algos import register_adv_est

    state = {"step": int(start_step)}

    def icpo_estimator(token_level_rewards, response_mask, index=None, config=None,
                       old_log_probs=None, **_):
        if old_log_probs is None or index is None:
            raise ValueError("the icpo estimator needs old_log_probs and index (uid) from verl's "
                             "compute_advantage: apply the patch in icpo's docs/compat.md")
        w = omega(state["step"]) if callable(omega) else float(omega)
        state["step"] += 1
        norm = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
        return icpo_outcome_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                      delta=delta, tau=tau, omega=w, norm_adv_by_std_in_grpo=norm)

    register_adv_est(name)(icpo_estimator)
    return icpo_estimator


__all__ = ["icpo_outcome_advantage", "register_icpo_estimator"]
