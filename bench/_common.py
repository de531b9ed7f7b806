"""Shared helpers for the benchmark scripts in ``bench/``.

Small and stable on purpose; every bench script imports it:

- :func:`machine_info` -> dict describing the host, versions and date (goes into every result file).
- :func:`time_fn` -> p50/p20/p80 wall time in ms of a callable (CUDA-synchronized when on GPU).
- :func:`write_results` -> atomically writes ``bench/results/<name>.json`` and returns its path.
- :func:`markdown_table` -> a GitHub markdown table from a list of row dicts.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from icpo._io import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    """The SIMD extensions the host advertises (the ones our kernels can use)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512bw",
                                                              "avx512_bf16", "avx512_fp16"})
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """Host, hardware, library versions and the current UTC date, for result files."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_simd": _cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import icpo

        info["icpo"] = icpo.__version__
    except Exception as exc:  # a broken build should not hide the other numbers
        info["icpo"] = f"unavailable: {exc}"
    return info


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], warmup: int = 3, iters: int = 10) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` timed times.

    Returns ``{"p50", "p20", "p80"}`` in milliseconds. On CUDA each call is bracketed by
    synchronizations so the time covers the kernels, not just their launch.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(max(warmup, 0)):
        fn()
    _sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    if len(times) == 1:
        return {"p50": times[0], "p20": times[0], "p80": times[0]}
    # quantiles(n=10) gives the 10th..90th percentile cut points; index 1 = p20, 7 = p80.
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return {"p50": statistics.median(times), "p20": deciles[1], "p80": deciles[7]}


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as JSON to ``bench/results/<name>.json`` atomically; return the path.

    ``machine`` is added from :func:`machine_info` when the payload lacks it.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("machine", machine_info())
    return atomic_write_text(RESULTS_DIR / f"{name}.json",
                             json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table with one line per row dict; missing cells print as ``-``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
