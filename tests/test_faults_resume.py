"""Fault injection: resume semantics of the optimizer fields a warning names, a full disk during
a checkpoint, a resume from a truncated or missing DeepSpeed state (issue 22). Real 2-step runs
of the bundled tiny model with the small settings of test_faults.py.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from icpo.config import config_from_dict
from icpo.errors import UserError
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer import Trainer
from icpo.trainer import checkpoint as ckpt
from icpo.trainer.metrics import read_metrics

S = ["rollout.n=4", "rollout.max_response_length=16", "trainer.train_batch_size=4",
     "actor.ppo_mini_batch_size=4"]


def cfg_of(data: Path, out: Path, *overrides: str):
    d = {"model": {"path": "icpo/tiny", "dtype": "float32"},
         "data": {"train_files": [str(data / "train.jsonl")], "max_prompt_length": 256},
         "rollout": {"engine": "hf"},
         "trainer": {"total_steps": 2, "output_dir": str(out), "save_every": 1,
                     "eval_every": 0, "device": "cpu", "progress_bar": False}}
    return config_from_dict(d, [*S, *overrides])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume_faults")
    write_jsonl(make_records("train", 8), d / "train.jsonl")
    return d


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints after steps 1 and 2 (lr 1e-6, the default)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(cfg_of(data, out)).train()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_changed_optimizer_settings_apply_on_resume(data, finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    cfg = cfg_of(data, out, "trainer.total_steps=3", "trainer.resume_total_steps=rescale",
                 "actor.lr=5e-6", "actor.betas=[0.8, 0.99]", "actor.weight_decay=0.01")
    trainer = Trainer(cfg, resume="auto")
    err = capsys.readouterr().err
    assert "actor.lr changed on resume: 1e-06 -> 5e-06; the optimizer continues with the new" in err
    groups = trainer.models.actor.lr_scheduler.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([5e-6] * len(groups), rel=1e-12)
    assert all(tuple(g["betas"]) == (0.8, 0.99) and g["weight_decay"] == 0.01 for g in groups)
    trainer.train()
    step3 = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step") == 3]
    assert step3 and step3[-1]["actor/lr"] == pytest.approx(5e-6, rel=1e-12)
    resumed_state = torch.load(out / "checkpoints" / "step_000003" / "deepspeed" / "state"
                               / "mp_rank_00_model_states.pt", weights_only=False)
    assert resumed_state["lr_scheduler"]["base_lrs"] == [pytest.approx(5e-6)]


def test_unchanged_lr_resumes_as_saved(data, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    cfg = cfg_of(data, out, "trainer.total_steps=3", "trainer.resume_total_steps=rescale")
    trainer = Trainer(cfg, resume="auto")
    assert trainer.models.actor.lr_scheduler.optimizer.param_groups[0]["lr"] == 1e-6


def _no_setup(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("set-up started despite a bad checkpoint")

    monkeypatch.setattr("icpo.trainer.trainer.build_training_models", forbidden)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_resume_from_a_damaged_deepspeed_state(data, finished, tmp_path, monkeypatch, damage):
    out = copy_of(finished, tmp_path)
    state = out / "checkpoints" / "step_000002" / "deepspeed" / "state"
    f = state / "mp_rank_00_model_states.pt"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        shutil.rmtree(out / "checkpoints" / "step_000002" / "deepspeed")
    _no_setup(monkeypatch)
    with pytest.raises(UserError) as e:
        Trainer(cfg_of(data, out), resume="auto")
    msg = str(e.value)
    assert "\n" not in msg and "step_000002 is truncated or incomplete" in msg, msg
    assert f"--resume {out / 'checkpoints' / 'step_000001'}" in msg, msg


def test_a_damaged_state_is_also_caught_at_load(data, finished, tmp_path, monkeypatch):
    """The load itself names the checkpoint too (a file damaged after preflight read it)."""
    out = copy_of(finished, tmp_path)
    real = ckpt.check_checkpoint_files
    monkeypatch.setattr(ckpt, "check_checkpoint_files", lambda path: None)
    f = out / "checkpoints" / "step_000001" / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    f.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="step_000001 is truncated or incomplete .*no earlier"):
        Trainer(cfg_of(data, out), resume=str(out / "checkpoints" / "step_000001"))
    monkeypatch.setattr(ckpt, "check_checkpoint_files", real)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0"),
])
def test_disk_full_during_a_checkpoint(data, tmp_path, monkeypatch, error):
    out = tmp_path / "run"
    real_save = torch.save

    def full_at_step_2(obj, f, *a, **k):
        if "step_000002" in str(f):
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_at_step_2)
    with pytest.raises(UserError) as e:
        Trainer(cfg_of(data, out)).train()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no space left on device writing "), msg
    assert "step_000002" in msg
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000001"]  # nothing half-written
    assert (ck / "latest").read_text().strip() == "step_000001"
