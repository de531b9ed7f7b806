"""The paper's coarse-grained data filter (Table 2, App. B.1; docs/algorithm.md, "Coarse-grained
rewards").

A one-off pass over the TRAINING DATA, before any training: the base model samples G responses
per prompt, each response is judged correct or not by the reward function, and the prompts
whose G responses were all correct or all incorrect are kept. Each method then trains on the
kept prompts with its normal reward; groups may become mixed again as the policy moves.

    icpo filter-coarse --model icpo/tiny --data train.jsonl --out coarse.jsonl --n 5

writes ``coarse.jsonl`` (the kept records, unchanged, in their input order) and
``coarse.jsonl.summary.json`` (counts). The per-step filter that drops every mixed group at
every step is a different, harsher setting: ``reward.drop_mixed_groups``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from icpo._io import atomic_path
from icpo.data.dataset import DataError, PromptDataset, _iter_raw, _to_record

OUTPUT_TYPES = (".jsonl", ".parquet")


class CoarseFilterError(ValueError):
    """A bad argument of the filter (the message names it), raised before any model loads."""


@dataclass
class CoarseFilterSpec:
    """What one filtering pass does; every field is checked by :meth:`validate` before any
    model is loaded."""

    model: str
    """Base model: Hugging Face folder or "icpo/tiny"."""
    train_files: list[str]
    """Training data files (.jsonl/.json/.parquet, verl schema), filtered together."""
    output: str
    """The filtered data file (.jsonl or .parquet); its summary goes to ``summary``."""
    n: int = 5
    """G: responses sampled per prompt (paper: 5)."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0); > 0."""
    max_new_tokens: int = 3072
    """Longest response in tokens."""
    seed: int = 0
    """Sampling seed: the same seed gives the same filtered file."""
    reward_function: str = "icpo.rewards.verifiable:compute_score"
    """Reward function; a response is correct when its "acc" is truthy (score > 0 when the
    function returns a plain number)."""
    answer_weight: float = 0.9
    """Passed to the reward function as in training (does not change correctness)."""
    format_weight: float = 0.1
    """Passed to the reward function as in training (does not change correctness)."""
    prompt_key: str = "prompt"
    """Dotted path of the prompt in each record."""
    answer_key: str = "reward_model.ground_truth"
    """Dotted path of the ground truth in each record."""
    template: str = "r1"
    """Prompt template, as ``data.template`` in training."""
    max_prompt_length: int = 2048
    """Prompts longer than this (tokens) are not judged and not written (training skips them)."""
    batch_size: int = 64
    """Prompts per generate call."""
    summary: str | None = None
    """Where the JSON summary goes; None = ``output + ".summary.json"``."""
    overwrite: bool = False
    """Replace an existing output / summary file."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes copied into the summary."""

    @property
    def summary_path(self) -> str:
        return self.summary if self.summary else self.output + ".summary.json"

    def validate(self) -> None:
        """Raise :class:`CoarseFilterError` naming the bad argument (one line)."""
        if not self.train_files:
            raise CoarseFilterError("train_files: got none; expected at least one data file")
        for path in self.train_files:
            if not os.path.isfile(path):
                raise CoarseFilterError(f"data file not found: {path!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
            raise CoarseFilterError(f"n: got {self.n!r}; expected an int >= 2 (a group of one "
                                    "is always all correct or all wrong)")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise CoarseFilterError(f"temperature: got {self.temperature!r}; expected a finite "
                                    "number > 0 (the G responses must be sampled)")
        for name in ("max_new_tokens", "max_prompt_length", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CoarseFilterError(f"{name}: got {v!r}; expected an int >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CoarseFilterError(f"seed: got {self.seed!r}; expected an int >= 0")
        if self.template not in ("r1", "none"):
            raise CoarseFilterError(f"template: got {self.template!r}; expected 'r1' or 'none'")
        if os.path.splitext(self.output)[1].lower() not in OUTPUT_TYPES:
            raise CoarseFilterError(f"output: got {self.output!r}; expected a "
                                    f"{' or '.join(OUTPUT_TYPES)} file name")
        inputs = {os.path.realpath(p) for p in self.train_files}
        for name, path in (("output", self.output), ("summary", self.summary_path)):
            if os.path.realpath(path) in inputs:
                raise CoarseFilterError(f"{name}: {path!r} is one of the input files; choose a "
                                        "new name")
            if os.path.isdir(path):
                raise CoarseFilterError(f"{name}: {path!r} is a folder; expected a file name")
            if os.path.exists(path) and not self.overwrite:
                raise CoarseFilterError(f"{name}: {path!r} exists; pass --overwrite to replace "
                                        "it")
            folder = os.path.dirname(os.path.abspath(path))
            if os.path.exists(folder) and not os.access(folder, os.W_OK):
                raise CoarseFilterError(f"{name}: cannot write in {folder!r}")


def group_outcome(correct: Sequence[bool]) -> str:
    """"all_correct", "all_wrong" or "mixed" for the G correctness flags of one prompt."""
    k = sum(bool(c) for c in correct)
    return "all_correct" if k == len(correct) else "all_wrong" if k == 0 else "mixed"


def _read(spec: CoarseFilterSpec) -> tuple[list[Any], list[dict]]:
    """(records, raw dicts) of every input file, in order. A raw record without a
    ``data_source`` gets its file's stem, the name training would have given it, so that the
    reward function sees the same data_source when it is read back from the output file."""
    records, raws = [], []
    for path in spec.train_files:
        stem = os.path.splitext(os.path.basename(path))[0]
        count = 0
        for where, raw in _iter_raw(path):
            records.append(_to_record(raw, where, count, stem, spec.prompt_key, spec.answer_key))
            raw = dict(raw)
            raw.setdefault("data_source", stem)
            raws.append(raw)
            count += 1
        if count == 0:
            raise DataError(f"{path}: no records")
    return records, raws


def _write_atomic(path: str, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``: never a half-written file (``icpo._io``)."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def _write_records(path: str, rows: list[dict]) -> None:
    if path.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        _write_atomic(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))
        return

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _write_atomic(path, write)


def filter_coarse(spec: CoarseFilterSpec) -> dict[str, Any]:
    """Run the pass described by ``spec``; write the kept records and the summary; return it.

    Summary keys: ``prompts`` (records read), ``skipped_overlong`` (not judged, not written),
    ``judged``, ``kept`` = ``all_correct`` + ``all_wrong``, ``dropped_mixed``,
    ``kept_fraction`` (of judged), ``correct_histogram`` (prompts by number of correct
    responses 0..G), ``response_accuracy``, and the settings used.
    """
    import torch

    from icpo.config import DataConfig, RewardConfig
    from icpo.models import resolve_model_path
    from icpo.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
    from icpo.rewards import RewardFn
    from icpo.rollout import SamplingParams
    from icpo.rollout.hf import HFRolloutEngine

    spec.validate()
    try:
        reward_fn = RewardFn(RewardConfig(function=spec.reward_function,
                                          answer_weight=spec.answer_weight,
                                          format_weight=spec.format_weight))
    except (ImportError, AttributeError, TypeError, ValueError, FileNotFoundError) as e:
        raise CoarseFilterError(f"reward: {e}") from e
    records, raws = _read(spec)
    raw_of = {id(rec): raw for rec, raw in zip(records, raws)}
    if not os.path.isdir(resolve_model_path(spec.model)):
        raise CoarseFilterError(f"model: folder not found: {spec.model!r}")
    from icpo.models.check import check_model_folder

    check_model_folder(resolve_model_path(spec.model), "model")  # before any weights load
    tokenizer = load_tokenizer(spec.model)
    data_cfg = DataConfig(template=spec.template, max_prompt_length=spec.max_prompt_length,
                          overlong_prompts="skip")
    dataset = PromptDataset(records, tokenizer, data_cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(spec.model, resolve_dtype("auto", device), device)
    engine = HFRolloutEngine(model, tokenizer, batch_size=spec.batch_size)
    params = SamplingParams(n=spec.n, temperature=float(spec.temperature), top_p=1.0, top_k=-1,
                            max_new_tokens=spec.max_new_tokens, seed=spec.seed)
    out = engine.generate([it.prompt_ids for it in dataset.items], params)
    texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
    correct = reward_fn([it.record for it in dataset.items], texts).acc.bool().view(-1, spec.n)

    counts = {"all_correct": 0, "all_wrong": 0, "mixed": 0}
    histogram = [0] * (spec.n + 1)
    kept_ids = set()
    for item, flags in zip(dataset.items, correct.tolist()):
        outcome = group_outcome(flags)
        counts[outcome] += 1
        histogram[sum(flags)] += 1
        if outcome != "mixed":
            kept_ids.add(id(item.record))
    kept_rows = [raw_of[id(rec)] for rec in records if id(rec) in kept_ids]
    judged = len(dataset.items)
    summary = {
        "output": spec.output, "model": spec.model, "train_files": list(spec.train_files),
        "n": spec.n, "temperature": float(spec.temperature), "max_new_tokens": spec.max_new_tokens,
        "seed": spec.seed, "reward_function": spec.reward_function, "template": spec.template,
        "prompts": len(records), "skipped_overlong": dataset.num_skipped, "judged": judged,
        "kept": len(kept_rows), "all_correct": counts["all_correct"],
        "all_wrong": counts["all_wrong"], "dropped_mixed": counts["mixed"],
        "kept_fraction": len(kept_rows) / judged,
        "correct_histogram": histogram,
        "response_accuracy": float(correct.double().mean()),
        **({"extra": spec.extra} if spec.extra else {}),
    }
    _write_atomic(spec.summary_path, lambda tmp: _write_json(tmp, summary))
    if not kept_rows:
        raise DataError(f"{spec.output}: not written: all {judged} judged prompts were mixed, "
                        f"nothing to train on (counts in {spec.summary_path})")
    _write_records(spec.output, kept_rows)
    return summary


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


__all__ = ["CoarseFilterError", "CoarseFilterSpec", "OUTPUT_TYPES", "filter_coarse",
           "group_outcome"]
