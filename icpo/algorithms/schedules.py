"""The omega schedule (paper Sec. 3.4 / Table 4; docs/algorithm.md) and the default delta.

omega weighs the preference advantage score in the final reward (Eq. 11):
``R_final = R_verif + omega * min(S, |R_verif| / tau)``. The paper names the schedules but gives
no formula; algorithm.md records this project's reading, implemented here. Steps are 0-based: the
first training step is 0 and the last is ``total_steps - 1``.
"""

from __future__ import annotations

import math
import operator
from typing import Any, get_args

from icpo.config.schema import OmegaSchedule

SCHEDULES = get_args(OmegaSchedule)


def _check_cfg(cfg: Any) -> tuple[str, float, float, float]:
    """(schedule, omega_max, omega_min, peak_fraction) of an OmegaConfig-like, validated."""
    try:
        schedule, hi, lo, peak = cfg.schedule, cfg.omega_max, cfg.omega_min, cfg.peak_fraction
    except AttributeError as err:
        raise TypeError("omega cfg must have schedule, omega_max, omega_min and peak_fraction "
                        f"attributes: {err}") from None
    if schedule not in SCHEDULES:
        raise ValueError(f"omega schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, value in (("omega_max", hi), ("omega_min", lo), ("peak_fraction", peak)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"omega {name} must be a finite number, got {value!r}")
    if not 0.0 <= peak <= 1.0:
        raise ValueError(f"omega peak_fraction must be in [0, 1], got {peak!r}")
    return schedule, float(hi), float(lo), float(peak)


def _as_int(name: str, value: Any) -> int:
    """``value`` as an int (Python, numpy or 0-d torch integer); booleans and floats refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def _warmup(step: int, t_peak: float) -> float:
    """Inverse cosine-decay rise: 0 at step 0, 1 at ``t_peak`` (1 at once when t_peak is 0)."""
    if t_peak <= 0.0 or step >= t_peak:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * step / t_peak))


def omega_at(step: int, total_steps: int, cfg: Any) -> float:
    """omega at 0-based ``step`` of a ``total_steps``-step run.

    Args:
        step: training step, ``0 <= step < total_steps``.
        total_steps: number of training steps (>= 1).
        cfg: object with ``schedule`` (one of :data:`SCHEDULES`), ``omega_max``, ``omega_min``
            and ``peak_fraction`` (e.g. ``icpo.config.OmegaConfig``).

    Returns:
        - ``warmup_decay``:
          ``omega_min + (omega_max - omega_min) * 0.5 * (1 - cos(pi * t / t_peak))`` for
          ``t <= t_peak = peak_fraction * total_steps``, then linear from omega_max at t_peak
          to omega_min at the last step.
        - ``warmup_retention``: the same rise, then omega_max.
        - ``linear_decay``: omega_max at step 0, linear to omega_min at the last step.
        - ``constant``: omega_max.
    """
    schedule, hi, lo, peak = _check_cfg(cfg)
    total_steps, step = _as_int("total_steps", total_steps), _as_int("step", step)
    if total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step must be an int in [0, total_steps={total_steps}), got {step!r}")
    last = total_steps - 1
    if schedule == "constant":
        return hi
    if schedule == "linear_decay":
        return hi if last == 0 else hi + (lo - hi) * step / last
    t_peak = peak * total_steps
    if step <= t_peak or schedule == "warmup_retention":
        return lo + (hi - lo) * _warmup(step, t_peak)
    # warmup_decay after the peak; step > t_peak implies last > t_peak, so no division by 0.
    return hi + (lo - hi) * (step - t_peak) / (last - t_peak)


def default_delta(num_params: int) -> float:
    """Paper Table 6 delta by model size: 0.5 below 4B, 0.4 for 4-8B, 0.3 above 8B.

    Sizes are the nominal ones models are named by: ``num_params`` is rounded to the nearest
    billion first, so Qwen2.5-7B (7.6e9) and Qwen3-8B (8.2e9) get 0.4, Qwen2.5-3B (3.1e9)
    gets 0.5 and Qwen2.5-14B (14.8e9) gets 0.3, as in the paper.
    """
    num_params = _as_int("num_params", num_params)
    if num_params <= 0:
        raise ValueError(f"num_params must be a positive int, got {num_params!r}")
    billions = round(num_params / 1e9)
    if billions < 4:
        return 0.5
    if billions <= 8:
        return 0.4
    return 0.3
