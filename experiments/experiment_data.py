"""Data of ``run_experiments.py``: the task's train / held-out files, generated once for all
runs, and the coarse-grained training file of the paper's protocol (App. B.1).

Coarse protocol: the base model samples G responses per training prompt once; the prompts
whose responses were all correct or all wrong (judged by correctness) are kept, and every
method then trains normally on that prompt set (its groups may become mixed again as the policy
moves). :func:`coarse_train_file` is the one place the experiments call it.
"""

from __future__ import annotations

import json
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
    """The coarse training file next to ``train_file`` (``coarse.jsonl`` + ``coarse.json``, the
    summary of :func:`icpo.data.coarse.filter_coarse`, the code behind ``icpo filter-coarse``),
    made by ``model`` at temperature 1 with ``group_size`` samples per prompt. Made once: a
    summary with the same settings (and as many prompts as ``train_file`` has lines) is reused.
    """
    from icpo.data.coarse import CoarseFilterSpec, filter_coarse

    out = coarse_path(train_file)
    spec = CoarseFilterSpec(model=model, train_files=[str(train_file)], output=str(out),
                            n=group_size, max_new_tokens=max_new_tokens, seed=seed,
                            summary=str(out.with_suffix(".json")), overwrite=True)
    want = {"model": model, "train_files": spec.train_files, "n": group_size,
            "temperature": float(spec.temperature), "max_new_tokens": max_new_tokens, "seed": seed,
            "reward_function": spec.reward_function, "template": spec.template,
            "prompts": count_lines(train_file)}
    stats_path = Path(spec.summary_path)
    if out.is_file() and stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if {k: stats.get(k) for k in want} == want:
            return out
    filter_coarse(spec)
    return out
