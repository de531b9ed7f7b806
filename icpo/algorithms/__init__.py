"""GRPO/ICPO algorithm pieces as pure tensor functions: omega schedules, confidence,
advantages, KL estimators, loss aggregation and the clipped policy loss; dynamic sampling,
overlong shaping and rollout correction."""

from icpo.algorithms.advantages import (
    ALGORITHMS,
    CONFIDENCE_KINDS,
    compute_advantages,
    confidence_from_logprobs,
)
from icpo.algorithms.dynamic_sampling import (
    FILTER_METRICS,
    FilterGroupsLimitError,
    GroupAccumulator,
    filter_metric,
    keep_groups,
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
from icpo.algorithms.overlong import (
    loss_token_weights,
    overlong_penalty,
    truncated_mask,
    truncated_mask_from_tokens,
)
from icpo.algorithms.rollout_correction import (
    ROLLOUT_IS_LEVELS,
    ROLLOUT_IS_MODES,
    TRL_IS_MODES,
    apply_rollout_is,
    rollout_is_weights,
    rollout_mismatch_metrics,
)
from icpo.algorithms.schedules import SCHEDULES, default_delta, omega_at

__all__ = [
    "AGG_MODES",
    "ALGORITHMS",
    "CONFIDENCE_KINDS",
    "FILTER_METRICS",
    "FilterGroupsLimitError",
    "GroupAccumulator",
    "IS_LEVELS",
    "KL_ESTIMATORS",
    "LENGTH_NORM_MODES",
    "ROLLOUT_IS_LEVELS",
    "ROLLOUT_IS_MODES",
    "SCHEDULES",
    "TRL_IS_MODES",
    "aggregate",
    "apply_rollout_is",
    "broadcast_to_tokens",
    "check_packed",
    "compute_advantages",
    "confidence_from_logprobs",
    "default_delta",
    "filter_metric",
    "grpo_loss",
    "keep_groups",
    "kl_penalty",
    "loss_token_weights",
    "omega_at",
    "overlong_penalty",
    "policy_loss",
    "rollout_is_weights",
    "rollout_mismatch_metrics",
    "seq_ids_from_cu_seqlens",
    "truncated_mask",
    "truncated_mask_from_tokens",
]
