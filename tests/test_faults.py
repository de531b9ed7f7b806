"""Fault injection, part 1: bad inputs refused before any work, output folders and resume
(issue 13 cases 2-5). Each case asserts the intended behaviour: a one-line error naming the
cause and exit status 2, before the process group or the model exists, with nothing written.
Part 2 (test_faults_training.py) covers the non-finite guard, kills and several processes.

Runs use the bundled tiny model with the issue's small settings ``S``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from icpo import cli
from icpo.config import Config, config_from_dict
from icpo.errors import UserError
from icpo.models import bundled_model_dir
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer import run_folder
from icpo.trainer.metrics import MetricsLogger, read_metrics
from icpo.trainer.preflight import preflight

S = ["rollout.n=4", "rollout.max_response_length=24", "trainer.train_batch_size=4",
     "actor.ppo_mini_batch_size=4"]
"""The issue's small settings on the tiny preset."""

REWARDS = '''
def two_args(solution_str, ground_truth):
    return 1.0
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    write_jsonl(make_records("train", 8), d / "train.jsonl")
    (d / "rewards.py").write_text(REWARDS)
    return d


def tiny(data: Path, out: Path) -> dict:
    return {"model": {"path": "icpo/tiny", "dtype": "float32"},
            "data": {"train_files": [str(data / "train.jsonl")], "max_prompt_length": 256},
            "rollout": {"engine": "hf"},
            "trainer": {"total_steps": 2, "output_dir": str(out), "save_every": 1,
                        "eval_every": 0, "device": "cpu", "progress_bar": False}}


def cfg_of(data: Path, out: Path, *overrides: str) -> Config:
    return config_from_dict(tiny(data, out), [*S, *overrides])


@pytest.fixture
def no_setup(monkeypatch):
    """Fail the test if anything past the pre-flight checks starts."""
    def forbidden(*a, **k):
        raise AssertionError("set-up started despite a bad input")

    monkeypatch.setattr("icpo.trainer.trainer.dist.init_distributed", forbidden)
    monkeypatch.setattr("icpo.trainer.trainer.build_training_models", forbidden)


def train_cli(capsys, data: Path, out: Path, *args: str) -> tuple[int, str]:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(tiny(data, out)))
    code = cli.main(["train", "--config", str(config), *args])
    return code, capsys.readouterr().err


def assert_one_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("icpo: warning:")]
    assert len(lines) == 1 and lines[0].startswith("icpo train: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ----------------------------------------------------------------------------- case 3

def _bad_utf8(data: Path, d: Path) -> str:
    """A copy of the training file with a Latin-1 byte on line 3."""
    lines = (data / "train.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:20] + b"\xe9" + lines[2][20:]
    (d / "latin.jsonl").write_bytes(b"".join(lines))
    return f"data.train_files=[{d / 'latin.jsonl'}]"


@pytest.mark.parametrize("case", [
    "temperature_0", "temperature_tiny", "clip_low_above_1", "reward_module", "reward_attr",
    "reward_signature", "model_missing", "model_hub_id", "output_is_file", "output_under_file",
    "n_1", "data_missing", "data_folder", "data_not_utf8", "missing_package"])
def test_bad_input_is_one_line_before_setup(case, data, tmp_path, capsys, no_setup):
    if case == "missing_package":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            pytest.skip("flash_attn is installed here")
    out = tmp_path / "run"
    args, needles = {
        "temperature_0": (["rollout.temperature=0"], ["rollout.temperature"]),
        "temperature_tiny": (["rollout.temperature=1e-8"], ["rollout.temperature"]),
        "clip_low_above_1": (["actor.clip_low=1.5", "actor.clip_high=2.0"], ["actor.clip_low"]),
        "reward_module": (["reward.function=no_such_module_xyz:score"],
                          ["reward.function", "no_such_module_xyz"]),
        "reward_attr": (["reward.function=icpo.rewards.verifiable:nope"],
                        ["reward.function", "nope"]),
        "reward_signature": ([f"reward.function={data / 'rewards.py'}:two_args"],
                             ["reward.function", "extra_info"]),
        "model_missing": ([f"model.path={tmp_path / 'no_model'}"], ["model.path", "no_model"]),
        "model_hub_id": (["model.path=SomeOrg/NotCachedModel-1B"], ["model.path", "hf download"]),
        "output_is_file": ([], ["trainer.output_dir", "is a file"]),
        "output_under_file": ([f"trainer.output_dir={tmp_path / 'afile' / 'run'}"],
                              ["trainer.output_dir"]),
        "missing_package": (["model.attn_implementation=flash_attention_2"],
                            ["model.attn_implementation", "flash_attn"]),
        "n_1": (["rollout.n=1", "trainer.train_batch_size=4"],
                ["rollout.n", "allow_single_sample"]),
        "data_missing": ([f"data.train_files=[{tmp_path / 'nope.jsonl'}]"], ["nope.jsonl"]),
        "data_folder": ([f"data.train_files=[{tmp_path}]"], [str(tmp_path)]),
        "data_not_utf8": ([_bad_utf8(data, tmp_path)] if case == "data_not_utf8" else [],
                          ["latin.jsonl:3", "UTF-8", "0xe9"]),
    }[case]
    if case == "output_is_file":
        out.write_text("not a folder")
    if case == "output_under_file":
        (tmp_path / "afile").write_text("x")
    if case == "n_1":
        S_n1 = [a for a in S if not a.startswith("rollout.n")]
        code, err = train_cli(capsys, data, out, *S_n1, *args)
    else:
        code, err = train_cli(capsys, data, out, *S, *args)
    assert code == 2
    assert_one_line(err, *needles)
    assert "Repo id" not in err
    if case != "output_is_file":
        assert not out.exists()


def test_n_1_allowed_when_asked(data, tmp_path):
    cfg = cfg_of(data, tmp_path / "run", "rollout.n=1", "rollout.allow_single_sample=true")
    assert cfg.rollout.n == 1


# ----------------------------------------------------------------------------- case 2

def _fake_run(out: Path, step: int | None = 2, cfg: Config | None = None,
              fingerprint: str | None = None) -> None:
    """The files a run leaves, with (``step``) or without a checkpoint, without training."""
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
    (out / "config.yaml").write_text("x: 1\n")
    if step is not None:
        name = f"step_{step:06d}"
        (out / "checkpoints" / name).mkdir()
        state = {"step": step, "sampler": {}, "config": cfg.to_dict() if cfg else {}}
        if fingerprint:
            state["data_fingerprint"] = fingerprint
        (out / "checkpoints" / name / "trainer_state.json").write_text(json.dumps(state))
        ds = out / "checkpoints" / name / "deepspeed" / "state"  # preflight reads its directory
        ds.mkdir(parents=True)
        torch.save({}, ds / "mp_rank_00_model_states.pt")
        (out / "checkpoints" / "latest").write_text(name)


def test_new_run_into_another_runs_folder_is_refused(data, tmp_path, capsys, no_setup):
    out = tmp_path / "run"
    _fake_run(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = train_cli(capsys, data, out, *S)
    assert code == 2
    assert_one_line(err, "holds another run", "--resume", "--overwrite")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_with_nothing_to_resume_keeps_history(data, tmp_path, capsys, no_setup):
    out = tmp_path / "run"
    _fake_run(out, step=None)
    code, err = train_cli(capsys, data, out, *S, "--resume")
    assert code == 2
    assert_one_line(err, "no checkpoint to resume")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "reward/mean": 0.5}\n'


def test_resume_into_an_empty_folder_starts_a_new_run(data, tmp_path, capsys):
    pre = preflight(cfg_of(data, tmp_path / "run"), resume="auto")
    assert pre.checkpoint is None and any("nothing to resume" in n for n in pre.notes)


def test_overwrite_removes_only_run_files(data, tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exclude each other"):
        preflight(cfg_of(data, out), resume="auto", overwrite=True)
    preflight(cfg_of(data, out), overwrite=True)
    # .icpo.lock: the new run's own, held until its process ends (run_folder.claim)
    assert sorted(p.name for p in out.iterdir()) == [".icpo.lock", "notes.txt"]


def test_metrics_are_appended_and_a_torn_line_is_recovered(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')  # killed mid-line
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=4, start_step=2,
                           progress_bar=False, resumed=True)
    logger.log(3, {"a": 30})
    logger.close()
    raw = path.read_text().splitlines()
    assert raw[:2] == ['{"step": 1, "a": 1}', '{"step": 2, "a": 2}']  # nothing rewritten
    assert json.loads(raw[2])["event"] == "resume"
    assert (tmp_path / "metrics.jsonl.torn").read_text() == '{"step": 3, "a"\n'
    assert [(r["step"], r["a"]) for r in read_metrics(path)] == [(1, 1), (2, 2), (3, 30)]


def test_a_resume_supersedes_the_steps_it_redoes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1}, {"step": 2}, {"step": 3, "v": "old"},
            {"step": 2, "event": "resume"}, {"step": 3, "v": "new"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(path) == [{"step": 1}, {"step": 2}, {"step": 3, "v": "new"}]


# ----------------------------------------------------------------------------- case 4

@pytest.mark.parametrize("change,field", [
    ("rollout.n=2", "rollout.n"), ("algorithm.name=grpo", "algorithm.name"),
    (f"model.path={bundled_model_dir()}", "model.path"),
    ("trainer.total_steps=3", "trainer.total_steps"),
    ("algorithm.omega.schedule=constant", "algorithm.omega.schedule"),
    ("actor.ppo_epochs=2", "actor.ppo_epochs")])
def test_resume_refuses_a_changed_must_match_field(data, tmp_path, capsys, no_setup, change, field):
    out = tmp_path / "run"
    saved = cfg_of(data, out)
    _fake_run(out, cfg=saved)
    overrides = [change] + (["rollout.n=2", "trainer.train_batch_size=4"]
                            if "rollout.n" in change else [])
    d = tiny(data, out)
    config = tmp_path / "new.yaml"
    config.write_text(yaml.safe_dump(d))
    code = cli.main(["train", "--config", str(config), *S, *overrides, "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line(err, field)


def test_resume_warns_about_a_changed_lr_and_rescales_when_told(data, tmp_path, capsys):
    out = tmp_path / "run"
    _fake_run(out, cfg=cfg_of(data, out))
    pre = preflight(cfg_of(data, out, "actor.lr=5e-6"), resume="auto")
    assert pre.checkpoint == out / "checkpoints" / "step_000002"
    assert any("actor.lr changed on resume: 1e-06 -> 5e-06" in n for n in pre.notes)
    assert "actor.lr changed on resume" in capsys.readouterr().err
    pre = preflight(cfg_of(data, out, "trainer.total_steps=5",
                           "trainer.resume_total_steps=rescale"), resume="auto")
    assert any("rescaled" in n for n in pre.notes)


def test_resume_with_another_process_count_is_a_warning(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fake_run(out, cfg=cfg_of(data, out))
    state_file = out / "checkpoints" / "step_000002" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "world_size": 2}))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pre = preflight(cfg_of(data, out), resume="auto")
    assert any("with 1 processes from a checkpoint written by 2" in n for n in pre.notes)


def test_resume_refuses_changed_training_data(data, tmp_path):
    out = tmp_path / "run"
    _fake_run(out, cfg=cfg_of(data, out), fingerprint="0" * 64)
    with pytest.raises(UserError, match="training prompts"):
        preflight(cfg_of(data, out), resume="auto")


def test_latest_naming_a_deleted_folder_is_a_clear_error(data, tmp_path):
    out = tmp_path / "run"
    _fake_run(out, cfg=cfg_of(data, out))
    (out / "checkpoints" / "latest").write_text("step_000009")
    with pytest.raises(UserError, match="names 'step_000009', which is missing"):
        preflight(cfg_of(data, out), resume="auto")


def test_stale_temporary_checkpoints_are_cleaned_at_start(data, tmp_path):
    out = tmp_path / "run"
    _fake_run(out, cfg=cfg_of(data, out))
    ck = out / "checkpoints"
    (ck / ".step_000003.tmp" / "model").mkdir(parents=True)  # killed while writing step 3
    # killed between the two renames of a re-saved step 2: the old copy is put back
    (ck / "step_000002").rename(ck / ".step_000002.old")
    pre = preflight(cfg_of(data, out), resume="auto")
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000002"]
    assert pre.checkpoint == ck / "step_000002"


def test_compare_for_resume_lists_every_changed_field():
    old = {"actor": {"lr": 1.0, "kl_coef": 0.1}, "trainer": {"total_steps": 4, "output_dir": "a"}}
    new = {"actor": {"lr": 2.0, "kl_coef": 0.1}, "trainer": {"total_steps": 4, "output_dir": "b"}}
    warnings = run_folder.compare_for_resume(old, new, saved_data=None, new_data="x",
                                             resume_total_steps="refuse")
    assert warnings == ["actor.lr changed on resume: 1.0 -> 2.0; the optimizer continues with "
                        "the new value (through the lr schedule from the resumed step)"]


# ----------------------------------------------------------------------------- case 5 (ops)

def test_token_logprobs_refuses_extreme_temperatures():
    from icpo.ops import token_logprobs
    from icpo.ops.token_logprobs import MIN_TEMPERATURE

    logits, labels = torch.randn(3, 11) * 20, torch.tensor([0, 5, 10])
    for t in (1e-30, 1e-8, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(logits, labels, temperature=t)
    logp, ent = token_logprobs(logits, labels, temperature=MIN_TEMPERATURE)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert MIN_TEMPERATURE == 1e-3  # the bound icpo.config holds for rollout.temperature
    with pytest.raises(Exception, match="rollout.temperature"):
        config_from_dict({}, ["rollout.temperature=0.0009"])


def numpy_scores(data_source, solution_str, ground_truth, extra_info=None):
    return {"a": np.float32(0.5), "b": np.int64(1), "c": np.bool_(True), "d": True,
            "e": torch.tensor(0.25)}[solution_str]


def nan_acc(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 0.0, "acc": float("nan")}


def test_rewards_of_any_real_type_and_nan_acc(data):
    from icpo.config import RewardConfig
    from icpo.data import load_records
    from icpo.rewards import RewardError, RewardFn

    rec = load_records(data / "train.jsonl")[0]
    out = RewardFn(RewardConfig(function=f"{__name__}:numpy_scores"))([rec] * 5, list("abcde"))
    assert out.score.tolist() == [0.5, 1.0, 1.0, 1.0, 0.25]
    with pytest.raises(RewardError, match="acc nan"):
        RewardFn(RewardConfig(function=f"{__name__}:nan_acc"))([rec], ["x"])
