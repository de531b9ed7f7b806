"""icpo: ICPO and GRPO post-training for LLMs on fused C++/CUDA kernels.

Importing the package loads the compiled extension ``icpo._C``, which registers the
``torch.ops.icpo.*`` operators; :mod:`icpo.ops` wraps them with validation and autograd.
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
    raise ImportError(f"icpo's compiled extension was built against torch {_build_info.torch_version}"
                      f" but torch {torch.__version__} is installed: rebuild it against this torch"
                      " with `pip install --no-build-isolation --no-deps -e .` (or without -e)")

from icpo import _C  # noqa: E402,F401  (registers torch.ops.icpo.*)
from icpo import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
