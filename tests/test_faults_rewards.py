"""Reward functions that misbehave: a RewardError in one line naming the function and the
sample, never a hang (``reward.timeout_s``: a forked child, killed at the deadline, so even C
code that holds the GIL ends), and a training run that saves its last finished step first."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import yaml

from icpo import cli
from icpo.config import ConfigError, RewardConfig, config_from_dict
from icpo.data import PromptRecord
from icpo.errors import RewardError
from icpo.rewards import RewardFn
from icpo.tasks.arithmetic import make_records, write_jsonl

ME = __name__


def hangs(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "stuck":
        import time

        time.sleep(3600)
    return 1.0


def hangs_in_c(data_source, solution_str, ground_truth, extra_info=None):
    """Catastrophic backtracking inside the regex engine: C code holding the GIL, which no
    signal handler or thread in this process can interrupt."""
    import re

    if solution_str == "stuck":
        re.match(r"(a+)+$", "a" * 64 + "b")
    return 1.0


BAD = {"raise": None, "nan": math.nan, "inf": -math.inf, "none": None, "str": "0.5",
       "nodict": {"acc": 1}, "list": [1.0]}


def bad(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "raise":
        raise ZeroDivisionError("division by zero in the grader")
    return BAD.get(solution_str, 1.0)


def exits(data_source, solution_str, ground_truth, extra_info=None):
    import os

    os._exit(3)


def rec(source: str = "toy") -> PromptRecord:
    return PromptRecord(prompt="q", ground_truth="1", data_source=source, index=7,
                        location="data/train.jsonl:8")


def call_with_watchdog(fn, *args, limit: float = 120.0):
    """Run ``fn(*args)`` in a thread; fail (instead of hanging the suite) if it never returns."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001  (handed to the caller, SystemExit too)
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"reward call still running after {limit} s: no timeout"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("fn", ["hangs", "hangs_in_c"])
def test_a_reward_call_that_never_returns_times_out_naming_the_sample(fn):
    reward = RewardFn(RewardConfig(function=f"{ME}:{fn}", timeout_s=0.5))
    with pytest.raises(RewardError) as info:
        call_with_watchdog(reward, [rec("mathy")], ["fine", "stuck", "fine"])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"reward function '{ME}:{fn}' did not return within "
                          "reward.timeout_s=0.5 s on sample 1 (data/train.jsonl:8, "
                          "data_source 'mathy', response 'stuck')"), msg
    # The killed child is replaced: the next batch is scored.
    assert call_with_watchdog(reward, [rec()], ["a", "b"]).score.tolist() == [1.0, 1.0]
    reward.close()


@pytest.mark.parametrize("timeout_s", [0.0, 30.0])  # in this process, and in the child
@pytest.mark.parametrize("text, what", [
    ("raise", "raised ZeroDivisionError: division by zero in the grader"),
    ("nan", "returned score nan; expected a finite number"),
    ("inf", "returned score -inf; expected a finite number"),
    ("none", "returned score None; expected a finite number"),
    ("str", "returned score '0.5'; expected a finite number"),
    ("list", "returned score [1.0]; expected a finite number"),
    ("nodict", "returned a dict without 'score' (keys: 'acc')"),
])
def test_a_bad_reward_is_one_line_naming_function_and_sample(timeout_s, text, what):
    reward = RewardFn(RewardConfig(function=f"{ME}:bad", timeout_s=timeout_s))
    with pytest.raises(RewardError) as info:
        reward([rec()], ["ok", "ok", text, "ok"])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"reward function '{ME}:bad' {what}"), msg
    assert msg.endswith(f"on sample 2 (data/train.jsonl:8, data_source 'toy', "
                        f"response {text!r})"), msg
    assert reward([rec()], ["ok"]).score.tolist() == [1.0]  # and it goes on working
    reward.close()


def test_a_reward_function_that_ends_its_process():
    reward = RewardFn(RewardConfig(function=f"{ME}:exits", timeout_s=30))
    with pytest.raises(RewardError, match=r"ended its process \(exit status 3\) on sample 0"):
        call_with_watchdog(reward, [rec()], ["x"])


def always_raises(data_source, solution_str, ground_truth, extra_info=None):
    raise KeyError


def test_long_responses_are_cut_in_the_message():
    reward = RewardFn(RewardConfig(function=f"{ME}:always_raises", timeout_s=0))
    with pytest.raises(RewardError) as info:
        reward([rec()], ["x" * 500 + "\n" * 3])
    msg = str(info.value)
    assert msg.startswith(f"reward function '{ME}:always_raises' raised KeyError on sample 0")
    assert msg.endswith(f"response '{'x' * 40}...')") and "\n" not in msg, msg


def test_timeout_s_is_validated():
    assert config_from_dict({}).reward.timeout_s == 60.0
    assert config_from_dict({"reward": {"timeout_s": 0}}).reward.timeout_s == 0.0
    with pytest.raises(ConfigError, match=r"reward.timeout_s: got -1.0; expected >= 0"):
        config_from_dict({"reward": {"timeout_s": -1}})


# ----------------------------------------------------------------------------- in training

# Fails (or hangs) on the 9th call: 4 prompts x G=2 = 8 calls per step, so in step 2.
FAILING_MODULE = '''
import time
_calls = [0]

def after_one_step(data_source, solution_str, ground_truth, extra_info=None):
    _calls[0] += 1
    if _calls[0] > 8:
        if MODE == "hang":
            time.sleep(3600)
        raise ValueError("grader crashed")
    return float(len(solution_str) % 2)
'''


def train_config(model, data: Path, out: Path, reward: dict) -> dict:
    return {"model": {"path": str(model), "dtype": "float32"},
            "data": {"train_files": [str(data)], "max_prompt_length": 256},
            "rollout": {"engine": "hf", "n": 2, "max_response_length": 8},
            "algorithm": {"name": "icpo", "delta": 0.5},
            "reward": reward,
            "actor": {"lr": 1e-3, "ppo_mini_batch_size": 2, "max_tokens_per_micro_batch": 256},
            "trainer": {"total_steps": 3, "train_batch_size": 4, "output_dir": str(out),
                        "save_every": 0, "eval_every": 0, "device": "cpu",
                        "progress_bar": False, "num_threads": 1}}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_reward_saves_the_last_finished_step_then_one_line(
        tiny_random_model_dir, tmp_path, capsys, mode):
    data = tmp_path / "train.jsonl"
    write_jsonl(make_records("train", 16), data)
    module = tmp_path / f"reward_{mode}.py"
    module.write_text(f"MODE = {mode!r}\n" + FAILING_MODULE)
    out = tmp_path / "run"
    cfg_path = tmp_path / "c.yaml"
    reward = {"function": f"{module}:after_one_step", "timeout_s": 2}
    cfg_path.write_text(yaml.safe_dump(train_config(tiny_random_model_dir, data, out, reward)))
    assert cli.main(["train", "--config", str(cfg_path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    saved = out / "checkpoints" / "step_000001"
    cause = ("raised ValueError: grader crashed" if mode == "raise"
             else "did not return within reward.timeout_s=2 s")
    assert err[-1].startswith(f"icpo train: error: reward function '{module}:after_one_step' "
                              f"{cause} on sample 0 ("), err
    assert err[-1].endswith(f"(stopped after step 1/3; saved {saved}; resume: icpo train "
                            f"--config {out}/config.yaml --resume)"), err
    assert not any("Traceback" in ln for ln in err)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000001"

    # The fixed function resumes from there.
    from icpo.trainer import Trainer

    fixed = dict(reward, function="icpo.rewards.verifiable:compute_score")
    trainer = Trainer(config_from_dict(train_config(tiny_random_model_dir, data, out, fixed)),
                      resume="auto")
    assert trainer.step == 1
    trainer.train()
    assert trainer.step == 3
