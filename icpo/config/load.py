"""Reading, checking and writing run configs (the dataclasses are in ``schema.py``).

Merges YAML mappings and dotted overrides onto the defaults with every value type-checked
(:func:`config_from_dict`, :func:`load_config`), checks ranges and cross-field rules
(:func:`validate`) and writes a config back atomically (:func:`save_config`). ``icpo.config``
re-exports these.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from icpo._io import atomic_path
from icpo.config.schema import AggMode, Config, ConfigError, describe

# --------------------------------------------------------------------------- YAML reading

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-6`` as a float (YAML 1.1 would keep it a string) and
    refuses a key given twice in one mapping (PyYAML silently keeps the last: a second
    ``actor:`` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` may be overridden
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: SafeLoader's own error follows
                    continue
                if first is not None:
                    where = "" if self.name.startswith("<") else f"{self.name}:"
                    raise ConfigError(f"{where}{line + 1}: duplicate key {key!r} (first given "
                                      f"on line {first + 1}); give each key once")
                seen[key] = line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


# --------------------------------------------------------------------------- type checking

def _fail(name: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
    return ConfigError(f"{name}: got {value!r}; expected {extra or describe(tp)}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` checked against annotation ``tp`` (int -> float widened), else raise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        # YAML 1.1 reads a bare on / off (and yes / no) as a bool: take it as the name it was
        # written as where the field allows "on" / "off" (actor.fused_linear).
        if type(value) is bool and ("on" if value else "off") in args:
            return "on" if value else "off"
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
    hint = (f"; did you mean {prefix + close[0]!r}?" if close
            else f"; known keys: {', '.join(names)}")
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
    "model.lora_rank": _NONNEG, "model.lora_alpha": _POS,
    "model.lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    # 1e-3 = icpo.ops.token_logprobs.MIN_TEMPERATURE (not imported: config stays torch-free).
    "rollout.n": _GE1, "rollout.temperature": (lambda v: v >= 1e-3, ">= 1e-3"),
    "rollout.top_p": _OPEN_UNIT,
    "rollout.top_k": (lambda v: v == -1 or v >= 1, "-1 (off) or >= 1"),
    "rollout.max_response_length": _GE1, "rollout.gpu_memory_utilization": _OPEN_UNIT,
    "rollout.val_n": _GE1, "rollout.val_temperature": _NONNEG, "rollout.hf_batch_size": _GE1,
    "reward.answer_weight": _NONNEG, "reward.format_weight": _NONNEG,
    "reward.noise_fraction": _UNIT, "reward.noise_magnitude": _NONNEG,
    "reward.timeout_s": _NONNEG,
    "algorithm.delta": _POS, "algorithm.tau": _POS, "algorithm.eps": _POS,
    "algorithm.omega.omega_max": _NONNEG, "algorithm.omega.omega_min": _NONNEG,
    "algorithm.omega.peak_fraction": _UNIT,
    "reward.overlong_buffer.len": _NONNEG, "reward.overlong_buffer.penalty_factor": _NONNEG,
    "algorithm.filter_groups.max_num_gen_batches": (lambda v: v >= 0, ">= 0 (0 = no limit)"),
    "algorithm.rollout_correction.rollout_is_threshold": _POS,
    "actor.lr": _POS, "actor.weight_decay": _NONNEG, "actor.lr_warmup_steps": _NONNEG,
    "actor.clip_low": (lambda v: 0 <= v < 1, "in [0, 1)"), "actor.clip_high": _NONNEG,
    "actor.kl_coef": _NONNEG,
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


_F32_MAX, _F32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38
_REWARD_SCALE_MAX = 1e6
_REWARD_SCALES = ("reward.answer_weight", "reward.format_weight", "reward.noise_magnitude",
                  "reward.overlong_buffer.penalty_factor", "algorithm.omega.omega_max",
                  "algorithm.omega.omega_min")
"""Fields that scale rewards: the group statistics square and sum those in float32."""


def _float32_errors(obj: Any, prefix: str, errors: list[str]) -> None:
    """Every float field is finite and, unless 0, a normal float32 (the math is float32: 1e39
    is inf there, 1e-40 a denormal whose reciprocal is inf); reward scales at most 1e6."""
    for name, tp in _hints(type(obj)).items():
        value, dotted = getattr(obj, name), prefix + name
        if dataclasses.is_dataclass(tp) and isinstance(value, tp):
            _float32_errors(value, dotted + ".", errors)
            continue
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            if not isinstance(v, float):
                continue
            if not math.isfinite(v) or abs(v) > _F32_MAX or 0 < abs(v) < _F32_TINY:
                errors.append(f"{dotted}: got {value!r}; expected a finite value a float32 can "
                              f"hold (0 or 1.2e-38 <= |value| <= 3.4e38)")
                break
            if dotted in _REWARD_SCALES and abs(v) > _REWARD_SCALE_MAX:
                errors.append(f"{dotted}: got {v!r}; expected <= {_REWARD_SCALE_MAX:g} (rewards "
                              "are squared and summed in float32)")
                break


_AGG_MODES = typing.get_args(AggMode)


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
    _float32_errors(cfg, "", errors)
    for dotted, (ok, allowed) in _RANGES.items():
        v = _get(cfg, dotted)
        if v is not None and (isinstance(v, float) and not math.isfinite(v) or not ok(v)):
            errors.append(f"{dotted}: got {v!r}; expected {allowed}")
    if errors:  # the cross-field rules below assume each field in range (e.g. divide by it)
        raise _invalid(errors)
    a, t, o = cfg.actor, cfg.trainer, cfg.algorithm.omega
    if not all(0 <= b < 1 for b in a.betas):
        errors.append(f"actor.betas: got {list(a.betas)!r}; expected two values in [0, 1)")
    if a.clip_ratio_c is not None and not a.clip_ratio_c > 1:
        errors.append(f"actor.clip_ratio_c: got {a.clip_ratio_c!r}; expected > 1 or null (off)")
    if a.entropy_agg_mode is not None and a.entropy_agg_mode not in _AGG_MODES:
        errors.append(f"actor.entropy_agg_mode: got {a.entropy_agg_mode!r}; expected null or one "
                      f"of {', '.join(_AGG_MODES)}")
    if a.clip_high < a.clip_low:
        errors.append(f"actor.clip_high: got {a.clip_high!r}; expected >= actor.clip_low "
                      f"({a.clip_low!r})")
    if a.ppo_mini_batch_size > t.train_batch_size or t.train_batch_size % a.ppo_mini_batch_size:
        errors.append(f"actor.ppo_mini_batch_size: got {a.ppo_mini_batch_size!r}; expected a "
                      f"divisor of trainer.train_batch_size ({t.train_batch_size!r})")
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
    errors += _peer_feature_errors(cfg)
    targets = cfg.model.target_modules
    if not (targets.strip() if isinstance(targets, str)
            else targets and all(isinstance(t, str) and t.strip() for t in targets)):
        errors.append(f"model.target_modules: got {targets!r}; expected \"all-linear\", a "
                      "module-name regex or a non-empty list of module names")
    for dotted in ("model.path", "reward.function", "data.prompt_key", "data.answer_key",
                   "trainer.output_dir"):
        if not _get(cfg, dotted).strip():
            errors.append(f"{dotted}: got an empty string; expected a non-empty value")
    if errors:
        raise _invalid(errors)
    return cfg


def _peer_feature_errors(cfg: Config) -> list[str]:
    """Cross-field rules of dynamic sampling, overlong shaping and rollout correction."""
    errors = []
    ob, m = cfg.reward.overlong_buffer, cfg.rollout.max_response_length
    if ob.enable and not 1 <= ob.len <= m:
        errors.append(f"reward.overlong_buffer.len: got {ob.len!r}; expected an int in [1, "
                      f"rollout.max_response_length={m}] when reward.overlong_buffer.enable")
    if cfg.algorithm.filter_groups.enable and cfg.reward.drop_mixed_groups:
        errors.append("algorithm.filter_groups.enable: cannot be combined with "
                      "reward.drop_mixed_groups (one drops the groups whose rewards all agree, "
                      "the other keeps only those); set one of them to false")
    rc = cfg.algorithm.rollout_correction
    low = rc.rollout_is_threshold_lower
    if low is not None and not 0 <= low < rc.rollout_is_threshold:
        errors.append(f"algorithm.rollout_correction.rollout_is_threshold_lower: got {low!r}; "
                      "expected null or a value in [0, rollout_is_threshold="
                      f"{rc.rollout_is_threshold!r})")
    return errors


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

        cfg = build(preset(cfg.algorithm.compat, engine=cfg.rollout.engine))
    return validate(cfg)


def load_config(path: str | os.PathLike | None = None,
                overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config (None = defaults only), apply dotted overrides, validate."""
    data = None
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {os.fspath(path)!r}")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ConfigError(f"{os.fspath(path)}: cannot read the config file "
                              f"({e.strerror or e})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ConfigError(f"{os.fspath(path)}:{line}: not UTF-8 text (byte "
                              f"0x{raw[e.start]:02x} at offset {e.start}); save the config as "
                              "UTF-8") from None
        loader = _Loader(text)
        loader.name = os.fspath(path)  # duplicate-key errors name the file
        try:
            data = loader.get_single_data()
        except yaml.YAMLError as e:
            raise ConfigError(f"{os.fspath(path)}: invalid YAML ({e})") from None
        finally:
            loader.dispose()
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{os.fspath(path)}: got {type(data).__name__}; expected a mapping")
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: got the string {overrides!r}; expected a list of strings")
    return config_from_dict(data, overrides)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML atomically (``icpo._io.atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False, default_flow_style=False)
