"""Named presets that make icpo compute its peers' numbers: ``algorithm.compat: verl | trl``.

A preset is a partial config merged onto the defaults *before* the user's file and overrides,
so anything set explicitly still wins. Each value is the peer's default for the same
convention (verl's ``ppo_trainer.yaml`` with ``algorithm.adv_estimator=grpo``; TRL 1.16's
``GRPOConfig``); docs/compat.md has the table and the conventions no setting covers.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "verl": {
        "algorithm": {
            "scale_advantages": True,      # norm_adv_by_std_in_grpo: true
            "std_scope": "group",
            "unbiased_std": True,          # torch.std
            "eps": 1e-6,                   # epsilon
            "group_of_one": "reward",      # mean 0, std 1 for a singleton group
        },
        "actor": {
            "clip_low": 0.2, "clip_high": 0.2,   # clip_ratio (low/high)
            "clip_ratio_c": 3.0,                 # dual-clip
            "loss_agg_mode": "token-mean",
            "entropy_agg_mode": None,            # entropy aggregated like the loss
            "importance_sampling_level": "token",
            "kl_estimator": "k3",                # kl_loss_type: low_var_kl
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
        },
    },
}

COMPAT_NAMES = tuple(PRESETS)


def preset(name: str) -> dict[str, Any]:
    """The partial config of preset ``name`` (a fresh copy)."""
    if name not in PRESETS:
        raise ValueError(f"algorithm.compat must be one of {COMPAT_NAMES} or null, got {name!r}")
    return {section: dict(values) for section, values in PRESETS[name].items()}
