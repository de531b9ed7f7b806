"""``icpo train`` / ``icpo eval`` from the command line: invalid configs fail before any work
with the field named; ``eval`` prints one JSON line with mean@k."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from icpo import cli
from icpo.tasks.arithmetic import make_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]
_RENDEZVOUS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m icpo.cli ARGS`` as a fresh process (without rendezvous variables that an
    in-process trainer of another test may have set)."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "icpo.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def config_dict(tmp_path: Path, out: Path) -> dict:
    """A valid tiny config: bundled model, 8 generated prompts, output under ``out``."""
    data = tmp_path / "train.jsonl"
    write_jsonl(make_records("train", 8), data)
    return {"model": {"path": "icpo/tiny"}, "data": {"train_files": [str(data)]},
            "rollout": {"engine": "hf", "n": 2, "max_response_length": 16},
            "actor": {"ppo_mini_batch_size": 4},
            "trainer": {"total_steps": 1, "train_batch_size": 4, "output_dir": str(out),
                        "device": "cpu", "progress_bar": False}}


def write_config(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_bad_value_exits_nonzero_before_any_work(tmp_path):
    out = tmp_path / "never"
    config = write_config(tmp_path, config_dict(tmp_path, out))
    proc = run_cli("train", "--config", str(config), "actor.clip_low=-1")
    assert proc.returncode != 0
    assert "icpo train: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "actor.clip_low" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("where,field", [
    ("override", "actor.clip_lo"), ("yaml", "trainer.totl_steps"), ("value", "rollout.n"),
    ("cross-field", "actor.ppo_mini_batch_size"),
])
def test_config_errors_name_the_field(tmp_path, monkeypatch, capsys, where, field):
    def no_trainer(*a, **k):
        raise AssertionError("Trainer constructed despite an invalid config")

    monkeypatch.setattr("icpo.trainer.Trainer", no_trainer)
    out = tmp_path / "never"
    d = config_dict(tmp_path, out)
    overrides = []
    if where == "override":
        overrides = ["actor.clip_lo=0.1"]  # unknown key
    elif where == "yaml":
        d["trainer"]["totl_steps"] = 3  # unknown key
    elif where == "value":
        d["rollout"]["n"] = 0
    else:
        d["actor"]["ppo_mini_batch_size"] = 3  # not a divisor of train_batch_size 4
    config = write_config(tmp_path, d)
    assert cli.main(["train", "--config", str(config), *overrides]) == 2
    message = capsys.readouterr().err
    assert message.startswith("icpo train: error:") and field in message
    if where in ("override", "yaml"):
        assert "did you mean" in message
    assert not out.exists()


def test_eval_prints_mean_at_1(tmp_path):
    val = tmp_path / "val.jsonl"
    write_jsonl(make_records("val", 24), val)
    proc = run_cli("eval", "--model", "icpo/tiny", "--data", str(val), "--max-samples", "16",
                   "--max-new-tokens", "48")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    acc = result["mean@1"]
    assert 0.0 <= acc <= 1.0
    # The first 16 of 24 prompts, one greedy answer each: a multiple of 1/16.
    assert result["num_prompts"] == 16 and result["n"] == 1
    assert acc * 16 == pytest.approx(round(acc * 16))
