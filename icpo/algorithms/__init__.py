"""GRPO/ICPO algorithm pieces as pure tensor functions: omega schedules, confidence,
advantages, KL estimators, loss aggregation and the clipped policy loss."""

from icpo.algorithms.advantages import (
    ALGORITHMS,
    CONFIDENCE_KINDS,
    compute_advantages,
    confidence_from_logprobs,
)
from icpo.algorithms.losses import (
    AGG_MODES,
    IS_LEVELS,
    KL_ESTIMATORS,
    LENGTH_NORM_MODES,
    aggregate,
    broadcast_to_tokens,
    check_packed,
    grpo_loss,
    kl_penalty,
    policy_loss,
    seq_ids_from_cu_seqlens,
)
from icpo.algorithms.schedules import SCHEDULES, default_delta, omega_at

__all__ = [
    "AGG_MODES",
    "ALGORITHMS",
    "CONFIDENCE_KINDS",
    "IS_LEVELS",
    "KL_ESTIMATORS",
    "LENGTH_NORM_MODES",
    "SCHEDULES",
    "aggregate",
    "broadcast_to_tokens",
    "check_packed",
    "compute_advantages",
    "confidence_from_logprobs",
    "default_delta",
    "grpo_loss",
    "kl_penalty",
    "omega_at",
    "policy_loss",
    "seq_ids_from_cu_seqlens",
]
