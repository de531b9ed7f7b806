"""Group ops: preference scores (Eq. 9), ICPO advantages (Eq. 9, 11, 5 fused) and GRPO's (Eq. 5).

A group is the G responses sampled for one prompt. Groups are either consecutive blocks of
``group_size`` or ragged, given by ``group_offsets`` ``[num_groups + 1]`` (int32/int64, the
``cu_seqlens`` convention: starts at 0, ends at N, no empty group). Exactly one of the two.

None of these ops is differentiable: confidence and rewards are reward inputs (step 3), so
the wrappers detach them and every output has ``requires_grad=False``.
Inputs are float32/float64/float16/bfloat16; half types are computed in float32 and returned in
their own dtype.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import NamedTuple

import torch

from icpo.ops._checks import check_float_tensor, check_index_tensor, check_offsets

__all__ = ["ICPOAdvantages", "grpo_advantages", "icpo_advantages", "preference_scores",
           "reward_limit"]

class ICPOAdvantages(NamedTuple):
    """Outputs of :func:`icpo_advantages` (and of ``reference.icpo_advantages``), each ``[N]``."""

    scores: torch.Tensor
    """Preference advantage score S (Eq. 9), >= 0."""
    rewards: torch.Tensor
    """Final reward R_final = R_verif + omega * min(S, |R_verif| / tau) (Eq. 11)."""
    advantages: torch.Tensor
    """Group-normalized advantage of R_final (Eq. 5)."""


@functools.lru_cache(maxsize=64)
def _uniform_offsets(n: int, group_size: int, device: torch.device) -> torch.Tensor:
    """int64 ``[n / group_size + 1]`` offsets, cached so hot loops do not re-allocate them."""
    return torch.arange(0, n + 1, group_size, dtype=torch.int64, device=device)


def _check_data(x: object, name: str, op: str) -> torch.Tensor:
    """``x`` must be a 1-D float tensor; returns it detached (no gradient flows through) and
    contiguous (the kernels read flat memory)."""
    check_float_tensor(x, name, op)
    return (x.detach() if x.requires_grad else x).contiguous()


def _resolve_offsets(op: str, n: int, group_size: int | None, group_offsets: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor:
    """int64 ``[num_groups + 1]`` offsets on ``device`` from exactly one of the two group specs."""
    if (group_size is None) == (group_offsets is None):
        raise ValueError(f"{op}: give exactly one of group_size or group_offsets, got "
                         f"{'both' if group_size is not None else 'neither'}")
    if group_size is not None:
        if isinstance(group_size, bool):
            raise TypeError(f"{op}: group_size must be an int, got bool")
        try:
            group_size = operator.index(group_size)
        except TypeError:
            raise TypeError(f"{op}: group_size must be an int, got "
                            f"{type(group_size).__name__}") from None
        if group_size <= 0:
            raise ValueError(f"{op}: group_size must be positive, got {group_size}")
        if n % group_size:
            raise ValueError(f"{op}: group_size = {group_size} does not divide N = {n}; pass "
                             "group_offsets for ragged groups")
        if torch.compiler.is_compiling():
            return torch.arange(0, n + 1, group_size, dtype=torch.int64, device=device)
        return _uniform_offsets(n, group_size, device)
    check_index_tensor(group_offsets, "group_offsets", op, device=device, parts="num_groups")
    check_offsets(group_offsets, n, op=op, name="group_offsets", part="group", total_name="N")
    return group_offsets.to(torch.int64).contiguous()


def reward_limit(dtype: torch.dtype, omega: float = 0.0, tau: float = 2.0) -> float:
    """Largest |R_verif| the group ops accept in ``dtype``: with it no output can overflow.

    |R_final| <= |R| * (1 + omega / tau) (the bonus is at most |R| / tau), and |R_final - mean|
    <= 2 max |R_final|, so bounding max |R_final| by a quarter of the dtype's largest value
    keeps R_final and the advantages (also unscaled ones) finite. The statistics are taken in
    float64, where the squares of float32 values cannot overflow; for float64 rewards the bound
    is 1e100, so that the squares stay finite there too.
    """
    return min(torch.finfo(dtype).max / 4, 1e100) / (1.0 + omega / tau)


def _check_param(op: str, name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float, which must be finite and > 0 (``positive``) or >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{op}: {name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {v}")
    return v


def _first_bad(x: torch.Tensor, bad: torch.Tensor) -> tuple[int, float]:
    i = int(bad.nonzero()[0, 0])
    return i, float(x[i])


def _check_values(op: str, confidence: torch.Tensor | None, rewards: torch.Tensor | None,
                  omega: float = 0.0, tau: float = 2.0) -> None:
    """No NaN/inf anywhere, confidence <= 0, |rewards| <= :func:`reward_limit`. One aminmax per
    tensor and one host sync."""
    if torch.compiler.is_compiling():
        return
    named = [(n, t) for n, t in (("confidence", confidence), ("rewards", rewards))
             if t is not None and t.numel() > 0]
    if not named:
        return
    # aminmax propagates NaN, so min > -inf and max < inf (or <= 0) also rule NaN out.
    stats = torch.stack([s for _, t in named for s in torch.aminmax(t)]).tolist()
    for k, (name, t) in enumerate(named):
        lo, hi = stats[2 * k], stats[2 * k + 1]
        if not (lo > float("-inf") and hi < float("inf")):
            i, v = _first_bad(t, ~torch.isfinite(t))
            raise ValueError(f"{op}: {name} must be finite, got {name}[{i}] = {v}")
        if name == "confidence" and not hi <= 0:
            i, v = _first_bad(t, t > 0)
            raise ValueError(f"{op}: confidence must be <= 0 (a mean token log-prob), got "
                             f"confidence[{i}] = {v}")
        if name == "rewards":
            limit = reward_limit(t.dtype, omega, tau)
            if max(-lo, hi) > limit:
                i, v = _first_bad(t, t.double().abs() > limit)
                why = f" with omega = {omega}, tau = {tau}" if omega else ""
                raise ValueError(f"{op}: rewards must satisfy |R| <= {limit:.4g} in "
                                 f"{str(t.dtype).replace('torch.', '')}{why} (so that R_final "
                                 f"and the advantages cannot overflow), got rewards[{i}] = {v}")


def preference_scores(confidence: torch.Tensor, group_size: int | None = None, *,
                      group_offsets: torch.Tensor | None = None,
                      delta: float = 0.4) -> torch.Tensor:
    """Preference advantage score S of every response (docs/algorithm.md steps 4-5, Eq. 9).

    confidence: ``[N]`` float, <= 0 (mean token log-probs), finite; values above
    ``reference.CONFIDENCE_CEIL`` are clamped to it. Groups sorted ascending (stable by position);
    the response at sorted position k gets ``delta * sum_{j > k} c_j / c_k - delta * c_top``;
    delta: finite, >= 0. Returns ``[N]`` >= 0 in confidence's dtype; not differentiable.
    """
    op = "preference_scores"
    delta = _check_param(op, "delta", delta)
    confidence = _check_data(confidence, "confidence", op)
    offsets = _resolve_offsets(op, confidence.shape[0], group_size, group_offsets,
                               confidence.device)
    _check_values(op, confidence, None)
    return torch.ops.icpo.preference_scores(confidence, offsets, delta)


def icpo_advantages(confidence: torch.Tensor, rewards: torch.Tensor,
                    group_size: int | None = None, *, group_offsets: torch.Tensor | None = None,
                    delta: float = 0.4, tau: float = 2.0, omega: float = 1.0, scale: bool = True,
                    unbiased: bool = False, eps: float = 1e-6) -> ICPOAdvantages:
    """ICPO advantages: docs/algorithm.md steps 4-7 in one pass per group.

    confidence: ``[N]`` float <= 0; rewards: ``[N]`` float (R_verif), same device, finite.
    Returns ``ICPOAdvantages(scores, rewards, advantages)``, each ``[N]`` in rewards' dtype:
    S (Eq. 9), R_final = R + omega * min(S, |R| / tau) (Eq. 11) and
    (R_final - mean) / (std + eps) per group (Eq. 5; population std unless ``unbiased``; without
    ``scale`` only centered, as Dr. GRPO). A group whose R_final are all equal (a group of one
    included) gets advantage exactly 0. ``omega = 0`` gives bitwise :func:`grpo_advantages` of
    ``rewards``. delta, omega, eps: finite, >= 0; tau: finite, > 0; every |R| at most
    :func:`reward_limit` (rewards' dtype, omega, tau), so nothing overflows. Not differentiable.
    """
    op = "icpo_advantages"
    delta = _check_param(op, "delta", delta)
    tau = _check_param(op, "tau", tau, positive=True)
    omega = _check_param(op, "omega", omega)
    eps = _check_param(op, "eps", eps)
    confidence = _check_data(confidence, "confidence", op)
    rewards = _check_data(rewards, "rewards", op)
    if confidence.shape != rewards.shape:
        raise ValueError(f"{op}: confidence and rewards must have the same shape [N], got "
                         f"{tuple(confidence.shape)} and {tuple(rewards.shape)}")
    if confidence.device != rewards.device:
        raise ValueError(f"{op}: confidence and rewards must be on one device, got "
                         f"{confidence.device} and {rewards.device}")
    offsets = _resolve_offsets(op, rewards.shape[0], group_size, group_offsets, rewards.device)
    _check_values(op, confidence, rewards, omega, tau)
    out_dtype = rewards.dtype
    if confidence.dtype != out_dtype:  # the kernel takes one dtype: compute in the wider one
        common = torch.promote_types(confidence.dtype, out_dtype)
        confidence, rewards = confidence.to(common), rewards.to(common)
    scores, final, adv = torch.ops.icpo.icpo_advantages(
        confidence, rewards, offsets, delta, tau, omega, bool(scale), bool(unbiased), eps)
    if scores.dtype != out_dtype:
        scores, final, adv = scores.to(out_dtype), final.to(out_dtype), adv.to(out_dtype)
    return ICPOAdvantages(scores, final, adv)


def grpo_advantages(rewards: torch.Tensor, group_size: int | None = None, *,
                    group_offsets: torch.Tensor | None = None, scale: bool = True,
                    unbiased: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages (Eq. 5): ``(R - mean) / (std + eps)`` per group, or ``R - mean`` without
    ``scale``. rewards: ``[N]`` float, finite, |R| <= :func:`reward_limit` (rewards' dtype);
    eps: finite, >= 0. Returns ``[N]`` in rewards' dtype; a group whose rewards are all equal (a
    group of one included, also with ``unbiased``) gets exactly 0. Not differentiable.
    """
    op = "grpo_advantages"
    eps = _check_param(op, "eps", eps)
    rewards = _check_data(rewards, "rewards", op)
    offsets = _resolve_offsets(op, rewards.shape[0], group_size, group_offsets, rewards.device)
    _check_values(op, None, rewards)
    return torch.ops.icpo.grpo_advantages(rewards, offsets, bool(scale), bool(unbiased), eps)


@torch.library.register_fake("icpo::preference_scores")
def _preference_scores_fake(confidence, group_offsets, delta):
    return confidence.new_empty(confidence.shape)


@torch.library.register_fake("icpo::icpo_advantages")
def _icpo_advantages_fake(confidence, rewards, group_offsets, delta, tau, omega, scale,
                          unbiased, eps):
    torch._check(confidence.dtype == rewards.dtype,
                 lambda: "confidence and rewards must share a dtype")
    return tuple(rewards.new_empty(rewards.shape) for _ in range(3))


@torch.library.register_fake("icpo::grpo_advantages")
def _grpo_advantages_fake(rewards, group_offsets, scale, unbiased, eps):
    return rewards.new_empty(rewards.shape)
