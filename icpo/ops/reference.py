"""Readable pure-PyTorch references for every icpo op.

These are the definitions the compiled kernels are tested and benchmarked against. They favour
clarity over speed: each follows ``docs/algorithm.md`` step by step. They take the same
arguments as the public ops in :mod:`icpo.ops` but do no input validation.
"""

from __future__ import annotations

import torch

from icpo.ops.group_advantages import ICPOAdvantages

#: Log-probs are <= 0; a confidence of exactly 0 is clamped to this before dividing (step 5),
#: so equal confidences give a ratio of exactly 1 and nothing divides by zero.
CONFIDENCE_CEIL = -1e-12


def group_offsets_from(n: int, group_size: int | None, group_offsets: torch.Tensor | None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``[num_groups + 1]`` offsets for consecutive groups of ``group_size`` or as given."""
    if group_offsets is not None:
        return group_offsets.to(device=device, dtype=torch.int64)
    assert group_size is not None and group_size > 0 and n % group_size == 0
    return torch.arange(0, n + 1, group_size, device=device, dtype=torch.int64)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = True, ignore_index: int = -100):
    """Per-token log-prob of ``labels`` and entropy of ``softmax(logits / temperature)``.

    logits ``[..., V]`` any float dtype, labels int64 ``[...]`` -> (logp, entropy) fp32 ``[...]``
    (float64 for float64 logits: the yardstick of the cross-device checks). Positions whose label
    is ``ignore_index`` give 0 for both.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logz = torch.log_softmax(z, dim=-1)
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    logp = logz.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if not return_entropy:
        return logp, None
    entropy = -(logz.exp() * logz).sum(-1).masked_fill(ignored, 0.0)
    return logp, entropy


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          temperature: float = 1.0, bias: torch.Tensor | None = None,
                          ignore_index: int = -100, return_entropy: bool = True,
                          chunk_size: int | None = None):
    """:func:`token_logprobs` of the materialized logits ``hidden @ weight.T + bias``.

    hidden ``[..., H]``, weight ``[V, H]``, bias ``[V]`` or None, all one float dtype (the logits
    come out in it, as plain PyTorch gives them). ``chunk_size`` is accepted and ignored.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, labels, temperature=temperature,
                          return_entropy=return_entropy, ignore_index=ignore_index)


def segment_mean(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean of each segment ``values[cu[b]:cu[b+1]]`` of a packed ``[T]`` tensor -> ``[B]``."""
    bounds = cu_seqlens.tolist()
    return torch.stack([values[s:e].mean() for s, e in zip(bounds[:-1], bounds[1:])])


def preference_scores(confidence: torch.Tensor, group_size: int | None = None, *,
                      group_offsets: torch.Tensor | None = None,
                      delta: float = 0.4) -> torch.Tensor:
    """Preference advantage score of every response (docs/algorithm.md steps 4-5, Eq. 9).

    Within a group sorted ascending by confidence (stable), the response at sorted position k gets
    ``S_k = delta * sum_{j > k} c_j / c_k - delta * c_top`` with c_top the group's highest
    confidence. confidence ``[N]`` (<= 0) -> ``[N]``, same dtype.
    """
    offsets = group_offsets_from(confidence.numel(), group_size, group_offsets).tolist()
    c = confidence.clamp(max=CONFIDENCE_CEIL)
    scores = torch.zeros_like(confidence)
    for start, end in zip(offsets[:-1], offsets[1:]):
        group = c[start:end]
        order = torch.sort(group, stable=True).indices
        ranked = group[order]
        c_top = ranked[-1]
        for k in range(end - start):
            ratios = ranked[k + 1:] / ranked[k]
            scores[start + order[k]] = delta * ratios.sum() - delta * c_top
    return scores


def _normalize(rewards: torch.Tensor, offsets: list[int], scale: bool, unbiased: bool,
               eps: float) -> torch.Tensor:
    """(R - mean_group) / (std_group + eps), or R - mean_group without ``scale``.

    Statistics in float64 (no overflow of (R - mean)^2 for float32 rewards), the result in
    rewards' dtype. A group whose rewards are all equal (G = 1 included) gets exactly 0: Eq. 5
    gives R - mean = 0 there, but a rounded mean need not equal R (docs/algorithm.md, step 7).
    """
    out = torch.zeros_like(rewards)
    for start, end in zip(offsets[:-1], offsets[1:]):
        group = rewards[start:end].double()
        if bool((group == group[0]).all()):
            continue
        centered = group - group.mean()
        if scale:
            centered = centered / (group.std(correction=1 if unbiased else 0) + eps)
        out[start:end] = centered.to(rewards.dtype)
    return out


def grpo_advantages(rewards: torch.Tensor, group_size: int | None = None, *,
                    group_offsets: torch.Tensor | None = None, scale: bool = True,
                    unbiased: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalized advantages (Eq. 5). rewards ``[N]`` -> ``[N]``, same dtype."""
    offsets = group_offsets_from(rewards.numel(), group_size, group_offsets).tolist()
    return _normalize(rewards, offsets, scale, unbiased, eps)


def icpo_advantages(confidence: torch.Tensor, rewards: torch.Tensor, group_size: int | None = None,
                    *, group_offsets: torch.Tensor | None = None, delta: float = 0.4,
                    tau: float = 2.0, omega: float = 1.0, scale: bool = True,
                    unbiased: bool = False, eps: float = 1e-6) -> ICPOAdvantages:
    """Steps 4-7: preference scores, reward fusion (Eq. 11), group normalization (Eq. 5)."""
    offsets = group_offsets_from(rewards.numel(), group_size, group_offsets)
    scores = preference_scores(confidence, group_offsets=offsets, delta=delta).to(rewards.dtype)
    final = rewards + omega * torch.minimum(scores, rewards.abs() / tau)
    return ICPOAdvantages(scores, final, _normalize(final, offsets.tolist(), scale, unbiased, eps))
