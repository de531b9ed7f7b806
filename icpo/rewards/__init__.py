"""Rewards: the verifiable reward (Eq. 10), pluggable verl-signature functions, noise settings.

A reward function has verl's signature ``fn(data_source, solution_str, ground_truth,
extra_info) -> float | dict`` (a dict must hold "score"; "acc" and other numbers are kept).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from icpo.rewards.noise import add_reward_noise, num_noisy, uniform_group_mask
from icpo.rewards.verifiable import answer_reward, compute_score, extract_answer, format_reward


def _split_dotted(dotted: str) -> tuple[str, str]:
    if ":" in dotted:
        module, _, attr = dotted.rpartition(":")
    else:
        module, _, attr = dotted.rpartition(".")
    if not module or not attr:
        raise ValueError(f"reward function {dotted!r}: expected 'pkg.module:function', "
                         "'pkg.module.function' or 'path/to/file.py:function'")
    return module, attr


def _import_file(path: str, dotted: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reward function {dotted!r}: file not found: {path!r}")
    name = "icpo_reward_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def load_reward_fn(dotted: str) -> Callable[..., Any]:
    """The callable named by ``"pkg.mod:fn"``, ``"pkg.mod.fn"`` or ``"path/file.py:fn"``
    (attribute paths like ``"pkg.mod:Class.method"`` work too). Errors name ``dotted``."""
    if not isinstance(dotted, str) or not dotted.strip():
        raise ValueError(f"reward function: expected a non-empty dotted path, got {dotted!r}")
    module_name, attr = _split_dotted(dotted.strip())
    if module_name.endswith(".py"):
        obj = _import_file(module_name, dotted)
    else:
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            raise ImportError(f"reward function {dotted!r}: cannot import module "
                              f"{module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward function {dotted!r}: {module_name!r} has no attribute "
                                 f"{attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward function {dotted!r}: {type(obj).__name__} is not callable")
    return obj


def as_real(value: Any) -> float | None:
    """``value`` as a Python float when it is one real number of any common type (bool, int,
    float, NumPy scalars and one-element arrays, one-element torch tensors), else None."""
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, (np.ndarray, np.generic)):
        return float(value.item()) if value.size == 1 and value.dtype.kind in "biuf" else None
    if isinstance(value, numbers.Real):  # bool is an int
        return float(value)
    return None


@dataclass
class RewardBatch:
    """Rewards of N responses."""

    score: torch.Tensor
    """float32 ``[N]``: R_verif, the reward the advantages use."""
    acc: torch.Tensor
    """float32 ``[N]`` of 0/1: answer correct ("acc" of the function's dict, else score > 0)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """float32 ``[N]`` per other numeric key of the function's dicts (NaN where absent)."""


class RewardFn:
    """Scores responses with ``cfg.function``, passing ``cfg.answer_weight`` and
    ``cfg.format_weight`` in ``extra_info`` (over any the record has). No noise is added here:
    see :func:`add_reward_noise`."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.name = cfg.function
        self.fn = load_reward_fn(cfg.function)

    def _one(self, i: int, record: Any, text: str) -> tuple[float, float, dict[str, float]]:
        info = dict(record.extra_info or {})
        info.update(answer_weight=self.cfg.answer_weight, format_weight=self.cfg.format_weight)
        try:
            out = self.fn(record.data_source, text, record.ground_truth, info)
        except Exception as e:
            raise RuntimeError(f"reward function {self.name!r} failed on response {i} "
                               f"({record.location or record.data_source}): {e}") from e
        extras: dict[str, float] = {}
        if isinstance(out, dict):
            if "score" not in out:
                raise TypeError(f"reward function {self.name!r} returned a dict without 'score' "
                                f"(keys: {sorted(out)})")
            score = out["score"]
            for k, v in out.items():
                if k not in ("score", "acc") and not isinstance(v, bool) and as_real(v) is not None:
                    extras[k] = as_real(v)
            acc = out.get("acc")
        else:
            score, acc = out, None
        value = as_real(score)
        if value is None or not math.isfinite(value):
            raise TypeError(f"reward function {self.name!r} returned score {score!r} for response "
                            f"{i}; expected a finite number (any real type)")
        if acc is None:
            acc_value = float(value > 0)
        else:
            acc_value = as_real(acc)
            # float(bool(nan)) is 1.0: a NaN "acc" would be logged as a correct answer.
            if acc_value is None or not math.isfinite(acc_value):
                raise TypeError(f"reward function {self.name!r} returned acc {acc!r} for response "
                                f"{i}; expected a bool or a finite number (non-zero = correct)")
            acc_value = float(acc_value != 0)
        return value, acc_value, extras

    def __call__(self, records: Sequence[Any], responses_text: Sequence[str]) -> RewardBatch:
        """Rewards for ``responses_text[i]``, whose prompt is ``records[i]`` or, when there are
        fewer records, ``records[i // G]`` with ``G = len(responses) / len(records)`` (groups
        of G consecutive responses per prompt)."""
        n, b = len(responses_text), len(records)
        if b == 0 or n % b:
            raise ValueError(f"records: got {b} records for {n} responses; expected a count "
                             "that divides the number of responses")
        g = n // b
        scores, accs, extras = [], [], []
        for i, text in enumerate(responses_text):
            s, a, e = self._one(i, records[i // g], text)
            scores.append(s)
            accs.append(a)
            extras.append(e)
        keys = sorted({k for e in extras for k in e})
        return RewardBatch(
            score=torch.tensor(scores, dtype=torch.float32),
            acc=torch.tensor(accs, dtype=torch.float32),
            extras={k: torch.tensor([e.get(k, math.nan) for e in extras], dtype=torch.float32)
                    for k in keys})


__all__ = [
    "RewardBatch", "RewardFn", "add_reward_noise", "answer_reward", "as_real", "compute_score",
    "extract_answer", "format_reward", "load_reward_fn", "num_noisy", "uniform_group_mask",
]
