"""``icpo filter-coarse`` (the paper's coarse-grained data, Table 2): which prompts are kept, the
file and summary written, bad arguments refused before any model loads; and the old per-step
``reward.coarse_filter`` refused in favour of ``reward.drop_mixed_groups``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icpo.config import ConfigError, config_from_dict
from icpo.data import load_records
from icpo.data.coarse import CoarseFilterError, CoarseFilterSpec, filter_coarse, group_outcome
from icpo.tasks.arithmetic import make_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]

# Correctness decided by the prompt's index, not by the sampled text: index % 3 == 0 is always
# correct, 1 always wrong, 2 alternates response by response (RewardFn scores the G responses of
# a prompt consecutively), so a group of an even G is mixed for sure.
REWARD_MODULE = '''
_calls = [0]

def by_index(data_source, solution_str, ground_truth, extra_info=None):
    k = extra_info["index"] % 3
    if k == 2:
        _calls[0] += 1
        acc = _calls[0] % 2
    else:
        acc = 1 - k
    return {"score": 0.1 + 0.9 * acc, "acc": acc}
'''


def _data(tmp_path: Path, n: int = 9, name: str = "train.jsonl") -> Path:
    records = make_records("train", n)
    for i, r in enumerate(records):
        r["extra_info"] = {"index": i}
    path = tmp_path / name
    write_jsonl(records, path)
    return path


def _reward(tmp_path: Path) -> str:
    path = tmp_path / "reward_by_index.py"
    path.write_text(REWARD_MODULE)
    return f"{path}:by_index"


def test_group_outcome():
    assert group_outcome([True] * 5) == "all_correct"
    assert group_outcome([False] * 5) == "all_wrong"
    assert group_outcome([True, False, False]) == "mixed"


def test_keeps_all_correct_and_all_wrong_prompts_in_order(tmp_path):
    data = _data(tmp_path, 9)
    out = tmp_path / "coarse.jsonl"
    spec = CoarseFilterSpec(model="icpo/tiny", train_files=[str(data)], output=str(out), n=4,
                            max_new_tokens=8, seed=3, reward_function=_reward(tmp_path))
    summary = filter_coarse(spec)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["extra_info"]["index"] for r in kept] == [0, 1, 3, 4, 6, 7]
    originals = [json.loads(line) for line in data.read_text().splitlines()]
    # Records are written unchanged (data_source was already set by make_records).
    assert kept == [originals[i] for i in (0, 1, 3, 4, 6, 7)]
    assert summary["judged"] == summary["prompts"] == 9 and summary["skipped_overlong"] == 0
    assert (summary["kept"], summary["all_correct"], summary["all_wrong"],
            summary["dropped_mixed"]) == (6, 3, 3, 3)
    assert summary["correct_histogram"] == [3, 0, 3, 0, 3]
    assert summary["kept_fraction"] == pytest.approx(6 / 9)
    on_disk = json.loads(Path(spec.summary_path).read_text())
    assert on_disk == summary and spec.summary_path == str(out) + ".summary.json"
    assert len(load_records(out)) == 6  # readable as training data


def test_tiny_model_with_the_verifiable_reward_is_consistent_and_seeded(tmp_path):
    data = _data(tmp_path, 12)
    runs = []
    for name in ("a.jsonl", "b.jsonl"):
        spec = CoarseFilterSpec(model="icpo/tiny", train_files=[str(data)],
                                output=str(tmp_path / name), n=4, max_new_tokens=48, seed=7)
        runs.append((filter_coarse(spec), (tmp_path / name).read_text()))
    (summary, text), (summary_b, text_b) = runs
    assert text == text_b  # same seed, same file
    assert {k: v for k, v in summary.items() if k != "output"} == \
        {k: v for k, v in summary_b.items() if k != "output"}
    assert summary["all_correct"] + summary["all_wrong"] + summary["dropped_mixed"] == 12
    assert summary["kept"] == summary["all_correct"] + summary["all_wrong"] == len(
        text.splitlines())
    h = summary["correct_histogram"]
    assert sum(h) == 12 and (h[0], h[-1]) == (summary["all_wrong"], summary["all_correct"])
    assert summary["response_accuracy"] == pytest.approx(
        sum(k * c for k, c in enumerate(h)) / 48)


def test_records_without_data_source_keep_their_file_stem(tmp_path):
    records = make_records("train", 3)
    for i, r in enumerate(records):
        r.pop("data_source", None)
        r["extra_info"] = {"index": 3 * i}  # all always correct
    data = tmp_path / "arith.jsonl"
    write_jsonl(records, data)
    out = tmp_path / "kept.jsonl"
    filter_coarse(CoarseFilterSpec(model="icpo/tiny", train_files=[str(data)], output=str(out),
                                   n=2, max_new_tokens=4, reward_function=_reward(tmp_path)))
    assert [r.data_source for r in load_records(out)] == ["arith"] * 3


def test_parquet_output(tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "coarse.parquet"
    filter_coarse(CoarseFilterSpec(model="icpo/tiny", train_files=[str(_data(tmp_path, 6))],
                                   output=str(out), n=2, max_new_tokens=4,
                                   reward_function=_reward(tmp_path)))
    assert [r.extra_info["index"] for r in load_records(out)] == [0, 1, 3, 4]


def test_nothing_kept_writes_no_data_file(tmp_path):
    records = make_records("train", 2)
    for r in records:
        r["extra_info"] = {"index": 2}  # every group mixed
    data = tmp_path / "train.jsonl"
    write_jsonl(records, data)
    spec = CoarseFilterSpec(model="icpo/tiny", train_files=[str(data)],
                            output=str(tmp_path / "out.jsonl"), n=2, max_new_tokens=4,
                            reward_function=_reward(tmp_path))
    with pytest.raises(ValueError, match="not written: all 2 judged prompts were mixed"):
        filter_coarse(spec)
    assert not (tmp_path / "out.jsonl").exists()
    assert json.loads(Path(spec.summary_path).read_text())["dropped_mixed"] == 2


@pytest.mark.parametrize("change, match", [
    ({"n": 1}, "n: got 1; expected an int >= 2"),
    ({"temperature": 0.0}, "temperature: got 0.0; expected a finite number > 0"),
    ({"max_new_tokens": 0}, "max_new_tokens: got 0"),
    ({"seed": -1}, "seed: got -1"),
    ({"output": "OUT.txt"}, "output: got .*expected a .jsonl or .parquet file name"),
    ({"output": "DATA"}, "output: .* is one of the input files"),
    ({"output": "EXISTS"}, "output: .* exists; pass --overwrite"),
    ({"train_files": ["MISSING"]}, "data file not found"),
    ({"reward_function": "icpo.nope:fn"}, "reward: reward function 'icpo.nope:fn': cannot import"),
    ({"model": "MISSING"}, "model: folder not found"),
])
def test_bad_arguments_are_refused_before_loading(tmp_path, monkeypatch, change, match):
    data = _data(tmp_path, 3)
    (tmp_path / "exists.jsonl").write_text("keep me\n")
    paths = {"OUT.txt": str(tmp_path / "out.txt"), "DATA": str(data),
             "EXISTS": str(tmp_path / "exists.jsonl"), "MISSING": str(tmp_path / "missing")}
    change = {k: ([paths[x] for x in v] if isinstance(v, list) else paths.get(v, v))
              for k, v in change.items()}
    import icpo.models.loading as loading

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    spec = CoarseFilterSpec(**{"model": "icpo/tiny", "train_files": [str(data)],
                               "output": str(tmp_path / "out.jsonl"), **change})
    with pytest.raises(CoarseFilterError, match=match):
        filter_coarse(spec)
    assert (tmp_path / "exists.jsonl").read_text() == "keep me\n"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "icpo.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli(tmp_path):
    data, out = _data(tmp_path, 6), tmp_path / "coarse.jsonl"
    args = ["filter-coarse", "--model", "icpo/tiny", "--data", str(data), "--out", str(out),
            "--n", "2", "--max-new-tokens", "4", "--reward", _reward(tmp_path)]
    proc = _run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (printed["kept"], printed["all_correct"], printed["all_wrong"],
            printed["dropped_mixed"]) == (4, 2, 2, 2)
    again = _run_cli(*args)  # the output exists now
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"icpo filter-coarse: error: output: {str(out)!r} exists; pass --overwrite to replace it"]


def test_overwrite_replaces_both_files(tmp_path):
    data, out = _data(tmp_path, 6), tmp_path / "coarse.jsonl"
    out.write_text("old\n")
    Path(str(out) + ".summary.json").write_text("{}")
    spec = CoarseFilterSpec(model="icpo/tiny", train_files=[str(data)], output=str(out), n=2,
                            max_new_tokens=4, reward_function=_reward(tmp_path), overwrite=True)
    summary = filter_coarse(spec)
    assert len(out.read_text().splitlines()) == summary["kept"] == 4
    assert json.loads(Path(spec.summary_path).read_text()) == summary


@pytest.mark.parametrize("how", ["override", "mapping"])
def test_old_coarse_filter_key_is_refused_with_both_alternatives(how):
    with pytest.raises(ConfigError) as info:
        if how == "override":
            config_from_dict(None, ["reward.coarse_filter=true"])
        else:
            config_from_dict({"reward": {"coarse_filter": True}})
    msg = str(info.value)
    assert "reward.coarse_filter" in msg and "reward.drop_mixed_groups" in msg
    assert "icpo filter-coarse" in msg and "\n" not in msg
    assert config_from_dict(None, ["reward.drop_mixed_groups=true"]).reward.drop_mixed_groups
