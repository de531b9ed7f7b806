"""Named presets that make icpo compute its peers' numbers: ``algorithm.compat: verl | trl``.

A preset is a partial config merged onto the defaults *before* the user's file and overrides,
so anything set explicitly still wins. Each value is the peer's default for the same
convention (verl's ``ppo_trainer.yaml`` with ``algorithm.adv_estimator=grpo``; TRL 1.16's
``GRPOConfig``); docs/compat.md has the table and the conventions no setting covers.
"""

from __future__ import annotations

import importlib.util
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "verl": {
        "algorithm": {
            "scale_advantages": True,      # norm_adv_by_std_in_grpo: true
            "std_scope": "group",
            "unbiased_std": True,          # torch.std
            "eps": 1e-6,                   # epsilon
            "group_of_one": "reward",      # mean 0, std 1 for a singleton group
            "filter_groups": {"enable": False},            # DAPO recipe only
            "rollout_correction": {"rollout_is": None, "rollout_is_threshold": 2.0,
                                   "rollout_is_mode": "truncate",
                                   "rollout_is_threshold_lower": None},
        },
        "reward": {"overlong_buffer": {"enable": False}},
        "actor": {
            "clip_low": 0.2, "clip_high": 0.2,   # clip_ratio (low/high)
            "clip_ratio_c": 3.0,                 # dual-clip
            "loss_agg_mode": "token-mean",
            "entropy_agg_mode": None,            # entropy aggregated like the loss
            "importance_sampling_level": "token",
            "kl_estimator": "k3",                # kl_loss_type: low_var_kl
            "mask_truncated": False,             # verl has no such mask
        },
    },
    "trl": {
        "algorithm": {
            "scale_advantages": True,      # scale_rewards: "group"
            "std_scope": "group",
            "unbiased_std": True,          # nanstd (Bessel)
            "eps": 1e-4,                   # hard-coded in GRPOTrainer
            "group_of_one": "zero",
        },
        "actor": {
            "clip_low": 0.2, "clip_high": 0.2,   # epsilon, epsilon_high = epsilon
            "clip_ratio_c": None,
            "loss_agg_mode": "dapo",             # loss_type default
            "entropy_agg_mode": "bnpo",          # micro-batch token mean, any loss_type
            "importance_sampling_level": "token",
            "kl_coef": 0.0,                      # beta
            "kl_estimator": "k3",
            "mask_truncated": False,             # mask_truncated_completions
        },
    },
}

#: TRL's vllm_importance_sampling_correction (on by default, but only when TRL generates with
#: vLLM): vllm_importance_sampling_mode sequence_mask, clip_max 3.0, clip_min None.
TRL_VLLM_ROLLOUT_CORRECTION = {"rollout_is": "sequence", "rollout_is_mode": "mask",
                               "rollout_is_threshold": 3.0, "rollout_is_threshold_lower": None}

COMPAT_NAMES = tuple(PRESETS)


def preset(name: str, engine: str | None = None) -> dict[str, Any]:
    """The partial config of preset ``name`` (a fresh copy) for ``rollout.engine`` =
    ``engine``: TRL's rollout correction is on only where the engine is (or "auto" picks) vLLM,
    as TRL corrects only when it generates with vLLM."""
    if name not in PRESETS:
        raise ValueError(f"algorithm.compat must be one of {COMPAT_NAMES} or null, got {name!r}")
    out = {section: dict(values) for section, values in PRESETS[name].items()}
    if name == "trl" and _engine_is_vllm(engine):
        out["algorithm"]["rollout_correction"] = dict(TRL_VLLM_ROLLOUT_CORRECTION)
    return out


def _engine_is_vllm(engine: str | None) -> bool:
    """``rollout.engine`` resolves to vLLM: named, or "auto" with vllm and CUDA present
    (icpo.rollout.vllm_available's rule; torch is imported only where vllm is installed)."""
    if engine != "auto":
        return engine == "vllm"
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()
