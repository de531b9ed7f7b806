"""icpo's compiled ops: typed wrappers with input validation, fake kernels and autograd.

Each public op here has a pure-PyTorch twin in :mod:`icpo.ops.reference` with the same
arguments; tests and benchmarks compare the two. Importing this package loads the compiled
extension ``icpo._C``, which registers the ``torch.ops.icpo.*`` operators.

Each op family's module is named as in ``csrc/`` and ``tests/`` (``token_logprobs``,
``segment_mean``, ``group_advantages``). Where the module and its op share a name, the package
attribute is the function: reach the module's other names with ``from icpo.ops.token_logprobs
import MIN_TEMPERATURE`` (which reads ``sys.modules``), not ``icpo.ops.token_logprobs.X``.
"""

import torch  # noqa: F401  (loads libtorch before our extension links against it)

try:
    from icpo import _build_info  # written by the build (cmake/TorchCuda.cmake)
except ImportError as exc:
    raise ImportError("icpo's compiled extension is missing or older than this source: build it "
                      "with `pip install --no-build-isolation --no-deps -e .`") from exc

if torch.__version__ != _build_info.torch_version:
    # A C++ extension only works with the torch it was compiled against; a build in an isolated
    # environment (pip install . without --no-build-isolation) may have used another one.
    raise ImportError("icpo's compiled extension was built against torch "
                      f"{_build_info.torch_version} but torch {torch.__version__} is installed: "
                      "rebuild it against this torch with "
                      "`pip install --no-build-isolation --no-deps -e .` (or without -e)")

from icpo import _C  # noqa: E402,F401  (registers torch.ops.icpo.*)
from icpo.ops import reference
from icpo.ops.cpu import (
    cpu_capability,
    forced_cpu_capability,
    set_cpu_capability,
    supported_cpu_capabilities,
)
from icpo.ops.group_advantages import (
    ICPOAdvantages,
    grpo_advantages,
    icpo_advantages,
    preference_scores,
    reward_limit,
)
from icpo.ops.linear_token_logprobs import linear_token_logprobs
from icpo.ops.segment_mean import pack_padded, segment_mean, unpack_to_padded
from icpo.ops.token_logprobs import token_logprobs

__all__ = [
    "ICPOAdvantages",
    "cpu_capability",
    "forced_cpu_capability",
    "grpo_advantages",
    "icpo_advantages",
    "linear_token_logprobs",
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
