"""A verifiable arithmetic task: integer expressions with +, -, *, parentheses and negatives.

Each problem is an expression such as ``(17 - 25) * 3 + 9`` whose answer is an integer checked
exactly. Problems come from a deterministic generator (a seeded ``random.Random``), so a split is
a pure function of ``(split, n, seed, difficulty)``.

Held-out splits are disjoint from ``train`` by construction, not by bookkeeping: every expression
is assigned to a bucket by a stable hash of its text, and each split only accepts expressions of
its own buckets. Two splits therefore never share an expression, whatever their sizes or seeds.

The gold response (for supervised pretraining of the bundled tiny model) is the step-by-step
evaluation in the Table 5 format, respecting operator precedence::

    <think> 17-25=-8, -8*3=-24, -24+9=-15 </think> <answer> -15 </answer>

Command line::

    python -m icpo.tasks.arithmetic --out data/arith --train 4096 --val 512
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from typing import Iterator

from icpo._io import atomic_write_text

DATA_SOURCE = "icpo/arithmetic"
SPLIT_SEEDS = {"train": 20251121, "val": 20251122, "test": 20251123}
"""Fixed generator seed of each split (used when ``seed`` is None)."""
_NUM_BUCKETS = 16
_SPLIT_BUCKETS = {"val": frozenset({0}), "test": frozenset({1})}
"""Hash buckets reserved for held-out splits; ``train`` takes all the others (14/16)."""
_PREC = {"+": 1, "-": 1, "*": 2}
_TOKEN_RE = re.compile(r"\s*(\d+|[-+*()])")


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator. Defaults are the level the bundled tiny model was trained on."""

    min_ops: int = 2
    """Fewest binary operations per expression."""
    max_ops: int = 3
    """Most binary operations per expression (drawn uniformly in [min_ops, max_ops])."""
    max_operand: int = 20
    """Literals are drawn uniformly from [0, max_operand]."""
    max_abs_value: int = 200
    """Rejects expressions where any intermediate result (or the answer) exceeds this in size."""
    ops: str = "+-*"
    """Operators to draw from (a subset of "+-*")."""

    def __post_init__(self) -> None:
        if not isinstance(self.min_ops, int) or self.min_ops < 1:
            raise ValueError(f"Difficulty.min_ops: expected an int >= 1, got {self.min_ops!r}")
        if not isinstance(self.max_ops, int) or self.max_ops < self.min_ops:
            raise ValueError(
                f"Difficulty.max_ops: expected an int >= min_ops ({self.min_ops}), "
                f"got {self.max_ops!r}"
            )
        if not isinstance(self.max_operand, int) or self.max_operand < 1:
            raise ValueError(
                f"Difficulty.max_operand: expected an int >= 1, got {self.max_operand!r}")
        if not isinstance(self.max_abs_value, int) or self.max_abs_value < self.max_operand:
            raise ValueError(
                "Difficulty.max_abs_value: expected an int >= max_operand "
                f"({self.max_operand}), got {self.max_abs_value!r}"
            )
        if (not self.ops or any(o not in _PREC for o in self.ops)
                or len(set(self.ops)) != len(self.ops)):
            raise ValueError(
                f"Difficulty.ops: expected distinct operators from '+-*', got {self.ops!r}")


# ---------------------------------------------------------------------------------------------
# Expressions: a tree is an int (a literal) or a tuple (op, left, right).


def _render(tree, parent_prec: int = 0, is_right: bool = False, parent_op: str = "") -> str:
    """Renders a tree with the parentheses its structure needs under standard precedence."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    prec = _PREC[op]
    text = f"{_render(left, prec, False, op)} {op} {_render(right, prec, True, op)}"
    # A right child of '-' at the same precedence needs parentheses: a - (b + c) != a - b + c.
    if prec < parent_prec or (is_right and prec == parent_prec and parent_op == "-"):
        return f"({text})"
    return text


def parse(expr: str):
    """Parses ``expr`` (non-negative integer literals, + - *, parentheses) into a tree.

    Standard precedence; operators of equal precedence associate to the left.
    Raises ValueError naming the expression when it is malformed.
    """
    tokens = _TOKEN_RE.findall(expr)
    if "".join(tokens) != re.sub(r"\s+", "", expr) or not tokens:
        raise ValueError(f"expr: expected digits, + - * and parentheses, got {expr!r}")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom():
        tok = take() if peek() is not None else None
        if tok == "(":
            node = level(1)
            if peek() != ")":
                raise ValueError(f"expr: unbalanced parentheses in {expr!r}")
            take()
            return node
        if tok is None or not tok.isdigit():
            raise ValueError(f"expr: expected a number or '(' in {expr!r}, got {tok!r}")
        return int(tok)

    def level(prec):
        node = atom() if prec > 2 else level(prec + 1)
        while peek() in _PREC and _PREC[peek()] == prec:
            op = take()
            node = (op, node, atom() if prec == 2 else level(prec + 1))
        return node

    tree = level(1)
    if pos != len(tokens):
        raise ValueError(f"expr: unexpected {tokens[pos]!r} in {expr!r}")
    return tree


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def solve(expr: str) -> tuple[list[tuple[int, str, int, int]], int]:
    """Evaluates ``expr`` step by step: ``([(a, op, b, result), ...] in evaluation order, answer)``.

    Evaluation order is the post-order of the parse tree (left operand before right), i.e. what
    a person does following precedence and left-to-right associativity.
    """
    steps: list[tuple[int, str, int, int]] = []

    def walk(node) -> int:
        if isinstance(node, int):
            return node
        op, left, right = node
        a, b = walk(left), walk(right)
        steps.append((a, op, b, _apply(op, a, b)))
        return steps[-1][3]

    answer = walk(parse(expr))
    return steps, answer


def _fmt_operand(v: int, right: bool) -> str:
    # "5-(-8)" rather than "5--8": a negative right operand is always parenthesized.
    return f"({v})" if right and v < 0 else str(v)


def format_step(a: int, op: str, b: int, result: int) -> str:
    """One chain step without spaces, e.g. ``-8*3=-24`` or ``5-(-8)=13``."""
    return f"{_fmt_operand(a, False)}{op}{_fmt_operand(b, True)}={result}"


def gold_response(expr: str) -> str:
    """The Table 5 formatted solution: ``<think> step, step </think> <answer> n </answer>``."""
    steps, answer = solve(expr)
    chain = ", ".join(format_step(*s) for s in steps)
    return f"<think> {chain} </think> <answer> {answer} </answer>"


def question(expr: str) -> str:
    """The user message for an expression."""
    return f"Compute: {expr}"


def _bucket(expr: str) -> int:
    # sha1, not hash(): Python's str hash is salted per process.
    return hashlib.sha1(expr.encode()).digest()[0] % _NUM_BUCKETS


def split_of(expr: str) -> str:
    """The split an expression belongs to ("train", "val" or "test"), from its hash bucket."""
    bucket = _bucket(expr)
    for split, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    return "train"


def _random_tree(rng: random.Random, num_ops: int, d: Difficulty):
    if num_ops == 0:
        return rng.randint(0, d.max_operand)
    left_ops = rng.randint(0, num_ops - 1)
    op = rng.choice(d.ops)
    return (op, _random_tree(rng, left_ops, d), _random_tree(rng, num_ops - 1 - left_ops, d))


def _check_split(split: str) -> None:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split: expected one of {sorted(SPLIT_SEEDS)}, got {split!r}")


def iter_expressions(split: str, seed: int | None = None,
                     difficulty: Difficulty | None = None) -> Iterator[str]:
    """Endless deterministic stream of expressions belonging to ``split`` (may repeat)."""
    _check_split(split)
    d = difficulty or Difficulty()
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    while True:
        tree = _random_tree(rng, rng.randint(d.min_ops, d.max_ops), d)
        expr = _render(tree)
        if split_of(expr) != split:
            continue
        steps, answer = solve(expr)
        if all(abs(v) <= d.max_abs_value for s in steps for v in (s[0], s[2], s[3])):
            yield expr


def make_records(split: str, n: int, seed: int | None = None,
                 difficulty: Difficulty | None = None) -> list[dict]:
    """``n`` distinct problems of ``split`` as records in verl's schema.

    Args:
        split: "train", "val" or "test"; held-out splits never share an expression with train.
        n: number of records (> 0).
        seed: generator seed; None means the split's fixed seed (``SPLIT_SEEDS``).
        difficulty: generator knobs; None means ``Difficulty()``.

    Returns:
        list of dicts with keys data_source, prompt (one user message), ability, reward_model
        ({"style": "rule", "ground_truth": "<int>"}) and extra_info (split, index, expression,
        num_ops).
    Raises ValueError when the difficulty level has fewer than ``n`` distinct expressions.
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    d = difficulty or Difficulty()
    seen: set[str] = set()
    records: list[dict] = []
    misses, max_misses = 0, 50 * n + 10_000
    for expr in iter_expressions(split, seed, d):
        if expr in seen:
            misses += 1
            if misses > max_misses:
                raise ValueError(
                    f"n: only {len(records)} distinct {split} expressions found at {d}; "
                    f"asked for {n}"
                )
            continue
        seen.add(expr)
        steps, answer = solve(expr)
        records.append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": question(expr)}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(answer)},
            "extra_info": {"split": split, "index": len(records), "expression": expr,
                           "num_ops": len(steps)},
        })
        if len(records) == n:
            return records
    raise AssertionError("unreachable: iter_expressions is endless")


def write_jsonl(records: list[dict], path: str | os.PathLike) -> None:
    """Writes one JSON object per line, atomically (``icpo._io``)."""
    atomic_write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


def main(argv: list[str] | None = None) -> None:
    """CLI: writes ``train.jsonl`` and ``val.jsonl`` (and ``test.jsonl`` if asked) under --out."""
    p = argparse.ArgumentParser(prog="python -m icpo.tasks.arithmetic",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=4096, help="number of train problems")
    p.add_argument("--val", type=int, default=512, help="number of held-out val problems")
    p.add_argument("--test", type=int, default=0,
                   help="number of held-out test problems (0 = none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace .jsonl files already in --out (else refused)")
    default = Difficulty()
    for field, value in asdict(default).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    from icpo.errors import UserError, check_new_files, check_range

    try:
        d = Difficulty(**{f: getattr(args, f) for f in asdict(default)})
    except ValueError as e:
        raise UserError(str(e)) from None
    splits = [("train", args.train), ("val", args.val), ("test", args.test)]
    for split, n in splits:
        check_range(f"--{split}", n, at_least=0, integer=True)
    splits = [(s, n) for s, n in splits if n]
    # As `icpo data make-arithmetic`: every check before the first write.
    paths = check_new_files(args.out, [f"{s}.jsonl" for s, _ in splits], overwrite=args.overwrite)
    for (split, n), path in zip(splits, paths):
        write_jsonl(make_records(split, n, difficulty=d), path)
        print(f"wrote {n} {split} records to {path}")


if __name__ == "__main__":
    from icpo.errors import run_main

    raise SystemExit(run_main("python -m icpo.tasks.arithmetic", main))
