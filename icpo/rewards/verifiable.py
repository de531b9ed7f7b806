"""The verifiable reward (Eq. 10, docs/algorithm.md): ``R_verif = 0.9 * R_answer + 0.1 * R_format``.

``R_format`` is 1 when the response follows the Table 5 template: ``<think>...</think>`` then
``<answer>...</answer>``, each tag exactly once, in that order, nothing but whitespace outside.
``R_answer`` is 1 when the content of the (last) ``<answer>`` block matches the ground truth:
multiple-choice letters (ground truth "A".."J") exactly, case-insensitively; anything else
with ``math-verify`` (numbers, fractions, LaTeX), after a plain string comparison. Responses
must be decoded without special tokens (``skip_special_tokens=True``): a trailing
``<|im_end|>`` counts as text outside the tags.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from math_verify import parse, verify
from math_verify.errors import TimeoutException

#: Default Eq. 10 weights, used when ``extra_info`` gives none.
ANSWER_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1
#: Seconds math-verify may spend parsing or comparing one answer (main thread only: its
#: timeout uses SIGALRM, which other threads cannot set).
MATH_TIMEOUT_S = 5

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_MC_GOLD_RE = re.compile(r"\(?([A-J])\)?\.?")
_MC_PRED_RE = re.compile(r"\(?\s*([A-Ja-j])\s*\)?\s*[.:]?")
_WRAPPER_RE = re.compile(r"^\\(?:boxed|text|textbf|mathrm)\{(.*)\}$", re.DOTALL)
_INT_RE = re.compile(r"[+-]?[0-9]{1,300}")


def _require_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected str, got {type(value).__name__}")
    return value


def format_reward(text: str) -> float:
    """1.0 if ``text`` is ``<think>...</think>`` then ``<answer>...</answer>`` (non-empty answer),
    each tag exactly once, with only whitespace around them; else 0.0."""
    _require_str(text, "text")
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    m = _FORMAT_RE.fullmatch(text)
    return 1.0 if m is not None and m.group(1).strip() else 0.0


def extract_answer(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` block, stripped; None if there is none
    or it is empty."""
    _require_str(text, "text")
    matches = _ANSWER_RE.findall(text)
    if not matches or not matches[-1].strip():
        return None
    return matches[-1].strip()


def _unwrap(s: str) -> str:
    s = s.strip().strip("$").strip()
    while (m := _WRAPPER_RE.match(s)) is not None:
        s = m.group(1).strip()
    return s


def _normalize(s: str) -> str:
    return " ".join(s.split()).casefold().rstrip(".")


def _math_equal(answer: str, ground_truth: str) -> bool:
    """math-verify equivalence; any error or timeout counts as not equal."""
    timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        # Bare LaTeX like "\frac{1}{2}" is only found inside a delimiter; \boxed{} is one.
        boxed = "\\boxed" in ground_truth or "$" in ground_truth
        gold = parse(ground_truth if boxed else f"\\boxed{{{ground_truth}}}",
                     parsing_timeout=timeout)
        if not gold:
            return False
        candidates = [answer] if "\\boxed" in answer else [answer, f"\\boxed{{{answer}}}"]
        for cand in candidates:
            pred = parse(cand, parsing_timeout=timeout)
            if pred and verify(gold, pred, timeout_seconds=timeout):
                return True
    except (Exception, TimeoutException):  # noqa: BLE001 (a reward never crashes training)
        return False
    return False


def answer_reward(answer: str | None, ground_truth: Any) -> float:
    """1.0 if ``answer`` matches ``ground_truth``, else 0.0 (None answer -> 0.0).

    A ground truth that is one letter A-J (optionally "(B)" or "B.") is multiple choice: the
    answer must be that letter (case-insensitive; "(b)", "B.", "\\boxed{B}" accepted). Otherwise
    equal normalized strings, then math-verify. A list/tuple ground truth accepts any element.
    """
    if answer is None:
        return 0.0
    _require_str(answer, "answer")
    if isinstance(ground_truth, (list, tuple)):
        return float(any(answer_reward(answer, g) for g in ground_truth))
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        raise TypeError("ground_truth: expected str, number or list, got "
                        f"{type(ground_truth).__name__}")
    gt = str(ground_truth).strip()
    mc = _MC_GOLD_RE.fullmatch(gt)
    if mc is not None:
        pred = _MC_PRED_RE.fullmatch(_unwrap(answer))
        return float(pred is not None and pred.group(1).upper() == mc.group(1))
    if (_normalize(answer) == _normalize(gt)
            or _normalize(_unwrap(answer)) == _normalize(_unwrap(gt))):
        return 1.0
    a, g = _unwrap(answer), _unwrap(gt)
    if _INT_RE.fullmatch(a) and _INT_RE.fullmatch(g):
        # two integer literals: what math-verify decides, ~1000x faster
        return float(int(a) == int(g))
    return float(_math_equal(answer, gt))


def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: dict | None = None) -> dict[str, float]:
    """verl-signature reward: ``{"score", "acc", "format"}``.

    ``score = answer_weight * acc + format_weight * format`` with the weights from
    ``extra_info["answer_weight"]``/``["format_weight"]`` when present (RewardFn passes the
    config's), else 0.9 / 0.1. ``data_source`` is accepted for the signature and unused.
    """
    info = extra_info or {}
    fmt = format_reward(solution_str)
    acc = answer_reward(extract_answer(solution_str), ground_truth)
    aw = float(info.get("answer_weight", ANSWER_WEIGHT))
    fw = float(info.get("format_weight", FORMAT_WEIGHT))
    return {"score": aw * acc + fw * fmt, "acc": acc, "format": fmt}
