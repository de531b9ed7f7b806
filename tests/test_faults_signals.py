"""SIGTERM (what Slurm, Kubernetes and torchrun send before a kill) stops training as Ctrl-C
does: the running step is finished (during its update) or abandoned (before it), the last
finished step is saved, one line says where and how to resume, and the exit status is 143. Under
torchrun every rank stops after the same step and the run is saved."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from launch import clean_env, free_port

from icpo.config import config_from_dict
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer import Trainer
from icpo.trainer.interrupt import InterruptGuard, TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("arith")
    write_jsonl(make_records("train", 16), d / "train.jsonl")
    return d / "train.jsonl"


def config(model: Path | str, train: Path, out: Path, **trainer) -> dict:
    """4 prompts x G=2 per step, short responses: a few seconds per step on one thread."""
    return {"model": {"path": str(model), "dtype": "float32"},
            "data": {"train_files": [str(train)], "max_prompt_length": 256},
            "rollout": {"engine": "hf", "n": 2, "max_response_length": 16},
            "algorithm": {"name": "icpo", "delta": 0.5},
            "actor": {"lr": 1e-3, "ppo_mini_batch_size": 2, "max_tokens_per_micro_batch": 256},
            "trainer": {"total_steps": 3, "train_batch_size": 4, "output_dir": str(out),
                        "save_every": 0, "eval_every": 0, "device": "cpu",
                        "progress_bar": False, "num_threads": 1, **trainer}}


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.models.actor.module.state_dict().items()}


# ----------------------------------------------------------------------------- the guard

@pytest.fixture
def python_handlers():
    """Python's own dispositions for the test, whatever this process inherited."""
    old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                               (signal.SIGTERM, signal.SIG_DFL))}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def test_guard_takes_sigterm_like_ctrl_c_and_gives_the_handlers_back(python_handlers):
    with InterruptGuard(lambda: True) as guard:
        signal.raise_signal(signal.SIGTERM)  # during an update: only recorded
        assert guard.requested and guard.exit_code == 143 and guard.name == "SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # a repeat (scheduler + launcher): ignored
        with pytest.raises(KeyboardInterrupt):  # a Ctrl-C after it: stop at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with InterruptGuard(lambda: False) as guard:  # outside an update: abandon the step
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # while unwinding: ignored
    assert guard.exit_code == 143

    with InterruptGuard(lambda: False, world=2) as guard:  # several processes: never at once
        signal.raise_signal(signal.SIGTERM)
        assert guard.requested
    with InterruptGuard(lambda: True) as guard:
        signal.raise_signal(signal.SIGINT)
        assert guard.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_sigterm_before_the_update_saves_the_last_step(tiny_random_model_dir, data, tmp_path,
                                                       monkeypatch, capsys, python_handlers):
    cfg = config_from_dict(config(tiny_random_model_dir, data, tmp_path / "b"))
    real_rewards = Trainer._rewards

    def sigterm_after_sampling(self, ro, step, *args):
        if step == 1:  # step 2 has drawn its prompts: the sampler must be rewound
            signal.raise_signal(signal.SIGTERM)
        return real_rewards(self, ro, step, *args)

    monkeypatch.setattr(Trainer, "_rewards", sigterm_after_sampling)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(cfg).train()
    saved = tmp_path / "b" / "checkpoints" / "step_000001"
    assert info.value.exit_code == 143 and info.value.checkpoint == str(saved)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"icpo: stopped by SIGTERM after step 1/3; saved {saved}; resume: icpo "
                    f"train --config {tmp_path / 'b'}/config.yaml --resume")
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["step"] == 1


# ----------------------------------------------------------------------------- real processes

# `icpo train` whose second step's update waits until this rank's SIGTERM handler has run, so
# the signal lands in the update for sure; it records the exit status each rank ends with.
RUNNER = """
import os, signal, sys, time
from pathlib import Path
import icpo.trainer.distributed as dist
from icpo.trainer.trainer import Trainer

flags = Path(os.environ["ICPO_TEST_FLAGS"])
rank = os.environ.get("RANK", "0")
real_update, real_exit = Trainer._update, dist.exit_launched_process

def update_waiting_for_sigterm(self, *a, **k):
    if self.step == 1:
        guard = signal.getsignal(signal.SIGTERM).__self__
        (flags / f"in_update_rank{rank}").touch()
        deadline = time.monotonic() + 300
        while not guard.requested and time.monotonic() < deadline:
            time.sleep(0.05)
    return real_update(self, *a, **k)

def recorded_exit(code=0):
    (flags / f"exit_rank{rank}").write_text(str(code))
    real_exit(code)

Trainer._update, dist.exit_launched_process = update_waiting_for_sigterm, recorded_exit
from icpo import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def start(cmd: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    flags = tmp_path / "flags"
    flags.mkdir()
    env = {**clean_env(), "ICPO_TEST_FLAGS": str(flags)}
    proc = subprocess.Popen([c if c != "RUNNER" else str(runner) for c in cmd], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, flags


def wait_for(paths: list[Path], proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{paths} not there after 600 s"
        time.sleep(0.1)


def stopped_line(stderr: str) -> str:
    # torchrun itself ends with its SignalException's traceback; none may come from icpo.
    frames = [ln for ln in stderr.splitlines() if ln.strip().startswith('File "')]
    assert not any("/icpo/" in f for f in frames), stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("icpo: stopped by SIGTERM")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_sigterm_during_an_update_of_icpo_train_saves_and_resumes_exactly(
        tiny_random_model_dir, data, tmp_path, one_thread):
    """One process: SIGTERM in step 2's update; the step is finished and saved, exit 143; a
    resume from that checkpoint ends with the weights of an uninterrupted run."""
    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tiny_random_model_dir, data, out)))
    proc, flags = start([sys.executable, "RUNNER", "train", "--config", str(path)], tmp_path)
    wait_for([flags / "in_update_rank0"], proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "icpo: SIGTERM: finishing this step's update" in stderr
    saved = out / "checkpoints" / "step_000002"
    assert stopped_line(stderr) == (f"icpo: stopped by SIGTERM after step 2/3; saved {saved}; "
                                    f"resume: icpo train --config {out}/config.yaml --resume")
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == 2

    straight = Trainer(config_from_dict(config(tiny_random_model_dir, data, tmp_path / "a")))
    straight.train()
    resumed = Trainer(config_from_dict(config(tiny_random_model_dir, data, out)), resume="auto")
    assert resumed.step == 2
    resumed.train()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_and_saves(
        tiny_random_model_dir, data, tmp_path, one_thread):
    """torchrun, 2 ranks on gloo: SIGTERM to the launcher, which forwards it to both workers
    during step 2's update. Both finish the step, agree to stop, save it, and exit 143."""
    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tiny_random_model_dir, data, out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "--shutdown_timeout", "300", "RUNNER",
           "train", "--config", str(path)]
    proc, flags = start(cmd, tmp_path)
    wait_for([flags / "in_update_rank0", flags / "in_update_rank1"], proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert [(flags / f"exit_rank{r}").read_text() for r in (0, 1)] == ["143", "143"], \
        stderr[-3000:]
    saved = out / "checkpoints" / "step_000002"
    assert stopped_line(stderr).startswith(f"icpo: stopped by SIGTERM after step 2/3; saved "
                                           f"{saved}; resume: ")
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
