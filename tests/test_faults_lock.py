"""An output folder belongs to one run at a time: rank 0 takes ``.icpo.lock`` (an exclusive
flock) in preflight and holds it until its process ends. A second run is refused with the
first's PID; the file left by a killed run holds no lock and is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from icpo.config import config_from_dict
from icpo.errors import UserError
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer import run_folder
from icpo.trainer.preflight import preflight

REPO = Path(__file__).resolve().parents[1]
_RENDEZVOUS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}

HOLD = """
import sys, time
from pathlib import Path
from icpo.trainer import run_folder
run_folder.claim(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(3600)
"""


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    e["OMP_NUM_THREADS"] = "1"
    return e


def hold(folder: Path) -> subprocess.Popen:
    """Another process that claims ``folder`` and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_folder_is_refused_with_the_holders_pid_and_a_killed_holder_is_not(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    other = hold(folder)
    try:
        with pytest.raises(UserError) as info:
            run_folder.claim(folder)
        msg = str(info.value)
        assert f"is in use by another run (PID {other.pid} on " in msg and "\n" not in msg, msg
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    lock = folder / run_folder.LOCK_FILE
    assert lock.read_text().split()[0] == str(other.pid)  # the stale file is still there
    assert run_folder.claim(folder) is None  # ... and holds no lock
    assert lock.read_text().split()[0] == str(os.getpid())
    assert run_folder.claim(folder) is None  # this process again: a no-op


def test_preflight_claims_on_rank_0_only(tmp_path, monkeypatch, tiny_random_model_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(make_records("train", 4), data)
    folder = tmp_path / "run"
    folder.mkdir()
    cfg = config_from_dict({"model": {"path": str(tiny_random_model_dir)},
                            "data": {"train_files": [str(data)]},
                            "trainer": {"output_dir": str(folder), "device": "cpu"}})
    other = hold(folder)
    try:
        monkeypatch.setenv("RANK", "1")  # another rank of a run whose rank 0 holds the folder
        preflight(cfg)
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError, match=f"PID {other.pid}"):
            preflight(cfg)
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    preflight(cfg)  # the stale lock of the killed process does not block
    assert (folder / run_folder.LOCK_FILE).read_text().split()[0] == str(os.getpid())


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    run_folder.claim(folder)
    pid = os.fork()
    if pid == 0:  # the child must not hold the parent's lock descriptor
        os._exit(0 if not run_folder._held else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


@pytest.mark.slow
def test_two_concurrent_icpo_train_runs_into_one_folder(tmp_path):
    """Two real ``icpo train`` started at once: exactly one trains, the other exits 2 naming
    the first's PID; the folder's lock file left by killing the winner does not block."""
    data = tmp_path / "train.jsonl"
    write_jsonl(make_records("train", 16), data)
    out = tmp_path / "run"
    cfg = {"model": {"path": "icpo/tiny", "dtype": "float32"},
           "data": {"train_files": [str(data)], "max_prompt_length": 256},
           "rollout": {"engine": "hf", "n": 2, "max_response_length": 8},
           "actor": {"ppo_mini_batch_size": 2, "max_tokens_per_micro_batch": 256},
           "trainer": {"total_steps": 1000, "train_batch_size": 4, "output_dir": str(out),
                       "save_every": 0, "eval_every": 0, "device": "cpu", "progress_bar": False,
                       "num_threads": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "icpo.cli", "train", "--config", str(path)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 600
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither run was refused in 600 s"
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate()
        assert loser.returncode == 2, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith("icpo train: error: trainer.output_dir: "), err
        assert f"in use by another run (PID {winner.pid} on " in lines[0], err
        metrics = out / "metrics.jsonl"  # the winner trains on
        while not (metrics.exists() and metrics.read_text().strip()):
            assert winner.poll() is None, winner.communicate()
            assert time.monotonic() < deadline, "the winner logged no step in 600 s"
            time.sleep(0.5)
        steps = [ln for ln in metrics.read_text().splitlines() if '"step": 1,' in ln]
        assert len(steps) == 1  # one run's history, not two interleaved
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()
    assert (out / run_folder.LOCK_FILE).read_text().split()[0] == str(winner.pid)
    # The killed winner's lock file does not block the next run (which replaces its files).
    preflight(config_from_dict(cfg), overwrite=True)
    assert (out / run_folder.LOCK_FILE).read_text().split()[0] == str(os.getpid())
