"""What a finished run prints (``icpo train`` and ``examples/train_icpo.py`` alike): the
held-out accuracy before and after, and where the metrics, the plot and the checkpoints are."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def print_summary(cfg: Any, history: list[dict[str, Any]] | None) -> Path | None:
    """Plot ``metrics.jsonl`` to ``curves.png`` and print the summary; returns the plot's path
    (None when matplotlib is missing: the summary says so instead)."""
    out = Path(cfg.trainer.output_dir)
    try:
        from icpo.trainer.plots import plot_metrics

        png: Path | None = plot_metrics(out / "metrics.jsonl", out / "curves.png",
                                        title=f"{cfg.algorithm.name.upper()} on {cfg.model.path}")
    except ImportError as e:
        png = None
        print(f"icpo: warning: no plot ({e})", file=sys.stderr)
    val = [(h["step"], h["val/accuracy"]) for h in history or [] if "val/accuracy" in h]
    if val:
        (s0, a0), (s1, a1) = val[0], val[-1]
        print(f"held-out accuracy: {a0:.3f} (step {s0}) -> {a1:.3f} (step {s1}), "
              f"{100 * (a1 - a0):+.1f} points")
    ck = out / "checkpoints"
    latest = (ck / "latest").read_text().strip() if (ck / "latest").is_file() else None
    print(f"metrics: {out / 'metrics.jsonl'}\nplot: {png or 'not written'}\n"
          f"checkpoints: {ck}" + (f" (latest: {latest})" if latest else ""))
    return png
