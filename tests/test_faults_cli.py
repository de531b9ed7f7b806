"""User errors at every entry point: one line, exit 2, no traceback, before any model loads.

Duplicate YAML keys are refused; ``icpo eval`` checks all its arguments before torch is
imported; ``icpo data make-arithmetic`` refuses negative counts, an --out that is a file, and
replacing files without --overwrite; ``examples/train_icpo.py`` and ``python -m icpo.cli``
answer user errors as ``icpo train`` does (icpo.errors.run_main)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from icpo import cli
from icpo.config import ConfigError, load_config
from icpo.errors import UserError, is_user_error, run_main

REPO = Path(__file__).resolve().parents[1]
NO_TORCH = "\nimport sys\nprint('torch' in sys.modules)"


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, *args], cwd=kw.pop("cwd", REPO), env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def one_error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The process ended with status 2 and a single ``prog: error: ...`` line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


# ----------------------------------------------------------------------------- duplicate keys

@pytest.mark.parametrize("text, key, line", [
    ("actor:\n  lr: 1.0e-3\ntrainer:\n  total_steps: 2\nactor:\n  kl_coef: 0.1\n", "actor", 5),
    ("actor:\n  lr: 1.0e-3\n  clip_low: 0.2\n  lr: 2.0e-3\n", "lr", 4),
    ("algorithm:\n  omega:\n    omega_max: 1.0\n    omega_max: 0.5\n", "omega_max", 4),
    ("actor: {lr: 1.0e-3, lr: 2.0e-3}\n", "lr", 1),
])
def test_duplicate_yaml_keys_are_refused_with_key_and_line(tmp_path, text, key, line):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: duplicate key {key!r}") and "\n" not in msg, msg


def test_yaml_merge_keys_may_still_be_overridden():
    """``<<: *anchor`` then the same key is YAML's way to override, not a duplicate."""
    import yaml

    from icpo.config.load import _Loader

    data = yaml.load("base: &b {lr: 1, kl_coef: 2}\nactor:\n  <<: *b\n  lr: 3\n", Loader=_Loader)
    assert data["actor"] == {"lr": 3, "kl_coef": 2}


# ----------------------------------------------------------------------------- icpo eval

@pytest.mark.parametrize("flag, value, expected", [
    ("--max-samples", "-1", "expected an integer >= 0"),
    ("--n", "0", "expected an integer >= 1"),
    ("--temperature", "-0.5", "expected a number >= 0"),
    ("--temperature", "nan", "expected a number"),
    ("--max-new-tokens", "0", "expected an integer >= 1"),
    ("--max-prompt-length", "-3", "expected an integer >= 1"),
    ("--batch-size", "0", "expected an integer >= 1"),
    ("--seed", "-1", "expected an integer >= 0"),
    ("--seed", str(2**64), "< 9223372036854775808"),
    ("--threads", "0", "expected an integer >= 1"),
])
def test_eval_checks_every_argument_before_torch_or_the_model(tmp_path, flag, value, expected):
    # A model path that does not exist: the argument must be refused before it is looked at.
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"),
            f"{flag}={value}"]
    proc = run(["-c", f"from icpo import cli\nimport sys\ncode = cli.main({argv!r})\n"
                f"print('torch' in sys.modules)\nsys.exit(code)"])
    line = one_error_line(proc, "icpo eval")
    assert line.startswith(f"icpo eval: error: {flag}: got ") and expected in line, line
    assert proc.stdout.strip() == "False"  # answered before torch (and the model) loaded


# ----------------------------------------------------------------------------- make-arithmetic

def test_make_arithmetic_refuses_to_replace_files_without_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    assert cli.main(["data", "make-arithmetic", "--out", str(out), "--train", "3",
                     "--val", "2"]) == 0
    (out / "train.jsonl").write_text("my own data\n")
    assert cli.main(["data", "make-arithmetic", "--out", str(out), "--train", "3",
                     "--val", "2"]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl" in err and "--overwrite" in err, err
    assert (out / "train.jsonl").read_text() == "my own data\n"  # untouched, val.jsonl too
    assert cli.main(["data", "make-arithmetic", "--out", str(out), "--train", "3", "--val", "2",
                     "--overwrite"]) == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("args, fragment", [
    (["--train", "-5"], "--train: got -5; expected an integer >= 0"),
    (["--val", "-1"], "--val: got -1; expected an integer >= 0"),
    (["--test", "-2"], "--test: got -2"),
])
def test_make_arithmetic_refuses_negative_counts(tmp_path, capsys, args, fragment):
    out = tmp_path / "d"
    assert cli.main(["data", "make-arithmetic", "--out", str(out), *args]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()  # nothing written, not even the folder


def test_make_arithmetic_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert cli.main(["data", "make-arithmetic", "--out", str(f), "--train", "2"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.main(["data", "make-arithmetic", "--out", str(f / "sub"), "--train", "2"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "x"


# ----------------------------------------------------------------------------- one error path

def test_run_main_one_line_for_user_errors_traceback_for_bugs(capsys):
    def user():
        raise UserError("trainer.output_dir: bad")

    assert run_main("prog", user) == 2
    assert capsys.readouterr().err == "prog: error: trainer.output_dir: bad\n"

    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_main("prog", bug)
    assert run_main("prog", lambda: None) == 0 and run_main("prog", lambda: 3) == 3
    assert is_user_error(ConfigError("x")) and is_user_error(FileNotFoundError("x"))
    assert not is_user_error(RuntimeError("x"))


@pytest.mark.parametrize("args, fragment", [
    (["--config", "/no/such/config.yaml"], "config file not found"),
    (["trainer.bogus_key=1"], "unknown config key 'trainer.bogus_key'"),
    (["--train-size", "-3"], "--train-size: got -3"),
])
def test_train_example_answers_user_errors_like_icpo_train(tmp_path, args, fragment):
    out = ["trainer.output_dir=" + str(tmp_path / "run")] if "--config" not in args else []
    proc = run([str(REPO / "examples" / "train_icpo.py"), *args, *out], cwd=tmp_path)
    line = one_error_line(proc, "train_icpo.py")
    assert fragment in line, line
    same = run(["-m", "icpo.cli", "train", *[a for a in args if "size" not in a], *out],
               cwd=tmp_path) if "--train-size" not in args else None
    if same is not None:  # the same cause, the same words, after its own program name
        cause = one_error_line(same, "icpo train").split(": error: ")[1]
        assert cause == line.split(": error: ")[1]


def test_train_example_refuses_another_runs_folder_in_one_line(tmp_path):
    """The quick start run twice: the second is refused with one line, exit 2."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run([str(REPO / "examples" / "train_icpo.py"), f"trainer.output_dir={run_dir}",
                "--train-size", "8", "--val-size", "2"], cwd=tmp_path)
    line = one_error_line(proc, "train_icpo.py")
    assert "holds another run" in line and "--overwrite" in line, line


def test_python_m_arithmetic_answers_like_icpo_data(tmp_path):
    """The task's own ``python -m`` tool: the same checks, the same one-line errors."""
    out = tmp_path / "d"
    tool = ["-m", "icpo.tasks.arithmetic", "--out", str(out), "--train", "3", "--val", "2"]
    assert run(tool).returncode == 0
    (out / "val.jsonl").write_text("mine\n")
    line = one_error_line(run(tool), "python -m icpo.tasks.arithmetic")
    assert "already exist" in line and "--overwrite" in line
    assert (out / "val.jsonl").read_text() == "mine\n"
    line = one_error_line(run([*tool, "--min-ops", "0"]), "python -m icpo.tasks.arithmetic")
    assert "min_ops" in line
    assert run([*tool, "--overwrite"]).returncode == 0
