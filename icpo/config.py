"""Run configuration: one dataclass per concern, loaded from YAML plus dotted overrides.

``load_config("run.yaml", ["actor.lr=1e-5", "data.train_files=[a.jsonl,b.jsonl]"])`` starts
from the defaults below (the paper's Table 6 values where the paper gives one), merges the YAML
mapping onto them recursively, applies the overrides (each value read as YAML), then
:func:`validate` checks every field's type and range and the cross-field rules. Every failure is
a :class:`ConfigError` naming the dotted field, the bad value and what is allowed, raised before
any work starts. Unknown keys are errors too, with a close-match suggestion.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """An invalid, mistyped or unknown config entry; the message names the dotted field."""


@dataclass
class ModelConfig:
    path: str = "icpo/tiny"
    """Hugging Face model folder or hub-style id; "icpo/tiny" is the bundled tiny model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; "auto" = bfloat16 on CUDA, float32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    attn_implementation: str | None = None
    """Passed to ``from_pretrained`` (e.g. "sdpa", "flash_attention_2"); None = library default."""
    ref_path: str | None = None
    """Frozen reference model for the KL term; None = same as ``path``."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training prompts: .jsonl/.json/.parquet files in verl's schema."""
    val_files: list[str] = field(default_factory=list)
    """Held-out prompts for ``val/accuracy``; empty = no evaluation."""
    prompt_key: str = "prompt"
    """Dotted path of the prompt (chat messages or text) in each record."""
    answer_key: str = "reward_model.ground_truth"
    """Dotted path of the ground-truth answer in each record."""
    max_prompt_length: int = 2048
    """Longest prompt in tokens, after the template is applied."""
    overlong_prompts: Literal["skip", "error"] = "skip"
    """Over-long prompts are skipped and counted, or raise an error."""
    template: Literal["r1", "none"] = "r1"
    """"r1" adds the Table 5 system prompt; "none" uses the prompt as given."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch."""
    seed: int = 1
    """Seed of the prompt order."""
    val_max_samples: int | None = None
    """Evaluate on at most this many held-out prompts; None = all."""


@dataclass
class RolloutConfig:
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """Generation backend; "auto" = vLLM when CUDA is present and vllm imports, else HF generate."""
    n: int = 5
    """Group size G: responses sampled per prompt."""
    allow_single_sample: bool = False
    """Allow n = 1. Group-relative advantages (GRPO, ICPO) of a group of one are 0, so such a
    run learns nothing from rewards; refused unless this is set."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts (also used for the confidence log-probs);
    >= 1e-3 (colder is greedy decoding, which has no log-probs to train on)."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1.0 = off."""
    top_k: int = -1
    """Top-k sampling; -1 = off."""
    max_response_length: int = 3072
    """Longest response in tokens."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take."""
    enable_sleep_mode: bool = True
    """Let vLLM release its memory while the trainer updates the weights."""
    val_n: int = 1
    """Responses per held-out prompt (mean@k accuracy)."""
    val_temperature: float = 0.0
    """Temperature for held-out evaluation; 0 = greedy."""
    seed: int | None = None
    """Sampling seed; None = derived from trainer.seed."""
    hf_batch_size: int = 64
    """Prompts per ``generate`` call on the HF engine."""


@dataclass
class RewardConfig:
    function: str = "icpo.rewards.verifiable:compute_score"
    """Reward function with verl's signature, as "pkg.mod:fn", "pkg.mod.fn" or "file.py:fn"."""
    answer_weight: float = 0.9
    """Weight of the answer reward in R_verif (Eq. 10)."""
    format_weight: float = 0.1
    """Weight of the format reward in R_verif (Eq. 10)."""
    noise_fraction: float = 0.0
    """Noisy-reward setting: fraction of responses per step given +-noise_magnitude (paper: 0.4)."""
    noise_magnitude: float = 0.3
    """Size of the reward noise (paper: 0.3)."""
    noise_seed: int = 0
    """Seed of the reward-noise generator."""
    drop_mixed_groups: bool = False
    """At every step, train only on the groups whose G rewards are all equal (a harsher setting
    than the paper's coarse-grained one, which filters the data once: ``icpo filter-coarse``)."""


@dataclass
class OmegaConfig:
    schedule: Literal["warmup_decay", "warmup_retention", "linear_decay", "constant"] = "warmup_decay"
    """Schedule of the preference-score weight omega (docs/algorithm.md, "omega over training")."""
    omega_max: float = 1.0
    """Peak omega."""
    omega_min: float = 0.0
    """Omega at the start (warm-up schedules) and at the last step (decay schedules)."""
    peak_fraction: float = 0.4
    """Fraction of training at which the warm-up schedules peak."""


@dataclass
class AlgorithmConfig:
    name: Literal["icpo", "grpo"] = "icpo"
    """Advantage estimator; ICPO with omega = 0 equals GRPO."""
    delta: float | None = None
    """Eq. 9 scale; None = from the parameter count (0.5 < 4B, 0.4 4-8B, 0.3 > 8B)."""
    tau: float = 2.0
    """Eq. 11 clip: the bonus is at most |R_verif| / tau."""
    omega: OmegaConfig = field(default_factory=OmegaConfig)
    """Schedule of omega, the weight of the preference score."""
    scale_advantages: bool = True
    """Divide group-centred rewards by the std (Eq. 5; verl's norm_adv_by_std_in_grpo);
    False = Dr. GRPO style (TRL's scale_rewards="none")."""
    std_scope: Literal["group", "batch"] = "group"
    """Std of each group (verl; TRL's scale_rewards="group") or of the whole batch (TRL's
    scale_rewards="batch"); the mean is always the group's."""
    unbiased_std: bool = False
    """Std with n - 1 (verl/TRL) instead of n (the paper's worked numbers)."""
    eps: float = 1e-6
    """Added to the std before dividing (verl 1e-6, TRL 1e-4)."""
    group_of_one: Literal["zero", "reward"] = "zero"
    """Advantage of a group of one response: 0 (icpo, TRL) or R / (1 + eps) (verl)."""
    compat: Literal["verl", "trl"] | None = None
    """Start from a peer's conventions (std, eps, group of one, loss mode, dual-clip, entropy
    aggregation; docs/compat.md); explicit settings still win. None = icpo's defaults."""
    confidence: Literal["mean_logprob", "log_mean_prob"] = "mean_logprob"
    """Confidence c_i: mean token log-prob or log of mean token prob (docs/algorithm.md step 3)."""


@dataclass
class ActorConfig:
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate after warm-up."""
    clip_low: float = 0.2
    """PPO clip: ratio >= 1 - clip_low; in [0, 1)."""
    clip_high: float = 0.2
    """PPO clip: ratio <= 1 + clip_high; above clip_low = clip-higher."""
    kl_coef: float = 0.001
    """beta of the KL penalty in the loss; 0 = no reference model loaded."""
    kl_estimator: Literal["k3", "k1", "k2"] = "k3"
    """KL estimator between policy and reference."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (subtracted from the loss)."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                           "seq-mean-token-sum-norm", "grpo", "bnpo", "dr_grpo",
                           "dapo"] = "token-mean"
    """How per-token losses become one scalar: verl's agg_loss modes or TRL's loss types, each
    with its peer's arithmetic (docs/compat.md)."""
    entropy_agg_mode: str | None = None
    """Aggregation of the entropy bonus; None = loss_agg_mode (verl); "bnpo" = TRL's."""
    clip_ratio_c: float | None = None
    """Dual-clip (verl's clip_ratio_c, verl default 3): negative-advantage token losses capped
    at -A * clip_ratio_c; None = off."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Ratio per token (PPO/GRPO) or per response from its mean log-ratio (GSPO; TRL's
    importance_sampling_level)."""
    ppo_mini_batch_size: int = 192
    """Prompts per optimizer step (train_batch_size / this = updates per rollout batch)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    max_tokens_per_micro_batch: int = 16384
    """Token budget of one forward/backward over packed sequences."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 = off."""


@dataclass
class TrainerConfig:
    total_steps: int = 500
    """Rollout + update steps."""
    train_batch_size: int = 768
    """Prompts per step."""
    seed: int = 42
    """Seed of model init, sampling and dropout."""
    output_dir: str = "outputs/run"
    """Where metrics.jsonl, checkpoints and config.yaml go."""
    save_every: int = 50
    """Checkpoint every N steps; 0 = only at the end."""
    eval_every: int = 25
    """Held-out evaluation every N steps; 0 = off (also off without data.val_files)."""
    log_every: int = 1
    """Progress-bar figures, TensorBoard and W&B every N steps and at every evaluation
    (metrics.jsonl gets every step)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    tensorboard: bool = False
    """Also log to TensorBoard under output_dir."""
    wandb_project: str | None = None
    """Also log to this W&B project; None = off."""
    progress_bar: bool = True
    """Show a progress bar on the console."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" = CUDA when available, else CPU."""
    max_skipped_steps: int = 3
    """Stop the run after this many consecutive optimizer steps skipped for a non-finite loss or
    gradient norm (docs/failure_behaviour.md)."""
    collapse_entropy_frac: float = 0.99
    """Stop the run when a step's mean token entropy reaches this fraction of log(vocab size),
    i.e. the policy has become uniform (after having been below it); 0 = off."""
    resume_total_steps: Literal["refuse", "rescale"] = "refuse"
    """On --resume with a different total_steps: "refuse", or "rescale" the omega and lr
    schedules to the new length (their value at the current step jumps)."""
    num_threads: int | None = None
    """torch intra-op CPU threads; None = OMP_NUM_THREADS if set, else a quarter of this
    process's share of the cores, at least 1 (see docs/install.md, "Threads")."""
    save_on_interrupt: bool = True
    """On Ctrl-C, write a checkpoint of the last finished step before exiting (code 130)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy and reference model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt datasets and template."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling and the generation engine."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward function, noise and the per-step mixed-group filter."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """ICPO/GRPO advantage settings."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Optimizer and policy loss."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, logging, checkpoints, DeepSpeed."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), safe for ``yaml.safe_dump`` and JSON."""
        return _plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------- YAML reading

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-6`` as a float (YAML 1.1 would keep it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# --------------------------------------------------------------------------- type checking

def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", None) if origin is None else str(tp).replace("typing.", "")


def _fail(name: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
    return ConfigError(f"{name}: got {value!r}; expected {extra or _describe(tp)}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` checked against annotation ``tp`` (int -> float widened), else raise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _fail(name, value, tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(value, a, name)
                except ConfigError:
                    pass
        raise _fail(name, value, tp)
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
        raise _fail(name, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(name, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(name, value, tp)
    if origin is list:
        if isinstance(value, str) and args == (str,):
            value = [value]  # a single file is a one-element list
        if not isinstance(value, (list, tuple)):
            raise _fail(name, value, tp, "a list")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _fail(name, value, tp, f"a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise _fail(name, value, tp)
    raise TypeError(f"{name}: unsupported annotation {tp!r}")  # a bug in this file, not user input


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# Keys that were renamed or removed: naming one is an error that says what to use instead.
_REMOVED = {
    "reward.coarse_filter": (
        "reward.coarse_filter was removed: it dropped every mixed group at every step, which is "
        "not the paper's coarse-grained setting; use reward.drop_mixed_groups=true for that "
        "per-step filter, or `icpo filter-coarse` to filter the training data once as the paper "
        "does (docs/experiments_protocol.md)"),
}


def _unknown(key: str, prefix: str, cls: type) -> ConfigError:
    if prefix + key in _REMOVED:
        return ConfigError(_REMOVED[prefix + key])
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
    return ConfigError(f"unknown config key {prefix + key!r}{hint}")


def _merge(obj: Any, mapping: Any, prefix: str = "") -> None:
    """Set ``obj``'s fields from ``mapping`` recursively, type-checking every value."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: got {mapping!r}; expected a mapping")
    hints = _hints(type(obj))
    for key, value in mapping.items():
        if key not in hints:
            raise _unknown(str(key), prefix, type(obj))
        tp, name = hints[key], prefix + key
        if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
            _merge(getattr(obj, key), value, name + ".")
        else:
            setattr(obj, key, _coerce(value, tp, name))


def _accepts_str(tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_accepts_str(a) for a in args)
    return tp is str or (origin is list and args == (str,))


def _apply_override(cfg: Config, item: str) -> None:
    """Apply one ``a.b.c=value`` override; ``value`` is read as YAML."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r}: expected 'dotted.key=value'")
    dotted, raw = item.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    obj = cfg
    for i, key in enumerate(parts):
        hints = _hints(type(obj))
        if key not in hints:
            raise _unknown(key, "".join(p + "." for p in parts[:i]), type(obj))
        if i < len(parts) - 1:
            obj = getattr(obj, key)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i + 1])} has no sub-keys")
    try:
        value = yaml.load(raw, Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"{dotted}: cannot read {raw!r} as YAML ({e})") from None
    tp = hints[parts[-1]]
    if isinstance(value, (int, float, bool)) and _accepts_str(tp):
        value = raw.strip()  # e.g. output_dir=2024 is a name, not a number
    _merge(obj, {parts[-1]: value}, "".join(p + "." for p in parts[:-1]))


# --------------------------------------------------------------------------- validation

def _get(cfg: Config, dotted: str) -> Any:
    obj = cfg
    for key in dotted.split("."):
        obj = getattr(obj, key)
    return obj


_POS = (lambda v: v > 0, "> 0")
_NONNEG = (lambda v: v >= 0, ">= 0")
_GE1 = (lambda v: v >= 1, ">= 1")
_UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
_OPEN_UNIT = (lambda v: 0 < v <= 1, "in (0, 1]")
_RANGES: dict[str, tuple[Any, str]] = {
    "data.max_prompt_length": _GE1, "data.val_max_samples": _GE1,
    # 1e-3 = icpo.ops.logprobs.MIN_TEMPERATURE (not imported: this module stays torch-free).
    "rollout.n": _GE1, "rollout.temperature": (lambda v: v >= 1e-3, ">= 1e-3"), "rollout.top_p": _OPEN_UNIT,
    "rollout.top_k": (lambda v: v == -1 or v >= 1, "-1 (off) or >= 1"),
    "rollout.max_response_length": _GE1, "rollout.gpu_memory_utilization": _OPEN_UNIT,
    "rollout.val_n": _GE1, "rollout.val_temperature": _NONNEG, "rollout.hf_batch_size": _GE1,
    "reward.answer_weight": _NONNEG, "reward.format_weight": _NONNEG,
    "reward.noise_fraction": _UNIT, "reward.noise_magnitude": _NONNEG,
    "algorithm.delta": _POS, "algorithm.tau": _POS, "algorithm.eps": _POS,
    "algorithm.omega.omega_max": _NONNEG, "algorithm.omega.omega_min": _NONNEG,
    "algorithm.omega.peak_fraction": _UNIT,
    "actor.lr": _POS, "actor.weight_decay": _NONNEG, "actor.lr_warmup_steps": _NONNEG,
    "actor.clip_low": (lambda v: 0 <= v < 1, "in [0, 1)"), "actor.clip_high": _NONNEG, "actor.kl_coef": _NONNEG,
    "actor.ppo_mini_batch_size": _GE1, "actor.ppo_epochs": _GE1,
    "actor.max_tokens_per_micro_batch": _GE1, "actor.grad_clip": _NONNEG,
    "trainer.total_steps": _GE1, "trainer.train_batch_size": _GE1, "trainer.save_every": _NONNEG,
    "trainer.eval_every": _NONNEG, "trainer.log_every": _GE1, "trainer.max_skipped_steps": _GE1,
    "trainer.collapse_entropy_frac": _UNIT, "trainer.num_threads": _GE1,
}


def _check_types(obj: Any, prefix: str, errors: list[str]) -> None:
    for name, tp in _hints(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(tp) and isinstance(value, tp):
            _check_types(value, f"{prefix}{name}.", errors)
            continue
        try:
            _coerce(value, tp, prefix + name)
        except ConfigError as e:
            errors.append(str(e))


_AGG_MODES = typing.get_args(typing.get_type_hints(ActorConfig)["loss_agg_mode"])


def _invalid(errors: list[str]) -> ConfigError:
    """One line for one problem; one indented line per problem for several."""
    if len(errors) == 1:
        return ConfigError(f"invalid config: {errors[0]}")
    return ConfigError("invalid config:\n  " + "\n  ".join(errors))


def validate(cfg: Config) -> Config:
    """Check every field's type and range and the cross-field rules; raise one ConfigError
    listing every problem, each naming its dotted field. Returns ``cfg``."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"config: got {type(cfg).__name__}; expected icpo.config.Config")
    errors: list[str] = []
    _check_types(cfg, "", errors)
    if errors:
        raise _invalid(errors)
    for dotted, (ok, allowed) in _RANGES.items():
        v = _get(cfg, dotted)
        if v is not None and (isinstance(v, float) and not math.isfinite(v) or not ok(v)):
            errors.append(f"{dotted}: got {v!r}; expected {allowed}")
    a, t, o = cfg.actor, cfg.trainer, cfg.algorithm.omega
    if not all(0 <= b < 1 for b in a.betas):
        errors.append(f"actor.betas: got {list(a.betas)!r}; expected two values in [0, 1)")
    if a.clip_ratio_c is not None and not a.clip_ratio_c > 1:
        errors.append(f"actor.clip_ratio_c: got {a.clip_ratio_c!r}; expected > 1 or null (off)")
    if a.entropy_agg_mode is not None and a.entropy_agg_mode not in _AGG_MODES:
        errors.append(f"actor.entropy_agg_mode: got {a.entropy_agg_mode!r}; expected null or one "
                      f"of {', '.join(_AGG_MODES)}")
    if a.clip_high < a.clip_low:
        errors.append(f"actor.clip_high: got {a.clip_high!r}; expected >= actor.clip_low ({a.clip_low!r})")
    if a.ppo_mini_batch_size > t.train_batch_size or t.train_batch_size % a.ppo_mini_batch_size:
        errors.append(f"actor.ppo_mini_batch_size: got {a.ppo_mini_batch_size!r}; expected a divisor "
                      f"of trainer.train_batch_size ({t.train_batch_size!r})")
    if cfg.rollout.n == 1 and not cfg.rollout.allow_single_sample:
        errors.append(f"rollout.n: got 1; {cfg.algorithm.name}'s group-relative advantages of one "
                      "response are 0, so nothing would be learned (set "
                      "rollout.allow_single_sample=true to run anyway)")
    if o.omega_min > o.omega_max:
        errors.append(f"algorithm.omega.omega_min: got {o.omega_min!r}; expected <= "
                      f"algorithm.omega.omega_max ({o.omega_max!r})")
    if a.lr_warmup_steps > t.total_steps:
        errors.append(f"actor.lr_warmup_steps: got {a.lr_warmup_steps!r}; expected <= "
                      f"trainer.total_steps ({t.total_steps!r})")
    for dotted in ("model.path", "reward.function", "data.prompt_key", "data.answer_key",
                   "trainer.output_dir"):
        if not _get(cfg, dotted).strip():
            errors.append(f"{dotted}: got an empty string; expected a non-empty value")
    if errors:
        raise _invalid(errors)
    return cfg


# --------------------------------------------------------------------------- public API

def config_from_dict(d: dict[str, Any] | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults, then mapping ``d`` merged recursively, then ``overrides``; validated. When the
    result names ``algorithm.compat``, that preset (:mod:`icpo.compat`) goes in right after the
    defaults, so ``d`` and ``overrides`` still win over it."""
    overrides = list(overrides)

    def build(preset: dict[str, Any] | None) -> Config:
        cfg = Config()
        for mapping in (preset, d):
            if mapping is not None:
                _merge(cfg, mapping)
        for item in overrides:
            _apply_override(cfg, item)
        return cfg

    cfg = build(None)
    if cfg.algorithm.compat is not None:
        from icpo.compat import preset

        cfg = build(preset(cfg.algorithm.compat))
    return validate(cfg)


def load_config(path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config (None = defaults only), apply dotted overrides, validate."""
    data = None
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {os.fspath(path)!r}")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.load(f, Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
            except yaml.YAMLError as e:
                raise ConfigError(f"{os.fspath(path)}: invalid YAML ({e})") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{os.fspath(path)}: got {type(data).__name__}; expected a mapping")
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: got the string {overrides!r}; expected a list of strings")
    return config_from_dict(data, overrides)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".config-", suffix=".yaml.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False, default_flow_style=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> its attribute docstring, for every field of ``cls`` recursively."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[prefix + stmt.target.id] = nxt.value.value.strip()
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            docs.update(field_docs(tp, f"{prefix}{name}."))
    return docs


__all__ = [
    "ActorConfig", "AlgorithmConfig", "Config", "ConfigError", "DataConfig", "ModelConfig",
    "OmegaConfig", "RewardConfig", "RolloutConfig", "TrainerConfig", "config_from_dict",
    "field_docs", "load_config", "save_config", "validate",
]
