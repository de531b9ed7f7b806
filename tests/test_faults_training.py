"""Fault injection, part 2 (issue 13 cases 1 and 3-5 once training runs): non-finite updates
skipped without touching the optimizer, a destroyed policy stopping the run, no checkpoint from
non-finite weights, ``kill -9`` while a checkpoint is written, and one-line errors with exit
status 2 from every rank of a two-process torchrun.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from launch import clean_env, free_port

from icpo.config import config_from_dict
from icpo.errors import TrainingStopped
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer import Trainer
from icpo.trainer.guard import Guard, optimizer_step
from icpo.trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
S = ["rollout.n=4", "rollout.max_response_length=24", "trainer.train_batch_size=4",
     "actor.ppo_mini_batch_size=4"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults_training") / "train.jsonl"
    write_jsonl(make_records("train", 8), path)
    return path


def tiny(train_file: Path, out: Path) -> dict:
    return {"model": {"path": "icpo/tiny", "dtype": "float32"},
            "data": {"train_files": [str(train_file)], "max_prompt_length": 256},
            "rollout": {"engine": "hf"}, "actor": {"kl_coef": 0.0},
            "trainer": {"total_steps": 2, "output_dir": str(out), "save_every": 1,
                        "eval_every": 0, "device": "cpu", "progress_bar": False}}


def make_cfg(train_file: Path, out: Path, *overrides: str):
    return config_from_dict(tiny(train_file, out), [*S, *overrides])


def checkpoint_weights_finite(folder: Path) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model" / "model.safetensors")
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def optimizer_state(trainer: Trainer) -> list[torch.Tensor]:
    opt = trainer.models.optimizer
    return [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


# ----------------------------------------------------------------------------- case 1

def test_huge_lr_never_checkpoints_non_finite_weights(train_file, tmp_path):
    """The issue's ``actor.lr=1e30 actor.grad_clip=0 trainer.total_steps=4 save_every=1``:
    step 1's update leaves finite (~1e30) weights under which the policy is uniform; the run
    stops there with a clear message, no checkpoint is written and ``latest`` never exists."""
    out = tmp_path / "run"
    cfg = make_cfg(train_file, out, "actor.lr=1e30", "actor.grad_clip=0",
                   "trainer.total_steps=4", "trainer.save_every=1")
    with pytest.raises(TrainingStopped, match=r"stopped at step 1: .*uniform.*not checkpointed"):
        Trainer(cfg).train()
    ck = out / "checkpoints"
    assert not (ck / "latest").exists()
    assert not [p for p in ck.glob("step_*")] if ck.exists() else True
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(train_file, tmp_path, monkeypatch):
    """The loss turns NaN from step 2 on (injected): steps 2 and 3 are skipped without touching
    weights, Adam's moments or the lr schedule; the second consecutive skip
    (trainer.max_skipped_steps=2) stops the run."""
    import icpo.trainer.update as update_mod

    out = tmp_path / "run"
    cfg = make_cfg(train_file, out, "actor.lr=1e-3", "trainer.total_steps=5",
                   "trainer.save_every=0", "trainer.max_skipped_steps=2")
    trainer = Trainer(cfg)
    real_loss, snapshots = update_mod.grpo_loss, {}

    def poisoned_loss(*a, **k):
        loss, m = real_loss(*a, **k)
        return (loss * float("nan"), m) if trainer.step >= 1 else (loss, m)

    real_step = Trainer.train_step

    def spy(self):
        result = real_step(self)
        params = [p.detach().clone() for p in self.models.actor.module.parameters()]
        snapshots[self.step + 1] = (params, optimizer_state(self), self.models.scheduler.last_epoch)
        return result

    monkeypatch.setattr(update_mod, "grpo_loss", poisoned_loss)
    monkeypatch.setattr(Trainer, "train_step", spy)
    with pytest.raises(TrainingStopped, match=r"stopped at step 3: 2 consecutive .* skipped"):
        trainer.train()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["guard/skipped_steps"] == 0 and rows[1]["guard/skipped_steps"] == 1
    assert rows[1]["guard/skipped_total"] == 1
    assert trainer.models.actor.skipped_steps == 2
    (w1, m1, s1), (w2, m2, s2) = snapshots[1], snapshots[2]
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))  # skipped: weights untouched
    assert all(torch.equal(a, b) for a, b in zip(m1, m2))  # ... and Adam's moments
    assert s1 == s2  # ... and the lr schedule
    now = [p.detach() for p in trainer.models.actor.module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(w1, now))


@pytest.mark.parametrize("stage", [0, 2])
def test_optimizer_step_skips_a_nan_gradient(train_file, tmp_path, stage):
    """One NaN in one parameter's gradient: no weight, moment or schedule changes (ZeRO-0 by our
    check before step(), ZeRO-2 by DeepSpeed's overflow path); a finite one is applied."""
    cfg = make_cfg(train_file, tmp_path / "run", f"trainer.zero_stage={stage}")
    trainer = Trainer(cfg)
    actor, module = trainer.models.actor, trainer.models.actor.module
    ids = torch.tensor([[5, 6, 7, 8]])

    def backward(poison: bool) -> None:
        loss = module(input_ids=ids).logits.float().pow(2).mean()
        if poison:  # NaN reaches one parameter's gradient only
            loss = loss + module.model.norm.weight.sum() * float("nan")
        actor.backward(loss, scale_wrt_gas=False)

    before_w = [p.detach().clone() for p in module.parameters()]
    before_m, before_s = optimizer_state(trainer), trainer.models.scheduler.last_epoch
    backward(poison=True)
    assert optimizer_step(actor, False)[0] is True
    assert all(torch.equal(a, b.detach()) for a, b in zip(before_w, module.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_m, optimizer_state(trainer)))
    assert trainer.models.scheduler.last_epoch == before_s and actor.skipped_steps == 1
    backward(poison=False)
    assert optimizer_step(actor, False)[0] is False
    assert not all(torch.equal(a, b.detach()) for a, b in zip(before_w, module.parameters()))


def test_guard_collapse_sentinel_and_skip_counter():
    module = torch.nn.Linear(2, 2)
    guard = Guard(max_skipped_steps=3, collapse_entropy_frac=0.99, vocab_size=100)
    guard.check_policy(1, math.log(100), module)  # starts uniform (random init): not flagged
    guard.check_policy(2, 1.0, module)
    with pytest.raises(TrainingStopped, match="collapsed to uniform"):
        guard.check_policy(3, 0.995 * math.log(100), module)
    guard.record(True, 1)
    guard.record(True, 2)
    guard.record(False, 3)  # a good step resets the run of skips
    guard.record(True, 4)
    guard.record(True, 5)
    with pytest.raises(TrainingStopped, match="3 consecutive"):
        guard.record(True, 6)
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    with pytest.raises(TrainingStopped, match="weights hold NaN"):
        Guard(3, 0.0, 100).check_policy(7, 1.0, module)


def test_skipped_prompts_are_counted_and_reported(train_file, tmp_path, capsys):
    from icpo.data import PromptDataset, load_records
    from icpo.models.loading import load_tokenizer

    cfg = make_cfg(train_file, tmp_path / "probe")
    lengths = sorted(len(it.prompt_ids) for it in PromptDataset(
        load_records(train_file), load_tokenizer("icpo/tiny"), cfg.data).items)
    limit = lengths[len(lengths) // 2]
    expected = sum(n > limit for n in lengths)
    assert 0 < expected < len(lengths)
    cfg = make_cfg(train_file, tmp_path / "run", f"data.max_prompt_length={limit}",
                   "trainer.total_steps=1")
    Trainer(cfg).train()
    assert f"skipped {expected} training" in capsys.readouterr().err
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["data/skipped_prompts"] == expected


# ----------------------------------------------------------------------------- subprocesses

_env = clean_env


_DIE_IN_CHECKPOINT = """
import os, signal, sys
import icpo.trainer.checkpoint as ck
calls, real = [0], ck.rng_state
def dying():  # runs after the model and DeepSpeed state are in .step_k.tmp, before the rename
    calls[0] += 1
    if calls[0] == int(os.environ["ICPO_TEST_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real()
ck.rng_state = dying
from icpo import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_then_resume_is_exact(train_file, tmp_path, capsys):
    """``kill -9`` while step 2's checkpoint is being written: ``latest`` still names step 1,
    the half-written folder is removed at the next start, and ``--resume`` finishes with the
    same weights as an uninterrupted run and a history whose step 2 is the redone one."""
    straight = Trainer(make_cfg(train_file, tmp_path / "straight"))
    straight.train()
    out = tmp_path / "killed"
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(tiny(train_file, out)))
    env = {**_env(), "ICPO_TEST_KILL_AT": "2"}
    proc = subprocess.run([sys.executable, "-c", _DIE_IN_CHECKPOINT, "train", "--config",
                           str(config), *S], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step_000001"
    assert (ck / ".step_000002.tmp" / "model").is_dir() and not (ck / "step_000002").exists()
    capsys.readouterr()
    resumed = Trainer(make_cfg(train_file, out), resume="auto")
    assert "removed incomplete .step_000002.tmp" in capsys.readouterr().err
    assert resumed.step == 1
    resumed.train()
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000001", "step_000002"]
    a = straight.models.actor.module.state_dict()
    b = resumed.models.actor.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["reward/mean"] for r in rows] == \
        [r["reward/mean"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]


_free_port = free_port


@pytest.mark.slow
@pytest.mark.parametrize("case", ["before_setup", "after_setup"])
def test_two_processes_print_one_line_and_exit_2(train_file, tmp_path, case):
    """torchrun, 2 ranks on gloo: a folder holding another run (found before any set-up) and a
    run stopped by the guard (after the process group exists) end both ranks with the one-line
    error and status 2, without a traceback from icpo."""
    out = tmp_path / "run"
    extra = []
    if case == "before_setup":
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
    else:
        extra = ["actor.lr=1e30", "actor.grad_clip=0"]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny(train_file, out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "icpo.cli", "train", "--config", str(config),
           *S, "trainer.train_batch_size=4", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "icpo train: error:" in ln]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert ("holds another run" if case == "before_setup" else "stopped at step 1") in errors[0]
    frames = [ln for ln in proc.stderr.splitlines() if ln.startswith('  File "')]
    assert 'icpo/' not in "".join(frames)
    assert "exitcode  : 2" in proc.stderr or "exit code 2" in proc.stderr.lower() or \
        "returned non-zero exit status 2" in proc.stderr, proc.stderr[-3000:]
    if case == "after_setup":
        assert not (out / "checkpoints" / "latest").exists()
