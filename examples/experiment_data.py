"""Data of ``run_experiments.py``: the task's train / held-out files, generated once for all
runs, and the coarse-grained training file of the paper's protocol (App. B.1).

Coarse protocol: the base model samples G responses per training prompt once; the prompts
whose responses were all correct or all wrong (judged by correctness) are kept, and every
method then trains normally on that prompt set (its groups may become mixed again as the policy
moves). :func:`coarse_train_file` is the one place the experiments call it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TASKS = ("routes", "arithmetic")
"""``routes``: the two-route testbed (icpo/tiny-routes); ``arithmetic``: icpo/tiny's task."""


def difficulty_of(task: str):
    """The generator level of ``task`` (see :data:`TASKS`)."""
    if task == "routes":
        from icpo.tasks.routes import DIFFICULTY
        return DIFFICULTY
    if task == "arithmetic":
        from icpo.tasks.arithmetic import Difficulty
        return Difficulty()
    raise ValueError(f"--task: expected one of {TASKS}, got {task!r}")


def count_lines(path: Path) -> int:
    """Lines of a text file (records of a JSONL file)."""
    with path.open() as f:
        return sum(1 for _ in f)


def ensure_data(exp_dir: Path, task: str, train_size: int, val_size: int) -> tuple[Path, Path]:
    """``data/train.jsonl`` and ``data/val.jsonl`` under ``exp_dir`` (rewritten when their sizes
    differ); held-out prompts never appear in train (hash-bucket splits)."""
    from icpo.tasks.arithmetic import make_records, write_jsonl

    d = difficulty_of(task)
    folder = exp_dir / "data"
    paths = folder / "train.jsonl", folder / "val.jsonl"
    for path, split, n in ((paths[0], "train", train_size), (paths[1], "val", val_size)):
        if not path.is_file() or count_lines(path) != n:
            write_jsonl(make_records(split, n, difficulty=d), path)
    return paths


def coarse_path(train_file: Path) -> Path:
    """Where :func:`coarse_train_file` writes the coarse data of ``train_file``."""
    return train_file.with_name("coarse.jsonl")


def coarse_train_file(train_file: Path, model: str, group_size: int, max_new_tokens: int,
                      seed: int = 0) -> Path:
    """The coarse training file next to ``train_file`` (``coarse.jsonl`` + ``coarse.json``
    stats), made once by ``model`` at temperature 1 with ``group_size`` samples per prompt.

    Merge note: when ``icpo filter-coarse`` (``icpo.data.coarse``) lands, this body becomes a call
    to it; the experiments use the returned path only.
    """
    from icpo.tasks.arithmetic import write_jsonl
    from icpo.tasks.probe import load, sample_graded, uniform_groups

    out = coarse_path(train_file)
    stats_path = out.with_suffix(".json")
    want = {"source": str(train_file), "source_lines": count_lines(train_file), "model": model,
            "group_size": group_size, "max_new_tokens": max_new_tokens, "seed": seed}
    if out.is_file() and stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if {k: stats.get(k) for k in want} == want:
            return out
    records = [json.loads(line) for line in train_file.open()]
    m, tok = load(model)
    graded = sample_graded(m, tok, records, group_size, seed, max_new_tokens)
    keep = uniform_groups(graded)
    kept = [r for r, k in zip(records, keep) if k]
    if not kept:
        raise RuntimeError(f"coarse filter: no prompt of {train_file} had uniform groups")
    g = group_size
    all_right = sum(k and graded.correct[i * g] for i, k in enumerate(keep))
    write_jsonl(kept, out)
    stats = {**want, "kept": len(kept), "kept_fraction": len(kept) / len(records),
             "all_correct": all_right, "all_wrong": len(kept) - all_right}
    tmp = stats_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stats, indent=1) + "\n")
    os.replace(tmp, stats_path)
    return out
