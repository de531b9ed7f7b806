"""Fault injection, the small items of issue 22: ``icpo --version``, reST markup in ``--help``,
``--resume`` followed by an override, the summary of a finished ``icpo train`` and the line a
resume prints, the way on after a stop before any checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from launch import clean_env

from icpo import __version__, cli
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer.interrupt import stop_report


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"icpo {__version__}"


def test_help_has_no_rest_markup():
    parser = cli.build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if a.dest == "command")
    texts += [p.format_help() for p in sub.choices.values()]
    for text in texts:
        assert "``" not in text and ":func:`" not in text, text[:300]
    assert "'icpo train'" in texts[0]


@pytest.mark.parametrize("argv,resume,overrides", [
    (["--resume", "actor.lr=1e-6"], "auto", ["actor.lr=1e-6"]),
    (["--resume", "actor.lr=1e-6", "rollout.n=4"], "auto", ["actor.lr=1e-6", "rollout.n=4"]),
    (["--resume", "out/checkpoints/step_000002", "rollout.n=4"], "out/checkpoints/step_000002",
     ["rollout.n=4"]),
    (["rollout.n=4", "--resume"], "auto", ["rollout.n=4"]),
    (["rollout.n=4"], None, ["rollout.n=4"]),
])
def test_resume_followed_by_an_override(argv, resume, overrides):
    args = cli.build_parser().parse_args(["train", *argv])
    cli.split_resume(args)
    assert (args.resume, args.overrides) == (resume, overrides)


def test_stop_before_any_checkpoint_names_overwrite(capsys, tmp_path):
    cfg = SimpleNamespace(trainer=SimpleNamespace(total_steps=3, save_on_interrupt=True))
    trainer = SimpleNamespace(cfg=cfg, step=0, _updating=False, world=1, rank=0,
                              output_dir=tmp_path / "out", _latest_checkpoint=lambda: None)
    guard = SimpleNamespace(signum=signal.SIGINT, agreed=True, name="SIGINT", exit_code=130)
    stop_report(trainer, guard)
    err = capsys.readouterr().err.strip()
    assert "nothing to save; no checkpoint yet" in err
    assert err.endswith(f"to start again: icpo train --config {tmp_path / 'out'}/config.yaml "
                        "--overwrite"), err


def test_train_prints_a_summary_and_the_resumed_checkpoint(tmp_path):
    write_jsonl(make_records("train", 8), tmp_path / "train.jsonl")
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "icpo/tiny", "dtype": "float32"},
        "data": {"train_files": [str(tmp_path / "train.jsonl")], "max_prompt_length": 256},
        "rollout": {"engine": "hf", "n": 4, "max_response_length": 8},
        "actor": {"ppo_mini_batch_size": 4},
        "trainer": {"total_steps": 1, "train_batch_size": 4, "output_dir": str(out),
                    "save_every": 1, "eval_every": 0, "device": "cpu", "progress_bar": False}}))
    # Fresh processes: the run folder's lock lasts as long as the process that took it.
    first = _icpo("train", "--config", str(config))
    assert f"metrics: {out / 'metrics.jsonl'}" in first.stdout
    assert f"checkpoints: {out / 'checkpoints'} (latest: step_000001)" in first.stdout
    assert "plot: " in first.stdout
    proc = _icpo("train", "--config", str(config), "--resume", "trainer.total_steps=2",
                 "trainer.resume_total_steps=rescale")
    assert f"icpo: resuming from {out / 'checkpoints' / 'step_000001'} (step 1)" in proc.stderr
    assert "(latest: step_000002)" in proc.stdout
    assert Path(out / "checkpoints" / "step_000002").is_dir()


def _icpo(*argv: str) -> subprocess.CompletedProcess:
    # clean_env: without the rendezvous variables an in-process trainer of an earlier test left
    # in os.environ (its MASTER_PORT is still bound by this process: EADDRINUSE in the child).
    proc = subprocess.run([sys.executable, "-m", "icpo.cli", *argv], capture_output=True,
                          text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc
