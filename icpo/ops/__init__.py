"""icpo's compiled ops: typed wrappers with input validation, fake kernels and autograd.

Each public op here has a pure-PyTorch twin in :mod:`icpo.ops.reference` with the same
arguments; tests and benchmarks compare the two. Importing this package loads the compiled
extension ``icpo._C``, which registers the ``torch.ops.icpo.*`` operators.
"""

import torch  # noqa: F401  (loads libtorch before our extension links against it)

from icpo import _C  # noqa: F401  (registers torch.ops.icpo.*)

from icpo.ops import reference
from icpo.ops.groups import ICPOAdvantages, grpo_advantages, icpo_advantages, preference_scores
from icpo.ops.logprobs import token_logprobs
from icpo.ops.segments import pack_padded, segment_mean, unpack_to_padded

__all__ = [
    "ICPOAdvantages",
    "grpo_advantages",
    "icpo_advantages",
    "pack_padded",
    "preference_scores",
    "reference",
    "segment_mean",
    "token_logprobs",
    "unpack_to_padded",
]
