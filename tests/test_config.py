"""icpo.config: defaults, YAML + dotted overrides, validation messages, atomic save."""

import dataclasses
import os
import pathlib

import pytest
import yaml

from icpo.config import (
    ActorConfig,
    AlgorithmConfig,
    Config,
    ConfigError,
    OmegaConfig,
    RolloutConfig,
    config_from_dict,
    field_docs,
    load_config,
    save_config,
    validate,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_PRESET = REPO / "examples" / "configs" / "paper_qwen2.5_7b.yaml"


def test_defaults_are_valid_and_follow_table6():
    cfg = validate(Config())
    a, t = cfg.actor, cfg.trainer
    assert (a.lr, a.kl_coef, a.clip_low, a.clip_high) == (1e-6, 0.001, 0.2, 0.2)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_response_length) == (2048, 3072)
    assert (t.train_batch_size, a.ppo_mini_batch_size, cfg.rollout.n) == (768, 192, 5)
    assert (t.total_steps, cfg.algorithm.tau, cfg.algorithm.omega.schedule) == (500, 2.0,
                                                                                 "warmup_decay")
    assert (cfg.reward.answer_weight, cfg.reward.format_weight) == (0.9, 0.1)
    assert cfg.algorithm.delta is None and cfg.actor.betas == (0.9, 0.999)


def test_every_field_has_a_docstring():
    docs = field_docs()
    names = set(docs)
    for section in ("model", "data", "rollout", "reward", "algorithm", "actor", "trainer"):
        sub = getattr(Config(), section)
        for f in dataclasses.fields(sub):
            assert f"{section}.{f.name}" in names, f"{section}.{f.name} has no docstring"
    for f in dataclasses.fields(Config().algorithm.omega):
        assert f"algorithm.omega.{f.name}" in names
    assert all(v for v in docs.values())


def test_allowed_names_of_the_lower_layers_are_the_config_literals():
    """Each list of allowed names is written once, as a Literal of the schema; the algorithms
    and the rollout package check their arguments against the same tuples."""
    import typing

    from icpo import algorithms, rollout

    hints = {**{f"actor.{k}": v for k, v in typing.get_type_hints(ActorConfig).items()},
             **{f"algorithm.{k}": v for k, v in typing.get_type_hints(AlgorithmConfig).items()}}
    omega = typing.get_type_hints(OmegaConfig)["schedule"]
    engine = typing.get_type_hints(RolloutConfig)["engine"]
    pairs = {"actor.loss_agg_mode": algorithms.AGG_MODES,
             "actor.kl_estimator": algorithms.KL_ESTIMATORS,
             "actor.importance_sampling_level": algorithms.IS_LEVELS,
             "algorithm.name": algorithms.ALGORITHMS,
             "algorithm.confidence": algorithms.CONFIDENCE_KINDS,
             "algorithm.std_scope": algorithms.advantages.STD_SCOPES,
             "algorithm.group_of_one": algorithms.advantages.GROUP_OF_ONE}
    for name, names in pairs.items():
        assert typing.get_args(hints[name]) == names, name
    assert typing.get_args(omega) == algorithms.SCHEDULES
    from icpo.config.schema import FilterGroupsConfig, RolloutCorrectionConfig

    fg = typing.get_type_hints(FilterGroupsConfig)["metric"]
    assert typing.get_args(fg) == algorithms.FILTER_METRICS
    rc = typing.get_type_hints(RolloutCorrectionConfig)
    assert typing.get_args(rc["rollout_is_mode"]) == algorithms.ROLLOUT_IS_MODES
    assert typing.get_args(typing.get_args(rc["rollout_is"])[0]) == algorithms.ROLLOUT_IS_LEVELS
    assert typing.get_args(engine) == rollout.ENGINES == ("auto", "hf", "vllm")
    assert set(algorithms.LENGTH_NORM_MODES) < set(algorithms.AGG_MODES)


def test_yaml_overrides_and_save_round_trip(tmp_path):
    src = tmp_path / "run.yaml"
    src.write_text(
        "actor:\n  lr: 1e-6\n  betas: [0.8, 0.99]\n"
        "algorithm:\n  name: grpo\n  omega:\n    schedule: linear_decay\n    omega_max: 2\n"
        "data:\n  train_files: [a.jsonl]\n")
    cfg = load_config(src, ["actor.lr=2e-5", "data.train_files=[x.jsonl, y.parquet]",
                            "algorithm.omega.schedule=constant", "model.ref_path=null",
                            "trainer.zero_stage=2", "rollout.seed=7", "trainer.output_dir=2024"])
    assert cfg.actor.lr == 2e-5 and isinstance(cfg.actor.lr, float)
    assert cfg.actor.betas == (0.8, 0.99)
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.omega.schedule == "constant"
    assert cfg.algorithm.omega.omega_max == 2.0 and isinstance(cfg.algorithm.omega.omega_max, float)
    assert cfg.data.train_files == ["x.jsonl", "y.parquet"]
    assert cfg.trainer.zero_stage == 2 and cfg.rollout.seed == 7
    assert cfg.trainer.output_dir == "2024"  # a name, not the number 2024
    out = tmp_path / "sub" / "saved.yaml"
    save_config(cfg, out)
    assert [p.name for p in out.parent.iterdir()] == ["saved.yaml"]  # no temp file left
    again = load_config(out)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(out.read_text())["actor"]["betas"] == [0.8, 0.99]


def test_yaml_scientific_notation_is_a_float(tmp_path):
    src = tmp_path / "c.yaml"
    src.write_text("actor:\n  lr: 3e-7\nalgorithm:\n  eps: 1E-8\n")
    cfg = load_config(src)
    assert cfg.actor.lr == 3e-7 and cfg.algorithm.eps == 1e-8


def test_int_accepted_for_float_and_single_file_for_list():
    cfg = load_config(None, ["actor.lr=1", "data.val_files=v.jsonl"])
    assert cfg.actor.lr == 1.0 and type(cfg.actor.lr) is float
    assert cfg.data.val_files == ["v.jsonl"]


@pytest.mark.parametrize("override, field", [
    ("actor.lr=abc", "actor.lr"),
    ("actor.lr=0", "actor.lr"),
    ("actor.lr=-1e-6", "actor.lr"),
    ("actor.betas=[0.9]", "actor.betas"),
    ("actor.betas=[0.9, 1.5]", "actor.betas"),
    ("actor.clip_high=0.1", "actor.clip_high"),
    ("actor.ppo_mini_batch_size=100", "actor.ppo_mini_batch_size"),
    ("actor.ppo_mini_batch_size=1536", "actor.ppo_mini_batch_size"),
    ("actor.kl_estimator=k4", "actor.kl_estimator"),
    ("actor.loss_agg_mode=sum", "actor.loss_agg_mode"),
    ("rollout.n=0", "rollout.n"),
    ("rollout.n=2.5", "rollout.n"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_k=0", "rollout.top_k"),
    ("rollout.engine=sglang", "rollout.engine"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization"),
    ("data.overlong_prompts=drop", "data.overlong_prompts"),
    ("data.template=chatml", "data.template"),
    ("data.max_prompt_length=0", "data.max_prompt_length"),
    ("data.train_files=[1, 2]", "data.train_files[0]"),
    ("data.val_max_samples=0", "data.val_max_samples"),
    ("reward.noise_fraction=1.2", "reward.noise_fraction"),
    ("reward.noise_magnitude=-0.3", "reward.noise_magnitude"),
    ("reward.function=''", "reward.function"),
    ("algorithm.name=ppo", "algorithm.name"),
    ("algorithm.delta=0", "algorithm.delta"),
    ("algorithm.tau=0", "algorithm.tau"),
    ("algorithm.omega.schedule=cosine", "algorithm.omega.schedule"),
    ("algorithm.omega.omega_min=2", "algorithm.omega.omega_min"),
    ("algorithm.omega.peak_fraction=1.5", "algorithm.omega.peak_fraction"),
    ("algorithm.confidence=max", "algorithm.confidence"),
    ("trainer.zero_stage=4", "trainer.zero_stage"),
    ("trainer.zero_stage=true", "trainer.zero_stage"),
    ("trainer.tensorboard=1", "trainer.tensorboard"),
    ("trainer.total_steps=0", "trainer.total_steps"),
    ("trainer.device=tpu", "trainer.device"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("model.dtype=int8", "model.dtype"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
    ("algorithm.omega=3", "algorithm.omega"),
])
def test_each_bad_value_names_its_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert field in msg, msg
    assert "expected" in msg, msg


def test_validate_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.n=0", "actor.lr=0"])
    assert "rollout.n" in str(e.value) and "actor.lr" in str(e.value)


@pytest.mark.parametrize("override, key, suggestion", [
    ("actor.lrr=1", "actor.lrr", "actor.lr"),
    ("algorithm.omega.shedule=constant", "algorithm.omega.shedule", "algorithm.omega.schedule"),
    ("trainr.seed=1", "trainr", "trainer"),
])
def test_unknown_override_key_is_named_with_suggestion(override, key, suggestion):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(None, [override])
    assert repr(key) in str(e.value) and repr(suggestion) in str(e.value)


def test_unknown_yaml_key_is_named(tmp_path):
    src = tmp_path / "c.yaml"
    src.write_text("rollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"'rollout\.temprature'.*'rollout\.temperature'"):
        load_config(src)


def test_bad_override_syntax_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="actor.lr"):
        load_config(None, ["actor.lr"])
    with pytest.raises(ConfigError, match="has no sub-keys"):
        load_config(None, ["actor.lr.x=1"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="actor: got 3"):
        config_from_dict({"actor": 3})


def test_validate_catches_programmatic_mistakes():
    cfg = Config()
    cfg.rollout.n = "5"
    with pytest.raises(ConfigError, match="rollout.n"):
        validate(cfg)
    cfg = Config()
    cfg.actor.betas = (0.9,)
    with pytest.raises(ConfigError, match="actor.betas"):
        validate(cfg)


def test_save_config_replaces_existing_file(tmp_path):
    out = tmp_path / "config.yaml"
    out.write_text("garbage: [")
    save_config(load_config(None, ["trainer.seed=3"]), out)
    assert load_config(out).trainer.seed == 3
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]


def test_paper_preset_is_valid_and_matches_table6():
    cfg = load_config(PAPER_PRESET)
    assert cfg.model.path == "Qwen/Qwen2.5-7B" and cfg.model.dtype == "bfloat16"
    assert (cfg.actor.lr, cfg.actor.kl_coef, cfg.actor.clip_low) == (1e-6, 0.001, 0.2)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_response_length) == (2048, 3072)
    assert (cfg.trainer.train_batch_size, cfg.actor.ppo_mini_batch_size) == (768, 192)
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.trainer.total_steps) == (5, 1.0, 500)
    alg = cfg.algorithm
    assert (alg.delta, alg.tau, alg.omega.schedule) == (0.4, 2.0, "warmup_decay")
    assert (cfg.trainer.zero_stage, cfg.rollout.engine, cfg.data.template) == (3, "vllm", "r1")
    assert cfg.data.train_files and cfg.data.val_files
