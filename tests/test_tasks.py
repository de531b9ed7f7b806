"""Tests for icpo.tasks.arithmetic: determinism, disjoint splits, gold chains, knobs, files."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from icpo.tasks import arithmetic as ar
from icpo.tasks.arithmetic import Difficulty, gold_response, make_records, write_jsonl

STEP_RE = re.compile(r"^(-?\d+)([-+*])(-?\d+|\(-\d+\))=(-?\d+)$")
RESPONSE_RE = re.compile(r"^<think> (.+) </think> <answer> (-?\d+) </answer>$")


def _python_chain(expr):
    """Independent oracle: Python's own parser gives precedence; post-order BinOps = the chain."""
    assert re.fullmatch(r"[0-9+\-*() ]+", expr), expr
    steps = []
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}

    def walk(node):
        if isinstance(node, ast.Constant):
            return node.value
        a, b = walk(node.left), walk(node.right)
        value = eval(compile(ast.Expression(node), "<expr>", "eval"))
        steps.append((a, ops[type(node.op)], b, value))
        return value

    answer = walk(ast.parse(expr, mode="eval").body)
    return steps, answer


def _parse_response(text):
    m = RESPONSE_RE.match(text)
    assert m, text
    steps = []
    for part in m.group(1).split(", "):
        s = STEP_RE.match(part)
        assert s, part
        a, op, b, r = s.groups()
        steps.append((int(a), op, int(b.strip("()")), int(r)))
    return steps, int(m.group(2))


def test_brief_example():
    assert gold_response("(17 - 25) * 3 + 9") == (
        "<think> 17-25=-8, -8*3=-24, -24+9=-15 </think> <answer> -15 </answer>"
    )


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_gold_chain_recomputes_ground_truth(split):
    d = Difficulty(min_ops=1, max_ops=5, max_operand=30, max_abs_value=5000)
    for rec in make_records(split, 300, difficulty=d):
        expr = rec["extra_info"]["expression"]
        steps, answer = _parse_response(gold_response(expr))
        for a, op, b, r in steps:  # each step is right arithmetic
            assert r == (a + b if op == "+" else a - b if op == "-" else a * b)
        # and the steps are the evaluation order that precedence dictates
        assert (steps, answer) == _python_chain(expr)
        assert str(answer) == rec["reward_model"]["ground_truth"]
        assert rec["extra_info"]["num_ops"] == len(steps) == len(re.findall(r"[-+*]", expr))


def test_negative_right_operand_is_parenthesized():
    assert gold_response("5 - (2 - 9) * 2").startswith(
        "<think> 2-9=-7, -7*2=-14, 5-(-14)=19 </think>")
    assert "3*(-1)=-3" in gold_response("3 * (0 - 1)")


def test_deterministic_and_seeded():
    a = make_records("train", 200)
    assert a == make_records("train", 200)
    assert a[:50] == make_records("train", 50)  # a prefix does not depend on n
    assert a != make_records("train", 200, seed=7)
    assert make_records("val", 20) != make_records("test", 20)


def test_splits_disjoint_and_deduplicated():
    exprs = {s: [r["extra_info"]["expression"] for r in make_records(s, n)]
             for s, n in (("train", 3000), ("val", 400), ("test", 400))}
    for s, e in exprs.items():
        assert len(set(e)) == len(e), s
        assert all(ar.split_of(x) == s for x in e)
    assert not set(exprs["train"]) & set(exprs["val"])
    assert not set(exprs["train"]) & set(exprs["test"])
    assert not set(exprs["val"]) & set(exprs["test"])
    # even with other seeds, a held-out expression never lands in train
    assert not ({r["extra_info"]["expression"] for r in make_records("train", 3000, seed=99)}
                & set(exprs["val"]))


def test_record_schema():
    rec = make_records("val", 3)[1]
    assert set(rec) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert rec["data_source"] == "icpo/arithmetic" and rec["ability"] == "math"
    assert rec["prompt"] == [{"role": "user",
                              "content": "Compute: " + rec["extra_info"]["expression"]}]
    assert rec["reward_model"]["style"] == "rule"
    assert rec["extra_info"]["split"] == "val" and rec["extra_info"]["index"] == 1
    json.dumps(rec)


def test_difficulty_knobs_respected():
    d = Difficulty(min_ops=3, max_ops=4, max_operand=9, max_abs_value=50, ops="+*")
    recs = make_records("train", 300, difficulty=d)
    assert {r["extra_info"]["num_ops"] for r in recs} == {3, 4}
    for r in recs:
        expr = r["extra_info"]["expression"]
        assert "-" not in expr
        assert all(int(x) <= 9 for x in re.findall(r"\d+", expr))
        steps, _ = ar.solve(expr)
        assert all(abs(v) <= 50 for s in steps for v in (s[0], s[2], s[3]))
    # the default level has negatives and multi-digit (carrying) answers
    answers = [int(r["reward_model"]["ground_truth"]) for r in make_records("val", 300)]
    assert any(a < 0 for a in answers) and any(a >= 100 for a in answers)


@pytest.mark.parametrize("kwargs, field", [
    ({"min_ops": 0}, "min_ops"), ({"min_ops": 3, "max_ops": 2}, "max_ops"),
    ({"max_operand": 0}, "max_operand"), ({"max_abs_value": 5}, "max_abs_value"),
    ({"ops": "+/"}, "ops"), ({"ops": ""}, "ops"),
])
def test_bad_difficulty_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Difficulty(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_records("dev", 3)
    with pytest.raises(ValueError, match="n:"):
        make_records("train", 0)
    tiny = Difficulty(min_ops=1, max_ops=1, max_operand=2, max_abs_value=10, ops="+")
    with pytest.raises(ValueError, match="distinct"):
        make_records("train", 100, difficulty=tiny)  # only 9 expressions exist
    for bad in ("1 +", "(1 + 2", "1 + 2)", "1 / 2", "", "-1 + 2"):
        with pytest.raises(ValueError, match="expr"):
            ar.parse(bad)


def test_write_jsonl_and_cli(tmp_path):
    recs = make_records("val", 5)
    path = tmp_path / "sub" / "v.jsonl"
    write_jsonl(recs, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs
    assert os.listdir(path.parent) == ["v.jsonl"]  # no temp file left behind
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "icpo.tasks.arithmetic", "--out", str(out),
                    "--train", "7", "--val", "3", "--max-ops", "4"],
                   check=True, capture_output=True)
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert train == make_records("train", 7, difficulty=Difficulty(max_ops=4))
    assert len((out / "val.jsonl").read_text().splitlines()) == 3
    assert not (out / "test.jsonl").exists()
