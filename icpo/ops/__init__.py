"""icpo's compiled ops: typed wrappers with input validation, fake kernels and autograd.

Each public op here has a pure-PyTorch twin in :mod:`icpo.ops.reference` with the same
arguments; tests and benchmarks compare the two.
"""

from icpo.ops import reference
from icpo.ops.cpu import (cpu_capability, forced_cpu_capability, set_cpu_capability,
                          supported_cpu_capabilities)
from icpo.ops.groups import (
    ICPOAdvantages,
    grpo_advantages,
    icpo_advantages,
    preference_scores,
    reward_limit,
)
from icpo.ops.logprobs import token_logprobs
from icpo.ops.segments import pack_padded, segment_mean, unpack_to_padded

__all__ = [
    "ICPOAdvantages",
    "cpu_capability",
    "forced_cpu_capability",
    "grpo_advantages",
    "icpo_advantages",
    "pack_padded",
    "preference_scores",
    "reference",
    "reward_limit",
    "segment_mean",
    "set_cpu_capability",
    "supported_cpu_capabilities",
    "token_logprobs",
    "unpack_to_padded",
]
