"""Rewards: the verifiable reward (Eq. 10), pluggable verl-signature functions, noise settings.

A reward function has verl's signature ``fn(data_source, solution_str, ground_truth,
extra_info) -> float | dict`` (a dict must hold "score"; "acc" and other numbers are kept).
:class:`RewardFn` calls it with a deadline per sample (``reward.timeout_s``, in a forked child:
:mod:`icpo.rewards.worker`); a call that raises, returns something that is not a reward or
times out is a :class:`~icpo.errors.RewardError` naming the function and the sample.
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

from icpo.errors import RewardError
from icpo.rewards import worker
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


def describe_sample(i: int, record: Any, text: str) -> str:
    """``sample i (file:line, data_source 'x', response '<start>...')`` for error messages."""
    where = getattr(record, "location", "") or f"record {getattr(record, 'index', '?')}"
    start = text if len(text) <= 40 else text[:40] + "..."
    return (f"sample {i} ({where}, data_source {getattr(record, 'data_source', None)!r}, "
            f"response {start!r})")


class RewardFn:
    """Scores responses with ``cfg.function``, passing ``cfg.answer_weight`` and
    ``cfg.format_weight`` in ``extra_info`` (over any the record has). No noise is added here:
    see :func:`add_reward_noise`.

    With ``cfg.timeout_s > 0`` (and ``os.fork``) the calls run in a forked child, each with that
    deadline; with 0 they run in this process, without one. Any failure is a RewardError."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.name = cfg.function
        self.fn = load_reward_fn(cfg.function)
        self.timeout_s = float(getattr(cfg, "timeout_s", 0.0) or 0.0)
        self._calls = (worker.ForkedCalls(self._score)
                       if self.timeout_s > 0 and worker.FORK_AVAILABLE else None)

    def close(self) -> None:
        """End the child process, if one runs (a later call starts another)."""
        if self._calls is not None:
            self._calls.close()

    def _fail(self, i: int, record: Any, text: str, what: str) -> RewardError:
        return RewardError(f"reward function {self.name!r} {what} on "
                           f"{describe_sample(i, record, text)}")

    def _score(self, item: tuple[int, Any, str]) -> tuple[float, float, dict[str, float]]:
        i, record, text = item
        info = dict(record.extra_info or {})
        info.update(answer_weight=self.cfg.answer_weight, format_weight=self.cfg.format_weight)
        try:
            out = self.fn(record.data_source, text, record.ground_truth, info)
        except Exception as e:
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise self._fail(i, record, text, f"raised {detail}") from e
        extras: dict[str, float] = {}
        if isinstance(out, dict):
            if "score" not in out:
                raise self._fail(i, record, text, "returned a dict without 'score' (keys: "
                                 f"{', '.join(map(repr, sorted(out, key=str)))})")
            score = out["score"]
            for k, v in out.items():
                if k not in ("score", "acc") and not isinstance(v, bool) and as_real(v) is not None:
                    extras[k] = as_real(v)
            acc = out.get("acc")
        else:
            score, acc = out, None
        value = as_real(score)
        if value is None or not math.isfinite(value):
            shown = repr(score) if len(repr(score)) <= 60 else type(score).__name__
            raise self._fail(i, record, text, f"returned score {shown}; expected a finite number "
                             "(any real type), or a dict with one as 'score'")
        if acc is None:
            acc_value = float(value > 0)
        else:
            acc_value = as_real(acc)
            # float(bool(nan)) is 1.0: a NaN "acc" would be logged as a correct answer.
            if acc_value is None or not math.isfinite(acc_value):
                raise self._fail(i, record, text, f"returned acc {acc!r}; expected a bool or a "
                                 "finite number (non-zero = correct)")
            acc_value = float(acc_value != 0)
        return value, acc_value, extras

    def _score_all(self, items: list[tuple[int, Any, str]]) -> list[tuple]:
        if self._calls is None:
            return [self._score(item) for item in items]
        try:
            return self._calls.map(items, self.timeout_s)
        except worker.CallFailed as e:  # the child's RewardError, or a bug of ours, as text
            msg = e.message.removeprefix("RewardError: ")
            if msg.startswith(f"reward function {self.name!r}"):
                raise RewardError(msg) from None
            raise self._fail(*items[e.index], f"failed ({msg})") from None
        except worker.CallTimedOut as e:
            raise self._fail(*items[e.index], f"did not return within reward.timeout_s="
                             f"{self.timeout_s:g} s") from None
        except worker.ChildDied as e:
            raise self._fail(*items[e.index], f"ended its process ({e.how})") from None

    def __call__(self, records: Sequence[Any], responses_text: Sequence[str]) -> RewardBatch:
        """Rewards for ``responses_text[i]``, whose prompt is ``records[i]`` or, when there are
        fewer records, ``records[i // G]`` with ``G = len(responses) / len(records)`` (groups
        of G consecutive responses per prompt)."""
        n, b = len(responses_text), len(records)
        if b == 0 or n % b:
            raise ValueError(f"records: got {b} records for {n} responses; expected a count "
                             "that divides the number of responses")
        g = n // b
        results = self._score_all([(i, records[i // g], text)
                                   for i, text in enumerate(responses_text)])
        scores, accs, extras = ([r[k] for r in results] for k in range(3))
        keys = sorted({k for e in extras for k in e})
        return RewardBatch(
            score=torch.tensor(scores, dtype=torch.float32),
            acc=torch.tensor(accs, dtype=torch.float32),
            extras={k: torch.tensor([e.get(k, math.nan) for e in extras], dtype=torch.float32)
                    for k in keys})


__all__ = [
    "RewardBatch", "RewardError", "RewardFn", "add_reward_noise", "answer_reward", "as_real",
    "compute_score", "describe_sample",
    "extract_answer", "format_reward", "load_reward_fn", "num_noisy", "uniform_group_mask",
]
