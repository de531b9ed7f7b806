"""icpo: ICPO and GRPO post-training for LLMs on fused C++/CUDA kernels.

Importing the package loads the compiled extension ``icpo._C``, which registers the
``torch.ops.icpo.*`` operators; :mod:`icpo.ops` wraps them with validation and autograd.
"""

import torch  # noqa: F401  (loads libtorch before our extension links against it)

from icpo import _C  # noqa: F401  (registers torch.ops.icpo.*)
from icpo import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
