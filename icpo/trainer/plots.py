"""A PNG of a run's curves from its ``metrics.jsonl``: reward, held-out accuracy, entropy, omega."""

from __future__ import annotations

from pathlib import Path

from icpo._io import atomic_path
from icpo.trainer.metrics import read_metrics  # noqa: F401 (also imported from here)

PANELS = (("reward/mean", "reward"), ("val/accuracy", "held-out accuracy"),
          ("entropy", "entropy"), ("omega", "omega"))


def plot_metrics(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Write a 2x2 figure of :data:`PANELS` over steps to ``out_png`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, PANELS):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
