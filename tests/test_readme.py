"""Every command in README.md works as written: each is run here in a cheap form (tiny data, one
step, ``--help`` for the long experiment script), in a fresh folder that holds only what a clone
has, so a README command cannot rot unnoticed. Set-up commands (venv, pip, pytest) are what
``.ci/run`` runs; GPU launches are checked as far as a CPU allows (their script and config)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from icpo.config import load_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
_RENDEZVOUS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}

# What turns a README training command into a one-step run on 4 prompts x 2 responses.
CHEAP_TRAIN = ["trainer.total_steps=1", "trainer.train_batch_size=4", "actor.ppo_mini_batch_size=4",
               "rollout.n=2", "rollout.max_response_length=8", "data.val_max_samples=4",
               "trainer.progress_bar=false"]
FULL_RUN_CHECKPOINT, CHEAP_CHECKPOINT = "step_000120", "step_000001"
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "pytest")


def readme_commands() -> list[str]:
    """The shell commands of README.md's ```bash blocks: continuation lines joined, comments
    dropped, ``&&`` chains split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in line.split("&&")]
    return commands


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"{shlex.join(argv)} failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def _with_overrides(args: list[str], extra: list[str]) -> list[str]:
    """``extra`` overrides inserted before any ``--resume`` (whose optional PATH would take
    them)."""
    at = args.index("--resume") if "--resume" in args else len(args)
    return args[:at] + extra + args[at:]


def cheap(command: str) -> list[str] | None:
    """The command to run for a README command, or None for set-up / GPU-only commands (which
    the other tests check). Unknown commands fail: add their cheap form here."""
    if command.startswith(SETUP):
        return None
    args = shlex.split(command)
    if args[0] == "icpo":
        base = [sys.executable, "-m", "icpo.cli", *args[1:]]
        if args[1:3] == ["data", "make-arithmetic"]:
            return base + ["--train", "8", "--val", "4"]
        if args[1] == "train":
            # A resume that extends the finished one-step run must say how the schedules continue.
            steps = (["trainer.total_steps=2", "trainer.resume_total_steps=rescale"]
                     if "--resume" in args else CHEAP_TRAIN)
            return _with_overrides(base, steps)
        if args[1] == "eval":
            base = [a.replace(FULL_RUN_CHECKPOINT, CHEAP_CHECKPOINT) for a in base]
            return base + ["--max-samples", "2", "--max-new-tokens", "8", "--no-progress"]
    if args[0] == "python" and args[1] == "examples/train_icpo.py":
        return [sys.executable, *args[1:], "--train-size", "8", "--val-size", "4", *CHEAP_TRAIN]
    if args[0] == "python" and args[1] == "experiments/run_experiments.py":
        return [sys.executable, *args[1:], "--help"]
    if args[0] in ("torchrun", "deepspeed"):
        return None
    raise AssertionError(f"README command without a cheap form in tests/test_readme.py: {command}")


def test_every_readme_command_has_a_cheap_form():
    commands = readme_commands()
    assert any(c.startswith("icpo train") for c in commands)
    for command in commands:
        cheap(command)  # raises for an unknown command


def test_readme_setup_is_what_ci_runs():
    """The README's test line is the one .ci/run executes (set-up cannot be rerun here)."""
    ci = (REPO / ".ci" / "run").read_text()
    test_lines = [ln for ln in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
                  if ln.strip().endswith("pytest -q")]
    assert len(test_lines) == 1 and test_lines[0].strip() in ci


def test_gpu_launch_commands_name_real_scripts_and_configs():
    for command in readme_commands():
        args = shlex.split(command)
        if args[0] not in ("torchrun", "deepspeed"):
            continue
        script = next(a for a in args if a.endswith(".py"))
        assert (REPO / script).is_file(), command
        if "--config" in args:
            config = args[args.index("--config") + 1]
            if (REPO / config).is_file():  # my.yaml is the reader's own
                overrides = [a for a in args[args.index(config) + 1:] if "=" in a]
                load_config(REPO / config, overrides)


@pytest.mark.slow
def test_readme_commands_run_in_a_fresh_folder(tmp_path):
    """In README order, in a folder with only the clone's ``examples/`` (as after ``git clone``
    and ``cd``): later commands use what earlier ones wrote (data, outputs, checkpoints)."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    ran = []
    for command in readme_commands():
        argv = cheap(command)
        if argv is not None:
            _run(argv, tmp_path)
            ran.append(command.split()[0:2])
    assert ["icpo", "eval"] in ran and ["icpo", "train"] in ran and ["icpo", "data"] in ran
