"""LoRA in the trainer (issue 19, item 1): the tiny preset (examples/configs/tiny_cpu.yaml, the
bundled model) made small, 4 prompts x G=4, 16-token responses, 2 steps, model.lora_rank=8 and a
KL term, on the CPU.

Covered: only the adapters reach the optimizer (counted by numel at ZeRO-0 and ZeRO-2) and the
base weights end bit for bit as loaded; the reference log-probs of a step after an update are
the base model's, from the same module (no second copy); a checkpoint holds the adapters in
PEFT's format (PeftModel.from_pretrained gives the live logits) and a DeepSpeed state of the
adapters alone; stop after step 1 + resume to step 2 == 2 uninterrupted steps, bit for bit, at
ZeRO-0 and ZeRO-2 (and ZeRO-3, slow); a 2-process ZeRO-2 run (slow); model.ref_path still
loads a separate reference; ``icpo eval`` on a LoRA checkpoint equals ``icpo eval`` on its
``icpo export --merged`` model; one-line errors; the config's checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import icpo.trainer.trainer as trainer_mod
from icpo import cli
from icpo.config import ConfigError, config_from_dict, load_config
from icpo.errors import UserError
from icpo.models import bundled_model_dir, lora
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer import Trainer
from icpo.trainer.run_folder import compare_for_resume
from icpo.trainer.scoring import score_all

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "examples" / "configs" / "tiny_cpu.yaml"
RANK = 8
NONDETERMINISTIC = ("time/", "perf/")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REWARD = '''
def varied(data_source, solution_str, ground_truth, extra_info=None):
    """0, 0.5 or 1 from the response's length: groups whose rewards differ, so the adapters
    get a gradient (the tiny model rarely earns the verifiable reward in 16 tokens)."""
    return (len(solution_str) % 3) / 2
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("lora_task")
    write_jsonl(make_records("train", 16), d / "train.jsonl")
    write_jsonl(make_records("val", 4), d / "val.jsonl")
    (d / "reward.py").write_text(REWARD)
    return d / "train.jsonl", d / "val.jsonl", d / "reward.py"


def make_cfg(task, out: Path, *overrides: str):
    return load_config(PRESET, make_cfg_overrides(task, out, *overrides))


def make_cfg_overrides(task, out: Path, *overrides: str) -> list[str]:
    """The tiny preset made small (4 prompts x G=4, 16 tokens, 2 steps, a checkpoint per
    step), LoRA rank 8 and a KL term, then ``overrides``."""
    train, _, reward = task
    small = [f"data.train_files=[{train}]", "data.val_files=[]", f"trainer.output_dir={out}",
             f"reward.function={reward}:varied", "trainer.total_steps=2",
             "trainer.train_batch_size=4", "actor.ppo_mini_batch_size=2", "rollout.n=4",
             "rollout.max_response_length=16", "trainer.eval_every=0", "trainer.save_every=1",
             "trainer.progress_bar=false", "actor.kl_coef=0.01", "actor.lr=1e-3",
             f"model.lora_rank={RANK}"]
    return [*small, *overrides]


def load_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()


def base_weights_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The frozen base weights inside the PEFT model, under the plain model's names."""
    inner = lora.peft_model(trainer.models.actor).get_base_model()
    return {n.replace(".base_layer.", "."): p.detach().clone()
            for n, p in inner.named_parameters() if ".lora_" not in n}


def adapters_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.models.actor.module.named_parameters()
            if ".lora_" in n}


def deterministic(out: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if k != "time" and not k.startswith(NONDETERMINISTIC)}
            for ln in lines if "event" not in ln]


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every weight of the policy (ZeRO-3: gathered; its partitions are empty tensors)."""
    module = trainer.models.actor.module
    if trainer.cfg.trainer.zero_stage != 3:
        return {k: v.clone() for k, v in module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def optimizer_params(trainer: Trainer, zero_stage: int) -> list[torch.nn.Parameter]:
    opt = trainer.models.optimizer
    if zero_stage == 0:
        return [p for g in opt.param_groups for p in g["params"]]
    # ZeRO-1/2 flatten each group into one fp32 partition; the module's own tensors it
    # partitions are its bit16_groups (float32 here).
    return [p for g in opt.bit16_groups for p in g]


# ----------------------------------------------------------------------------- a LoRA run

@pytest.fixture(scope="module")
def lora_run(task, tmp_path_factory):
    """Two steps at ZeRO-0 with every reference scoring recorded: ``(trainer, calls, out)``."""
    out = tmp_path_factory.mktemp("lora_run") / "run"
    calls = []
    real = trainer_mod.score_all

    def spy(model, batches, temperature, **kw):
        result = real(model, batches, temperature, **kw)
        if kw.get("with_entropy") is False:  # the reference's (the policy's needs entropies)
            calls.append(([b for b in batches], result[0].clone()))
        return result

    trainer_mod.score_all = spy
    try:
        trainer = Trainer(make_cfg(task, out))
        trainer.train()
    finally:
        trainer_mod.score_all = real
    return trainer, calls, out


def test_only_the_adapters_train(lora_run):
    trainer, _, _ = lora_run
    models = trainer.models
    assert models.lora and lora.is_peft_model(models.actor)
    adapters = {id(p): n for n, p in models.actor.module.named_parameters() if ".lora_" in n}
    handed = optimizer_params(trainer, 0)
    assert handed and all(id(p) in adapters for p in handed)
    assert sum(p.numel() for p in handed) == sum(
        p.numel() for p in models.actor.module.parameters() if id(p) in adapters)
    assert sum(p.numel() for p in handed) < models.num_params / 10
    moved = [n for n, p in adapters_of(trainer).items() if "lora_B" in n and p.abs().sum() > 0]
    assert moved, "no adapter moved off its zero start"
    base, start = base_weights_of(trainer), load_base().state_dict()
    assert base.keys() <= start.keys() and len(base) >= len(start) - 1  # a tied head once
    changed = [n for n in base if not torch.equal(base[n], start[n])]
    assert not changed, f"base weights moved: {changed[:3]}"


def test_reference_is_the_base_model_from_the_same_weights(lora_run):
    trainer, calls, _ = lora_run
    assert trainer.models.reference_is_base
    assert trainer.models.reference is trainer.models.actor.module  # no second copy
    assert len(calls) == 2  # one reference scoring per step
    base = load_base()
    temperature = trainer.cfg.rollout.temperature
    batches, got = calls[-1]  # step 2: the adapters had moved by then
    want, _ = score_all(base, batches, temperature, with_entropy=False)
    print("max |ref - base| =", (got - want).abs().max().item())
    assert torch.equal(got, want)  # the base layers' own arithmetic, the adapters skipped
    with torch.no_grad():
        on, _ = score_all(trainer.models.actor.module, batches, temperature, with_entropy=False)
    assert not torch.allclose(on, want, rtol=0, atol=1e-6)  # the adapters on: another policy


def test_checkpoint_holds_peft_adapters(lora_run):
    from peft import PeftModel

    trainer, _, out = lora_run
    ckpt = out / "checkpoints" / "step_000002"
    config = json.loads((ckpt / "model" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == str(bundled_model_dir())
    assert not (ckpt / "model" / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(load_base(), ckpt / "model").eval()
    live = adapters_of(trainer)
    got = {n: p for n, p in loaded.named_parameters() if ".lora_" in n}
    assert got.keys() == live.keys()
    assert all(torch.equal(got[n], live[n]) for n in live)
    ids = torch.tensor([trainer.train_data.items[0].prompt_ids])
    module = trainer.models.actor.module
    module.eval()
    with torch.no_grad():
        want, have = module(input_ids=ids).logits, loaded(input_ids=ids).logits
    module.train()
    assert torch.equal(want, have)
    # DeepSpeed's state: the adapters alone (the frozen base comes from model.path on resume).
    states = torch.load(ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt",
                        weights_only=False, map_location="cpu")
    assert states["module"] and all(".lora_" in k for k in states["module"])


def test_eval_of_a_lora_checkpoint_equals_eval_of_its_export(lora_run, task, tmp_path, capsys):
    _, _, out = lora_run
    ckpt = out / "checkpoints" / "step_000002"
    merged = tmp_path / "merged"
    assert cli.main(["export", "--merged", "--adapter", str(ckpt), "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    capsys.readouterr()
    results = []
    for model in (ckpt, merged):
        argv = ["eval", "--model", str(model), "--data", str(task[1]), "--n", "2",
                "--temperature", "1.0", "--max-new-tokens", "12", "--no-progress", "--seed", "3",
                "--reward", f"{task[2]}:varied"]
        assert cli.main(argv) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["mean@2"] == results[1]["mean@2"]
    assert results[0]["num_prompts"] == 4


def test_eval_of_an_adapter_without_its_base_is_one_line(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tmp_path / "gone"), "r": 8}))
    argv = ["eval", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "base_model_name_or_path" in err, err


# ----------------------------------------------------------------------------- resume, ZeRO

class _Stop(RuntimeError):
    pass


@pytest.mark.parametrize("zero_stage", [0, 2, pytest.param(3, marks=pytest.mark.slow)])
def test_resume_is_bitwise(task, tmp_path, monkeypatch, zero_stage):
    stage = f"trainer.zero_stage={zero_stage}"
    straight = Trainer(make_cfg(task, tmp_path / "straight", stage))
    straight.train()
    if zero_stage == 2:
        handed = optimizer_params(straight, 2)
        adapters = {id(p) for n, p in straight.models.actor.module.named_parameters()
                    if ".lora_" in n}
        assert handed and {id(p) for p in handed} == adapters
        start = load_base().state_dict()
        base = base_weights_of(straight)
        assert all(torch.equal(base[n], start[n]) for n in base)

    cfg = make_cfg(task, tmp_path / "resumed", stage)
    real_step = Trainer.train_step

    def stopping(self):  # dies in step 2, after step 1's checkpoint
        if self.step == 1:
            raise _Stop
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", stopping)
    with pytest.raises(_Stop):
        Trainer(cfg).train()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(cfg, resume="auto")
    assert resumed.step == 1
    resumed.train()
    a, b = full_state(straight), full_state(resumed)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"weights differ: {differing[:3]}"
    assert any(".lora_" in k for k in a) and all(v.numel() for v in a.values())
    assert deterministic(tmp_path / "straight")[1:] == deterministic(tmp_path / "resumed")[1:]


@pytest.mark.slow
def test_two_processes_zero2(task, tmp_path):
    """torchrun, 2 CPU processes, ZeRO-2 (gradients reduced in every backward, optimizer state
    sharded): the run ends, both ranks saved, the adapters moved, and the adapters PEFT loads
    from the checkpoint are exactly DeepSpeed's saved module state, which holds nothing else."""
    import subprocess
    import sys

    from launch import clean_env, free_port
    from peft import PeftModel

    out = tmp_path / "ddp"
    argv = [f"{o}" for o in make_cfg_overrides(task, out, "trainer.zero_stage=2")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "icpo.cli", "train", "--config",
           str(PRESET), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = out / "checkpoints" / "step_000002"
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    loaded = PeftModel.from_pretrained(load_base(), ckpt / "model")
    adapters = {n: p for n, p in loaded.named_parameters() if ".lora_" in n}
    assert any(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)
    states = torch.load(ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt",
                        weights_only=False, map_location="cpu")["module"]
    assert states.keys() == adapters.keys()
    assert all(torch.equal(states[n], adapters[n]) for n in adapters)


def test_resume_refuses_other_adapter_settings(task, tmp_path):
    saved = make_cfg(task, tmp_path / "a").to_dict()
    for override in ("model.lora_rank=4", "model.lora_alpha=32", "model.target_modules=[q_proj]"):
        new = make_cfg(task, tmp_path / "a", override).to_dict()
        with pytest.raises(UserError, match=override.split("=")[0]):
            compare_for_resume(saved, new, saved_data=None, new_data="",
                               resume_total_steps="refuse")


def test_an_explicit_ref_path_loads_a_separate_reference(task, tmp_path):
    trainer = Trainer(make_cfg(task, tmp_path / "run", "trainer.total_steps=1",
                               f"model.ref_path={bundled_model_dir()}"))
    models = trainer.models
    assert not models.reference_is_base and models.reference is not None
    assert not lora.is_peft_model(models.reference)
    assert {id(p) for p in models.reference.parameters()}.isdisjoint(
        id(p) for p in models.actor.module.parameters())
    trainer.train()


def test_target_modules_matching_nothing_is_one_line(task, tmp_path, capsys):
    argv = ["train", "--config", str(PRESET),
            *make_cfg_overrides(task, tmp_path / "run", "model.target_modules=[no_such_proj]")]
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bar
    assert last.startswith("icpo train: error: model.target_modules: ['no_such_proj']: "), last


# ----------------------------------------------------------------------------- config

def test_config_fields_and_their_checks():
    cfg = config_from_dict(None, ["model.lora_rank=16", "model.lora_alpha=32",
                                  "model.lora_dropout=0.05",
                                  "model.target_modules=[q_proj,v_proj]"])
    m = cfg.model
    assert (m.lora_rank, m.lora_alpha, m.lora_dropout, m.target_modules) == (
        16, 32.0, 0.05, ["q_proj", "v_proj"])
    default = config_from_dict(None).model
    assert (default.lora_rank, default.lora_alpha, default.target_modules) == (0, 16.0,
                                                                               "all-linear")
    for bad, field in (("model.lora_rank=-1", "model.lora_rank"),
                       ("model.lora_rank=2.5", "model.lora_rank"),
                       ("model.lora_alpha=0", "model.lora_alpha"),
                       ("model.lora_dropout=1", "model.lora_dropout"),
                       ("model.target_modules=[]", "model.target_modules"),
                       ("model.target_modules=''", "model.target_modules")):
        with pytest.raises(ConfigError, match=field):
            config_from_dict(None, [bad])
