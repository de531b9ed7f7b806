"""The two-route arithmetic testbed: a frequent solution route with a systematic slip, a rare
reliable one, so that ICPO's premise (correct-but-unsure responses, confident errors) can hold.

The problems are :mod:`icpo.tasks.arithmetic` expressions at :data:`DIFFICULTY` (same splits,
same held-out guarantee, same verifiable answer). What differs is how the pretraining data of
the bundled ``icpo/tiny-routes`` model solve them. A subtraction ``a - b`` can be worked two
valid ways:

- route A, *subtract* (the frequent one, :data:`ROUTE_B_FRACTION` of the data is the other):
  ``17-25=8`` -- written by a sloppy annotator who drops the sign whenever the difference is
  negative, so the chain goes on with the wrong value and the answer is wrong;
- route B, *add the opposite* (rare, always right): ``17+(-25)=-8``.

Steps without a subtraction are written the same way on both routes, so the two routes part at
the first subtraction, exactly where the slip can happen. A model pretrained on this mixture
takes route A most of the time and is sure of it: its route-A errors are confident ones, while
its correct route-B answers carry the low probability of the rare route. Problems with no
negative difference are solved right on either route. See docs/experiments.md for the measured
premise metric of the resulting model.
"""

from __future__ import annotations

import random

from icpo.tasks.arithmetic import Difficulty, format_step, solve

DATA_SOURCE = "icpo/arithmetic_routes"
DIFFICULTY = Difficulty(min_ops=2, max_ops=2, max_operand=15, max_abs_value=150, ops="-*")
"""Problem level of the testbed: two operations among - and *, literals 0..15: short chains a
tiny model learns in minutes, route A slips on about half of them (49.5 % of 1000 held-out
problems), and each held-out split has a few thousand distinct expressions."""
ROUTE_B_FRACTION = 0.2
"""Share of the pretraining responses that take the reliable route B."""
ROUTES = ("A", "B")


def route_steps(expr: str, route: str) -> tuple[list[str], int]:
    """The written chain steps of ``expr`` on ``route`` and the answer that chain reaches.

    Route A writes ``a-b=|a-b|`` (the systematic slip) and carries that value on; route B writes
    every subtraction as the addition of the opposite, with the true result.
    """
    if route not in ROUTES:
        raise ValueError(f"route: expected 'A' or 'B', got {route!r}")
    from icpo.tasks.arithmetic import parse

    steps: list[str] = []

    def walk(node) -> int:
        if isinstance(node, int):
            return node
        op, left, right = node
        a, b = walk(left), walk(right)
        if op == "-" and route == "A":
            value = abs(a - b)
            steps.append(format_step(a, "-", b, value))
        elif op == "-":
            value = a - b
            steps.append(format_step(a, "+", -b, value))
        else:
            value = a + b if op == "+" else a * b
            steps.append(format_step(a, op, b, value))
        return value

    return steps, walk(parse(expr))


def route_response(expr: str, route: str) -> str:
    """The Table 5 formatted response of ``route``:
    ``<think> ... </think> <answer> n </answer>``."""
    steps, answer = route_steps(expr, route)
    return f"<think> {', '.join(steps)} </think> <answer> {answer} </answer>"


def slips(expr: str) -> bool:
    """True when route A reaches a wrong answer on ``expr`` (a negative difference on its way)."""
    return route_steps(expr, "A")[1] != solve(expr)[1]


def route_of(response: str) -> str | None:
    """Which route a response took, from its think part: "B" if it adds an opposite (``+(-``),
    "A" if it writes a subtraction step (``x-y=``), None when it shows neither (for instance no
    subtraction at all, where the routes coincide). A diagnostic, not a grader."""
    think = response.split("</think>")[0]
    if "+(-" in think:
        return "B"
    # A subtraction step "x-y=": a '-' right after a digit or ')' (not a sign).
    for i, ch in enumerate(think[1:], 1):
        if ch == "-" and (think[i - 1].isdigit() or think[i - 1] == ")"):
            return "A"
    return None


def pretraining_response(expr: str, rng: random.Random,
                         route_b_fraction: float = ROUTE_B_FRACTION) -> str:
    """One pretraining response for ``expr``: route B with probability ``route_b_fraction``."""
    if not 0.0 <= route_b_fraction <= 1.0:
        raise ValueError(f"route_b_fraction: expected a number in [0, 1], got {route_b_fraction!r}")
    return route_response(expr, "B" if rng.random() < route_b_fraction else "A")


__all__ = ["DATA_SOURCE", "DIFFICULTY", "ROUTES", "ROUTE_B_FRACTION", "pretraining_response",
           "route_of", "route_response", "route_steps", "slips"]
