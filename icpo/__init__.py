"""icpo: ICPO and GRPO post-training for LLMs on fused C++/CUDA kernels.

``import icpo`` is light (no torch), so the command line answers ``--help`` at once. The
compiled extension ``icpo._C``, which registers the ``torch.ops.icpo.*`` operators, is loaded
by :mod:`icpo.ops` — on ``import icpo.ops`` or on first use of ``icpo.ops``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]


def __getattr__(name: str) -> Any:
    # ``icpo.ops`` on first access: imports torch and registers the compiled ops.
    if name == "ops":
        return importlib.import_module("icpo.ops")
    raise AttributeError(f"module 'icpo' has no attribute {name!r}")
