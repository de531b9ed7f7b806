"""Process defaults that must be settled before torch starts: CPU threads and OpenMP waiting.

Why: with torch's default (one intra-op thread per core) and OpenMP's default of spinning
while it waits, a small model on a machine that runs anything else loses most of its time in
spin-waits at every parallel region — measured on 2 cores: 3.0x slower beside one busy
process, 5.7x when two copies run at once (``bench/bench_threads.py``). Sleeping waits and
a thread count that leaves room for others keep each process at about its fair share.

Two calls, both imported without torch:

- :func:`set_thread_env_defaults` — call before ``import torch`` (the OpenMP runtime reads its
  environment once, when libtorch loads it). Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user
  set it.
- :func:`apply_num_threads` — after import, pick torch's intra-op thread count. An explicit
  setting (``trainer.num_threads``) wins, then the user's ``OMP_NUM_THREADS``, then the
  automatic choice :func:`auto_num_threads`.

``ICPO_KEEP_THREAD_DEFAULTS=1`` turns both off (torch's and OpenMP's own defaults), which is
how the benchmark reproduces the old behaviour.
"""

from __future__ import annotations

import os
import sys

OPT_OUT = "ICPO_KEEP_THREAD_DEFAULTS"
"""Environment variable: when "1", leave torch's and OpenMP's thread defaults alone."""


def _opted_out() -> bool:
    return os.environ.get(OPT_OUT, "") == "1"


def set_thread_env_defaults() -> None:
    """Make OpenMP threads sleep instead of spinning while they wait for work, unless the user
    chose a policy. Does nothing once torch is imported: its OpenMP runtime has read the
    environment already, and the variable would only leak into child processes (a program
    that imports torch first sets OMP_WAIT_POLICY in its own environment)."""
    if _opted_out() or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or cgroups)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_num_threads(cores: int | None = None, local_processes: int | None = None) -> int:
    """The default intra-op thread count: a quarter of this process's share of the cores, at
    least one. On the 2- to 7-core machines the quick start targets that is 1, which on the
    tiny model is within a few percent of 2 threads on an idle machine and several times
    faster on a busy one; on a 64-core node with 8 ranks it is 2 per rank."""
    cores = usable_cores() if cores is None else cores
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // (4 * max(1, local_processes)))


def resolve_num_threads(setting: int | None, env: dict | None = None) -> tuple[int | None, str]:
    """``(threads, source)``: the intra-op thread count to set and why; ``threads`` is None
    when nothing should be changed (the user's ``OMP_NUM_THREADS`` already applied, or opted
    out)."""
    env = os.environ if env is None else env
    if setting is not None:
        return setting, "trainer.num_threads"
    if env.get("OMP_NUM_THREADS", "").strip():
        return None, "OMP_NUM_THREADS"
    if env.get(OPT_OUT, "") == "1":
        return None, OPT_OUT
    return auto_num_threads(), "auto"


def apply_num_threads(setting: int | None = None) -> int:
    """Set torch's intra-op thread count from ``setting`` (None = automatic, see module
    docstring); returns the count in effect."""
    import torch

    threads, _ = resolve_num_threads(setting)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()
