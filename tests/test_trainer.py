"""End-to-end trainer tests on CPU: a tiny random Qwen2 (conftest), a few generated arithmetic
prompts, G = 3-4, 24-token responses, 1-4 steps each.

Covered: one ICPO step (every metric, finite loss, weights move); GRPO == ICPO at omega 0;
fused scoring+update == separate passes; crash + resume == uninterrupted run; checkpoint layout;
two-process torchrun runs (plain, and ZeRO-2 with ranks given unequal work); the noisy-reward
setting and the per-step mixed-group filter; bad data and resume-path errors. CLI tests:
test_cli.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import clean_env, free_port

import icpo.trainer.trainer as trainer_mod
import icpo.trainer.update as update_mod
from icpo.algorithms.premise import premise_metrics
from icpo.config import config_from_dict
from icpo.data.dataset import DataError
from icpo.errors import UserError
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer import Trainer
from icpo.trainer.metrics import read_metrics as read_history

REPO = Path(__file__).resolve().parents[1]
# Wall-clock and throughput numbers differ between any two runs; everything else must not.
NONDETERMINISTIC = ("time", "time/", "perf/")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


REWARDS = '''
def varied(data_source, solution_str, ground_truth, extra_info=None):
    """0, 0.5 or 1 from the response's length: a random model never earns the verifiable
    reward, and all-zero rewards would give zero advantages (and ICPO's bonus is capped by
    |R| / tau), so nothing would be learned."""
    return (len(solution_str) % 3) / 2


_calls = [0]


def rank_skewed(data_source, solution_str, ground_truth, extra_info=None):
    """Rank 0: 1.0 for everything (every group uniform). Other ranks: 0, 1, 0, 1, ... by call
    (no group of G >= 2 consecutive responses is uniform), so drop_mixed_groups leaves rank 0
    all its groups and the others none."""
    import os

    if os.environ.get("RANK", "0") == "0":
        return 1.0
    _calls[0] += 1
    return float(_calls[0] % 2)


def mixed_by_parity(data_source, solution_str, ground_truth, extra_info=None):
    """Even answers: the same reward for every response (a uniform group). Odd answers: the
    parity of the response's length, which varies within a group."""
    if int(ground_truth) % 2 == 0:
        return 1.0
    return float(len(solution_str) % 2)
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "test_rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.fixture(scope="module")
def task_data(tmp_path_factory, reward_file) -> tuple[Path, Path, Path]:
    """16 training and 8 held-out arithmetic prompts in verl's JSONL schema, and the test
    reward functions' file."""
    d = tmp_path_factory.mktemp("arith")
    train, val = d / "train.jsonl", d / "val.jsonl"
    write_jsonl(make_records("train", 16), train)
    write_jsonl(make_records("val", 8), val)
    return train, val, reward_file


def base_dict(model_dir: Path, data: tuple[Path, Path, Path], out: Path) -> dict:
    """A small, fast config: 4 prompts x G=4 per step, 2 prompts per mini-batch, the ``varied``
    reward of ``REWARDS``; ``data`` is ``task_data`` (train, val, reward file)."""
    train, val, rewards = data
    return {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train_files": [str(train)], "val_files": [str(val)], "max_prompt_length": 256},
        "rollout": {"engine": "hf", "n": 4, "max_response_length": 24, "hf_batch_size": 64},
        "reward": {"function": f"{rewards}:varied"},
        "algorithm": {"name": "icpo", "delta": 0.5,
                      "omega": {"schedule": "constant", "omega_max": 0.5}},
        "actor": {"lr": 1e-3, "ppo_mini_batch_size": 2, "kl_coef": 0.01,
                  "max_tokens_per_micro_batch": 256},
        "trainer": {"total_steps": 1, "train_batch_size": 4, "output_dir": str(out),
                    "save_every": 0, "eval_every": 1, "device": "cpu", "progress_bar": False},
    }


def make_cfg(model_dir, data, out, *overrides: str):
    return config_from_dict(base_dict(model_dir, data, out), list(overrides))


def read_metrics(out: Path) -> list[dict]:
    """The run's history as it stands (a resume supersedes the lines of the steps it redid)."""
    return read_history(out / "metrics.jsonl")


def deterministic(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if k not in NONDETERMINISTIC and not k.startswith(NONDETERMINISTIC)}


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.models.actor.module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"weights differ: {differing[:5]}"


_REAL_COMPUTE_ADVANTAGES = trainer_mod.compute_advantages


class SpyAdvantages:
    """Wraps ``compute_advantages`` as the trainer calls it, recording inputs and outputs."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real = _REAL_COMPUTE_ADVANTAGES

        def spy(confidence, rewards, group_size, algo_cfg, omega, **kw):
            out = real(confidence, rewards, group_size, algo_cfg, omega, **kw)
            self.calls.append({"rewards": rewards.clone(), "group_size": group_size,
                               "omega": omega, "advantages": out.advantages.clone(),
                               "confidence": confidence.clone(), "scores": out.scores.clone()})
            return out

        monkeypatch.setattr(trainer_mod, "compute_advantages", spy)


# ----------------------------------------------------------------------------- one step

STEP_KEYS = [
    "step", "reward/mean", "reward/std", "accuracy", "omega", "delta",
    "icpo/score/mean", "icpo/score/std", "icpo/score/min", "icpo/score/max",
    "reward/final/mean", "reward/final/std",
    "advantage/mean", "advantage/std", "advantage/min", "advantage/max",
    "confidence/mean", "confidence/std", "confidence/group_std", "entropy", "actor/kl",
    "actor/kl_loss", "actor/clipfrac",
    "actor/pg_loss", "actor/approx_kl", "actor/grad_norm", "actor/lr",
    "response_length/mean", "response_length/max", "response_length/clip_ratio",
    "zero_std_group_frac", "time/generation", "time/reward", "time/old_logprob",
    "time/ref_logprob", "time/advantages", "time/update", "time/step", "perf/tokens_per_s",
    "val/accuracy",
]


def test_one_icpo_step_end_to_end(tiny_random_model_dir, task_data, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(make_cfg(tiny_random_model_dir, task_data, out))
    before = weights(trainer)
    history = trainer.train()
    after = weights(trainer)

    lines = read_metrics(out)
    assert [ln["step"] for ln in lines] == [0, 1]
    assert set(lines[0]) == {"step", "time", "val/accuracy"}
    step = lines[1]
    missing = [k for k in STEP_KEYS if k not in step]
    assert not missing, f"metrics.jsonl lacks {missing}"
    bad = {k: v for k, v in step.items()
           if not (isinstance(v, (int, float)) and math.isfinite(v))}
    assert not bad, f"non-finite or non-numeric metrics: {bad}"
    assert deterministic(history[-1]) == deterministic(step)
    assert 0.0 <= step["val/accuracy"] <= 1.0 and 0.0 <= step["accuracy"] <= 1.0
    assert step["omega"] == 0.5 and step["actor/lr"] == pytest.approx(1e-3)
    assert step["response_length/max"] <= 24
    # ICPO is active: the final rewards carry omega * preference score.
    assert step["icpo/score/std"] > 0
    # mean within-group std <= sqrt(mean within-group variance) <= the batch std
    assert 0.0 < step["confidence/group_std"] <= step["confidence/std"] + 1e-9
    assert step["reward/final/mean"] != pytest.approx(step["reward/mean"], abs=1e-6)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"
    assert (out / "checkpoints" / "step_000001" / "model").is_dir()  # saved at the end


# ----------------------------------------------------------------------------- GRPO == ICPO(0)

def test_grpo_equals_icpo_at_omega_zero(tiny_random_model_dir, task_data, tmp_path, monkeypatch):
    runs = {}
    for name in ("icpo", "grpo"):
        spy = SpyAdvantages(monkeypatch)
        out = tmp_path / name
        cfg = make_cfg(tiny_random_model_dir, task_data, out, f"algorithm.name={name}",
                       "algorithm.omega.omega_max=0.0", "trainer.total_steps=2",
                       "trainer.eval_every=0")
        trainer = Trainer(cfg)
        trainer.train()
        runs[name] = (spy.calls, read_metrics(out), weights(trainer))
    (ic, im, iw), (gc, gm, gw) = runs["icpo"], runs["grpo"]
    assert len(ic) == len(gc) == 2
    for a, b in zip(ic, gc):
        assert torch.equal(a["rewards"], b["rewards"])
        assert torch.equal(a["advantages"], b["advantages"])
        assert a["advantages"].abs().sum() > 0  # something to learn from
    # ICPO still reports its (zero-weighted) preference scores; GRPO reports zeros.
    strip = lambda r: {k: v for k, v in deterministic(r).items()  # noqa: E731  (a one-line helper)
                       if not k.startswith("icpo/score/")}
    assert [strip(r) for r in im] == [strip(r) for r in gm]
    assert_same_weights(iw, gw)
    # The premise diagnostics (the same for GRPO, which logs the scores ICPO would use), from
    # the step's confidences, correctness (the ``varied`` reward: acc = score > 0) and scores.
    for call, line in zip(ic, im):
        want = premise_metrics(call["confidence"], call["rewards"] > 0, call["rewards"],
                               call["scores"], call["group_size"], 2.0)
        assert want["premise/pairs"] > 0 and "premise/bonus_at_cap" in want
        assert {k: v for k, v in line.items() if k.startswith("premise/")} == want


# ----------------------------------------------------------------------------- fused pass

def test_fused_scoring_and_update_match_separate_passes(tiny_random_model_dir, task_data,
                                                        tmp_path, monkeypatch):
    """One mini-batch that fits one micro-batch: the trainer scores it with grad and reuses that
    forward for the update. The gradient must be what separate passes give."""
    real_logprobs, real_update = trainer_mod.response_logprobs, Trainer._update
    assert update_mod.response_logprobs is real_logprobs
    runs = {}
    for name, budget in (("fused", 8192), ("separate", 256)):  # 256: one sample per micro-batch
        calls = []

        def counting(*a, **k):
            calls.append(1)
            return real_logprobs(*a, **k)

        monkeypatch.setattr(trainer_mod, "response_logprobs", counting)  # the scoring pass
        monkeypatch.setattr(update_mod, "response_logprobs", counting)  # the update's forwards
        reused = []

        def spy_update(self, scored, step, reused=reused):
            reused.append(scored.forward is not None)
            return real_update(self, scored, step)

        monkeypatch.setattr(Trainer, "_update", spy_update)
        out = tmp_path / name
        trainer = Trainer(make_cfg(tiny_random_model_dir, task_data, out,
                                   "actor.ppo_mini_batch_size=4", "trainer.eval_every=0",
                                   f"actor.max_tokens_per_micro_batch={budget}"))
        grads = []
        real_step = trainer.models.actor.step

        def capturing_step(*a, **k):
            grads.append({n: p.grad.detach().clone()
                          for n, p in trainer.models.actor.module.named_parameters()})
            return real_step(*a, **k)

        trainer.models.actor.step = capturing_step
        trainer.train()
        runs[name] = (len(calls), grads, read_metrics(out)[-1], reused)
    (n_fused, g_fused, m_fused, r_fused), (n_sep, g_sep, m_sep, r_sep) = (runs["fused"],
                                                                          runs["separate"])
    assert n_fused == 1 and n_sep == 16  # one forward with grad vs one per sample
    assert r_fused == [True] and r_sep == [False]  # ScoredRollout.forward handed over, or not
    assert len(g_fused) == len(g_sep) == 1
    for k in g_fused[0]:
        torch.testing.assert_close(g_fused[0][k], g_sep[0][k], rtol=1e-3, atol=1e-6, msg=k)
    for k in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "entropy", "advantage/std",
              "confidence/mean", "icpo/score/mean", "reward/final/mean"):
        assert m_fused[k] == pytest.approx(m_sep[k], rel=1e-4, abs=1e-6), k


# ----------------------------------------------------------------------------- resume

class _Crash(RuntimeError):
    pass


def test_resume_matches_uninterrupted_run(tiny_random_model_dir, task_data, tmp_path,
                                          monkeypatch):
    k = 2
    extra = ("trainer.total_steps=4", f"trainer.save_every={k}", "trainer.eval_every=2",
             "actor.ppo_epochs=2", "actor.lr_warmup_steps=1", "actor.lr_schedule=cosine",
             "reward.noise_fraction=0.25")
    straight_out, resumed_out = tmp_path / "straight", tmp_path / "resumed"
    straight = Trainer(make_cfg(tiny_random_model_dir, task_data, straight_out, *extra))
    straight.train()

    cfg = make_cfg(tiny_random_model_dir, task_data, resumed_out, *extra)
    real_step = Trainer.train_step

    def crashing(self):
        # Step k+1 runs and is logged, but the run dies before its checkpoint: resume must
        # supersede that line of metrics.jsonl and redo the step from checkpoint k.
        if self.step == k + 1:
            raise _Crash("simulated crash between checkpoints")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(_Crash):
        Trainer(cfg).train()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert (resumed_out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert [r["step"] for r in read_metrics(resumed_out)] == [0, 1, 2, 3]

    resumed = Trainer(cfg, resume="auto")
    assert resumed.step == k
    history = resumed.train()
    assert [h["step"] for h in history] == [3, 4]

    a = [deterministic(r) for r in read_metrics(straight_out)]
    b = [deterministic(r) for r in read_metrics(resumed_out)]
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    raw = [json.loads(ln) for ln in (resumed_out / "metrics.jsonl").read_text().splitlines()]
    # Append-only: the crashed run's step-3 line is still there, before the resume marker.
    assert [r["step"] for r in raw] == [0, 1, 2, 3, 2, 3, 4] and raw[4]["event"] == "resume"
    assert a[k + 1:] == b[k + 1:]
    assert a == b
    assert_same_weights(weights(straight), weights(resumed))


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_content(tiny_random_model_dir, task_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    trainer = Trainer(make_cfg(tiny_random_model_dir, task_data, out, "trainer.total_steps=2",
                               "trainer.save_every=1", "trainer.eval_every=0"))
    trainer.train()
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001", "step_000002"]
    assert (root / "latest").read_text().strip() == "step_000002"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    final = root / "step_000002"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 2 and "sampler" in state
    assert (final / "rng_rank0.pt").is_file() and (final / "deepspeed").is_dir()

    live = weights(trainer)
    loaded = AutoModelForCausalLM.from_pretrained(final / "model", dtype=torch.float32)
    assert_same_weights(live, {k: v for k, v in loaded.state_dict().items()})
    first = AutoModelForCausalLM.from_pretrained(root / "step_000001" / "model").state_dict()
    assert any(not torch.equal(first[k], live[k]) for k in live)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(final / "model")) == len(trainer.tokenizer)


# ----------------------------------------------------------------------------- torchrun

_free_port, _clean_env = free_port, clean_env


def write_yaml(path: Path, d: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["zero0", "zero2_drop_mixed_uneven", "zero3"])
def test_two_process_torchrun(tiny_random_model_dir, task_data, tmp_path, variant):
    """``zero0``: the plain data-parallel run. ``zero2_drop_mixed_uneven``: ZeRO-2 reduces
    gradients in every backward, and drop_mixed_groups leaves rank 0 four groups and rank 1 none,
    so the ranks' work differs; the trainer must keep their collectives in step (no hang)."""
    out = tmp_path / "ddp"
    d = base_dict(tiny_random_model_dir, task_data, out)
    d["trainer"].update(total_steps=2, eval_every=2)
    if variant == "zero2_drop_mixed_uneven":
        d["trainer"].update(zero_stage=2, train_batch_size=8)
        d["rollout"]["n"] = 3
        d["actor"]["ppo_mini_batch_size"] = 4
        d["reward"].update(drop_mixed_groups=True, function=f"{task_data[2]}:rank_skewed")
    if variant == "zero3":
        # Parameters partitioned: every forward gathers them with collectives, so both ranks must
        # run as many forwards, whatever their samples' lengths and micro-batch counts.
        d["trainer"].update(zero_stage=3)
        d["actor"].update(max_tokens_per_micro_batch=100)
    config = write_yaml(tmp_path / "ddp.yaml", d)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "icpo.cli", "train", "--config", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = read_metrics(out)
    assert [ln["step"] for ln in lines] == [0, 1, 2]
    assert "val/accuracy" in lines[0] and "val/accuracy" in lines[2]
    for ln in lines[1:]:
        assert all(k in ln for k in ("reward/mean", "advantage/std", "actor/pg_loss"))
        if variant == "zero2_drop_mixed_uneven":
            # Gathered over both ranks: 4 of 8 groups kept (rank 0 alone would say 1.0).
            assert ln["drop_mixed_groups/kept_group_frac"] == 0.5
            # Kept groups have equal rewards, and ICPO's bonus is capped at |R| / tau: no signal.
            assert ln["advantage/std"] == 0.0
    ckpt = out / "checkpoints" / "step_000002"
    assert (ckpt / "model" / "config.json").is_file()
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(ckpt / "model").state_dict()
    changed = [k for k in start if not torch.equal(start[k], trained[k])]
    if variant in ("zero0", "zero3"):
        assert changed, "no update reached the weights"
    else:  # zero advantages, zero KL: the padding passes on rank 1 must add no gradient either
        assert not changed, f"weights moved without a learning signal: {changed[:3]}"


# ----------------------------------------------------------------------------- reward settings

def _clean_reward_spy(trainer: Trainer) -> list[torch.Tensor]:
    """Record the verifiable rewards before noise, by wrapping the trainer's reward function."""
    seen: list[torch.Tensor] = []
    real = trainer.reward_fn

    def wrapped(records, texts):
        batch = real(records, texts)
        seen.append(batch.score.float().clone())
        return batch

    trainer.reward_fn = wrapped
    return seen


def test_noisy_rewards(tiny_random_model_dir, task_data, tmp_path, monkeypatch):
    spy = SpyAdvantages(monkeypatch)
    out = tmp_path / "noisy"
    # N = 4 prompts x G 3 = 12 responses: round(0.4 * 12) = round(4.8) = 5 noised.
    trainer = Trainer(make_cfg(tiny_random_model_dir, task_data, out, "rollout.n=3",
                               "reward.noise_fraction=0.4", "reward.noise_magnitude=0.3",
                               "trainer.total_steps=2", "trainer.eval_every=0"))
    clean = _clean_reward_spy(trainer)
    trainer.train()
    steps = read_metrics(out)
    assert len(steps) == len(clean) == len(spy.calls) == 2
    for line, r0, call in zip(steps, clean, spy.calls):
        assert line["reward/noised_frac"] == 5 / 12
        delta = call["rewards"] - r0
        moved = delta != 0
        assert int(moved.sum()) == 5
        assert torch.allclose(delta[moved].abs(), torch.full((5,), 0.3), atol=1e-6)
    assert not torch.equal(spy.calls[0]["rewards"] - clean[0], spy.calls[1]["rewards"] - clean[1])


def test_drop_mixed_groups_keeps_only_uniform_groups(tiny_random_model_dir, task_data, tmp_path,
                                                     monkeypatch):
    spy = SpyAdvantages(monkeypatch)
    updates: list[list[list[int]]] = []
    real_update = Trainer._update

    def spy_update(self, scored, *args, **kw):
        updates.append([list(r) for r in scored.samples.response_ids])
        return real_update(self, scored, *args, **kw)

    monkeypatch.setattr(Trainer, "_update", spy_update)
    rollouts: list[list[list[int]]] = []
    real_rewards = Trainer._rewards

    def spy_rewards(self, ro, step, *args):
        rollouts.append([list(r) for r in ro.response_ids])
        return real_rewards(self, ro, step, *args)

    monkeypatch.setattr(Trainer, "_rewards", spy_rewards)
    out = tmp_path / "drop_mixed"
    n = 3
    trainer = Trainer(make_cfg(tiny_random_model_dir, task_data, out, f"rollout.n={n}",
                               "trainer.train_batch_size=8", "actor.ppo_mini_batch_size=4",
                               "reward.drop_mixed_groups=true",
                               f"reward.function={task_data[2]}:mixed_by_parity",
                               "trainer.total_steps=2", "trainer.eval_every=0"))
    clean = _clean_reward_spy(trainer)
    trainer.train()
    steps = read_metrics(out)
    assert len(steps) == len(clean) == 2
    fracs = []
    for line, r0, responses in zip(steps, clean, rollouts):
        groups = r0.view(-1, n).tolist()
        keep = [len(set(g)) == 1 for g in groups]
        assert line["drop_mixed_groups/kept_group_frac"] == sum(keep) / len(keep)
        fracs.append(sum(keep) / len(keep))
        expected = [responses[g * n + j] for g, kept in enumerate(keep) if kept for j in range(n)]
        if any(keep):
            assert expected in updates
    assert any(0 < f < 1 for f in fracs), f"test data gave no mixed batch: {fracs}"
    assert spy.calls, "no update ran"
    for call in spy.calls:
        g = call["rewards"].view(-1, call["group_size"])
        assert (g == g[:, :1]).all(), "a group with unequal rewards reached the update"


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad_line", ["{not json", '{"prompt": "1+1", "data_source": "x"}'])
def test_bad_data_line_names_file_and_line(tiny_random_model_dir, task_data, tmp_path, bad_line):
    lines = task_data[0].read_text().splitlines()
    lines.insert(2, bad_line)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(tiny_random_model_dir, (bad, *task_data[1:]), tmp_path / "never")
    with pytest.raises(DataError, match=r"bad\.jsonl:3\b"):
        Trainer(cfg)
    assert not (tmp_path / "never").exists()


def test_resume_from_a_missing_checkpoint_names_it(tiny_random_model_dir, task_data, tmp_path):
    cfg = make_cfg(tiny_random_model_dir, task_data, tmp_path / "run")
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(UserError, match="no_such_checkpoint"):
        Trainer(cfg, resume=str(missing))


def test_metrics_logger_log_every(tmp_path):
    """metrics.jsonl gets every step; the other sinks every log_every steps and at evaluations."""
    from icpo.trainer.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, total_steps=6, start_step=0, progress_bar=False,
                           log_every=3)
    seen = []
    logger._tb = type("TB", (), {"add_scalar": lambda self, k, v, s: seen.append((s, k)),
                                 "close": lambda self: None})()
    for step in range(1, 7):
        metrics = {"reward/mean": 0.5}
        if step == 2:
            metrics["val/accuracy"] = 0.25
        logger.log(step, metrics)
    logger.close()
    assert [ln["step"] for ln in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert sorted({s for s, _ in seen}) == [2, 3, 6]


def test_rollout_seed_overrides_trainer_seed(tiny_random_model_dir, task_data, tmp_path):
    cfg = make_cfg(tiny_random_model_dir, task_data, tmp_path / "a")
    assert Trainer(cfg).sampling_seed == cfg.trainer.seed
    cfg = make_cfg(tiny_random_model_dir, task_data, tmp_path / "b")
    cfg.rollout.seed = 7
    trainer = Trainer(cfg)
    assert trainer.sampling_seed == 7
    assert trainer._sampling(3).seed == trainer_mod.step_seed(7, 3, 0)
