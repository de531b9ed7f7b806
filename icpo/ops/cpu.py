"""Which compiled variant of icpo's vectorized CPU kernels runs (``docs/cpu_kernels.md``).

``token_logprobs`` and ``segment_mean`` are compiled once per instruction set ("default" for any
CPU, "avx2", "avx512"; or a single "native" build with ``ICPO_NATIVE=ON``) and one variant is
picked on first use: the best this CPU and its OS can run, no higher than ATen's own capability
(so ``ATEN_CPU_CAPABILITY=avx2`` also lowers ours). ``ICPO_CPU_CAPABILITY=default|avx2|avx512``
forces one; a variant the CPU cannot run is refused with the reason, never run.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

import icpo._C  # noqa: F401  (registers torch.ops.icpo.*)

ENV_VAR = "ICPO_CPU_CAPABILITY"


def cpu_capability() -> str:
    """The CPU kernel variant in use: ``"default"``, ``"avx2"``, ``"avx512"`` or ``"native"``."""
    return torch.ops.icpo.cpu_capability()


def supported_cpu_capabilities() -> list[str]:
    """The variants of this build that this CPU can run, least capable first."""
    return list(torch.ops.icpo.supported_cpu_capabilities())


def set_cpu_capability(name: str) -> str:
    """Switch the CPU kernels to variant ``name`` (``"auto"``: the automatic choice), process-wide.

    For tests and benchmarks; returns the variant now in use. Raises ``RuntimeError`` naming the
    problem for an unknown name or one this CPU cannot run.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    return torch.ops.icpo.set_cpu_capability(name)


@contextlib.contextmanager
def forced_cpu_capability(name: str) -> Iterator[str]:
    """Run the block with variant ``name``, then restore the one in use before."""
    before = cpu_capability()
    try:
        yield set_cpu_capability(name)
    finally:
        set_cpu_capability(before)


def _check_environment() -> None:
    """Refuse a bad ``ICPO_CPU_CAPABILITY`` at import, before any model is loaded."""
    name = os.environ.get(ENV_VAR)
    if name:
        try:
            torch.ops.icpo.set_cpu_capability(name)  # what the first kernel call would do
        except RuntimeError as exc:
            raise ValueError(str(exc).splitlines()[0].replace("set_cpu_capability", ENV_VAR)) \
                from None


_check_environment()
