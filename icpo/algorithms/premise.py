"""Does ICPO's premise hold on this batch? Per-step diagnostics (logged under ``premise/``).

ICPO's preference score (Eq. 9) is largest for the responses the policy is least confident
of, and the fused reward (Eq. 11) adds ``omega * min(S, |R| / tau)``. That helps only if
(a) within a group the correct responses are often the LESS confident ones (correct-but-unsure
answers to encourage, confident errors to punish), and (b) the bonus is not flattened by its
cap ``|R| / tau``: a bonus at its cap is the same for every response of equal reward and
carries no ranking. These metrics measure both on the responses of one step.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def premise_metrics(confidence: torch.Tensor, correct: torch.Tensor, rewards: torch.Tensor,
                    scores: torch.Tensor, group_size: int, tau: float) -> dict[str, float]:
    """Premise diagnostics of N responses in consecutive groups of ``group_size``.

    Args:
        confidence: float ``[N]``, c_i (mean token log-prob, docs/algorithm.md step 3).
        correct: ``[N]`` bool or 0/1: the answer is correct (the reward's "acc").
        rewards: float ``[N]``, R as fed to the advantages (R_verif, plus noise if any).
        scores: float ``[N]``, the preference scores S (Eq. 9) at the run's delta, whatever
            omega is (for GRPO: the scores ICPO would compute).
        group_size: G; N must be a multiple of it.
        tau: the Eq. 11 clip (> 0).

    Returns (a key is left out, never NaN, when its set is empty):
        ``premise/correct_less_confident``: over every within-group pair (i correct, j wrong),
        the fraction with c_i < c_j strictly (ICPO's premise: high when correct answers are
        the unsure ones). ``premise/pairs``: how many such pairs (0 when none).
        ``premise/top_confident_correct``: over mixed groups, the fraction whose most
        confident response (first on ties) is correct.
        ``premise/bonus_at_cap``: over responses with R != 0, the fraction whose bonus
        ``omega * min(S, |R| / tau)`` is at its cap ``omega * |R| / tau``, i.e. S >= |R| / tau:
        where the clip decides the bonus, not the confidence. It does not depend on omega (at
        omega = 0 every bonus is 0; the metric still says where it would be capped), so it is
        comparable across schedules and for GRPO. ``premise/bonus_at_cap_correct``: the same
        over the correct responses with R != 0.
    """
    n = confidence.numel()
    if not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size: got {group_size!r}; expected an int >= 1 dividing N = {n}")
    for name, t in (("correct", correct), ("rewards", rewards), ("scores", scores)):
        if t.numel() != n:
            raise ValueError(f"{name}: got {t.numel()} values; expected N = {n} (confidence's)")
    if not tau > 0:
        raise ValueError(f"tau: got {tau!r}; expected > 0")
    c = confidence.detach().double().cpu().view(-1, group_size)
    ok = correct.detach().cpu().bool().view(-1, group_size)
    out: dict[str, float] = {}

    # pair[g, i, j]: i correct and j wrong within group g.
    pair = ok.unsqueeze(2) & ~ok.unsqueeze(1)
    less = c.unsqueeze(2) < c.unsqueeze(1)
    num_pairs = int(pair.sum())
    out["premise/pairs"] = float(num_pairs)
    if num_pairs:
        out["premise/correct_less_confident"] = int((pair & less).sum()) / num_pairs
    mixed = ok.any(dim=1) & ~ok.all(dim=1)
    if bool(mixed.any()):
        top = c.argmax(dim=1)  # first index of the maximum
        top_ok = ok.gather(1, top.unsqueeze(1)).squeeze(1)
        out["premise/top_confident_correct"] = float(top_ok[mixed].double().mean())

    r = rewards.detach().double().cpu().flatten()
    s = scores.detach().double().cpu().flatten()
    has_bonus = r != 0
    at_cap = s >= r.abs() / float(tau)
    for key, subset in (("premise/bonus_at_cap", has_bonus),
                        ("premise/bonus_at_cap_correct", has_bonus & ok.flatten())):
        if bool(subset.any()):
            out[key] = float(at_cap[subset].double().mean())
    return out


__all__ = ["premise_metrics"]
