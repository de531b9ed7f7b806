"""Ctrl-C during training: a consistent checkpoint, one line saying where and how to resume,
exit status 130, no traceback; a run resumed from that checkpoint equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from icpo.config import config_from_dict
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer import Trainer
from icpo.trainer.interrupt import TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]
_RENDEZVOUS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


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


def test_ctrl_c_before_the_update_saves_the_last_step_and_resumes_exactly(
        tiny_random_model_dir, data, tmp_path, monkeypatch, capsys):
    straight = Trainer(config_from_dict(config(tiny_random_model_dir, data, tmp_path / "a")))
    straight.train()

    cfg = config_from_dict(config(tiny_random_model_dir, data, tmp_path / "b"))
    real_rewards = Trainer._rewards

    def ctrl_c_after_sampling(self, ro, step, *args):
        if step == 1:  # step 2 has drawn its prompts (the sampler moved): Ctrl-C now
            raise KeyboardInterrupt
        return real_rewards(self, ro, step, *args)

    monkeypatch.setattr(Trainer, "_rewards", ctrl_c_after_sampling)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(cfg).train()
    monkeypatch.setattr(Trainer, "_rewards", real_rewards)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    saved = tmp_path / "b" / "checkpoints" / "step_000001"
    assert info.value.checkpoint == str(saved)
    assert line == (f"icpo: interrupted after step 1/3; saved {saved}; resume: icpo train "
                    f"--config {tmp_path / 'b'}/config.yaml --resume")

    resumed = Trainer(cfg, resume="auto")
    assert resumed.step == 1
    resumed.train()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_during_the_update_finishes_the_step(tiny_random_model_dir, data, tmp_path,
                                                    monkeypatch, capsys):
    cfg = config_from_dict(config(tiny_random_model_dir, data, tmp_path / "c"))
    real_update = Trainer._update

    def ctrl_c_in_update(self, *a, **k):
        if self.step == 0:
            signal.raise_signal(signal.SIGINT)  # the handler only records it here
        return real_update(self, *a, **k)

    monkeypatch.setattr(Trainer, "_update", ctrl_c_in_update)
    # Python's own handler, whatever this process inherited (a background job starts with
    # SIGINT ignored, which the guard respects; see the test below).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted) as info:
            Trainer(cfg).train()
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
    err = capsys.readouterr().err
    assert "finishing this step's update" in err
    assert info.value.checkpoint == str(tmp_path / "c" / "checkpoints" / "step_000001")
    saved = tmp_path / "c" / "checkpoints" / "step_000001"
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["step"] == 1
    lines = (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(ln)["step"] for ln in lines]
    assert steps == [1]
    assert restored is signal.default_int_handler  # handler restored


def test_save_on_interrupt_off(tiny_random_model_dir, data, tmp_path, monkeypatch, capsys):
    cfg = config_from_dict(config(tiny_random_model_dir, data, tmp_path / "d",
                                  save_on_interrupt=False))
    real_step = Trainer.train_step

    def ctrl_c_on_step_2(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_on_step_2)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(cfg).train()
    assert info.value.checkpoint is None
    assert not (tmp_path / "d" / "checkpoints").exists()
    err = capsys.readouterr().err
    assert "not saved (trainer.save_on_interrupt=false); no checkpoint yet" in err


@pytest.mark.slow
def test_sigint_to_icpo_train_saves_and_exits_130(tmp_path, data):
    """The real thing: ``icpo train`` in a subprocess, SIGINT once a step is logged."""
    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config("icpo/tiny", data, out, total_steps=1000)))
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "icpo.cli", "train", "--config", str(path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no step logged in 600 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr + stdout
    lines = [ln for ln in stderr.splitlines() if ln.startswith("icpo: interrupted")]
    assert len(lines) == 1 and "; saved " in lines[0] and "--resume" in lines[0], stderr
    saved = Path(lines[0].split("; saved ")[1].split(";")[0])
    state = json.loads((saved / "trainer_state.json").read_text())
    logged = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert state["step"] == logged[-1] >= 1


def test_sigint_is_handled_even_when_inherited_ignored():
    """A background job starts with SIGINT ignored; training still turns ``kill -INT`` into a
    clean stop, and gives the inherited disposition back afterwards."""
    from icpo.trainer.interrupt import InterruptGuard

    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with InterruptGuard(lambda: True) as guard:
            defaults = (signal.SIG_IGN, signal.default_int_handler)
            assert signal.getsignal(signal.SIGINT) not in defaults
            signal.raise_signal(signal.SIGINT)  # during an update: only recorded
        assert guard.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)
