"""Where a step's metrics go: ``metrics.jsonl`` (always), TensorBoard and W&B (optional),
and a progress bar on the console. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch


def tensor_stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """mean / std / min / max of a 1-D tensor under ``prefix/`` (population std)."""
    v = values.detach().double().flatten()
    if v.numel() == 0:
        return {}
    return {f"{prefix}/mean": v.mean().item(), f"{prefix}/std": v.std(correction=0).item(),
            f"{prefix}/min": v.min().item(), f"{prefix}/max": v.max().item()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


_BAR_FIELDS = (("reward/mean", "reward"), ("accuracy", "train_acc"), ("val/accuracy", "val_acc"))
"""Progress-bar figures, (metric, label): reward = mean reward of this step's responses (the
verifiable reward, plus noise when set; before ICPO's bonus), train_acc = the fraction of them
with a correct answer, val_acc = held-out accuracy at the latest evaluation."""


class MetricsLogger:
    """One JSON line per step in ``<output_dir>/metrics.jsonl``, plus optional sinks."""

    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = False, wandb_project: str | None = None,
                 progress_bar: bool = True, config: dict | None = None, log_every: int = 1):
        self.enabled = enabled
        self.log_every = log_every
        self.path = output_dir / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and self.path.exists():
            self.path.unlink()
        elif self.path.exists():
            self._truncate_after(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"))
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir))
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="icpo", unit="step",
                             dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be re-run)."""
        lines = [ln for ln in self.path.read_text().splitlines()
                 if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, Any], advance: bool = True) -> None:
        """Write ``metrics`` of ``step``; ``advance`` moves the progress bar one step."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(),
                  **{k: _jsonable(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if step % self.log_every and "val/accuracy" not in numeric:  # sinks every log_every steps
            if self._bar is not None:
                self._bar.update(1 if advance else 0)
            return
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._bar is not None:
            shown = {label: f"{numeric[k]:.3f}" for k, label in _BAR_FIELDS if k in numeric}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1 if advance else 0)

    def close(self) -> None:
        """Close every sink; calling it again does nothing."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._tb = self._wandb = None
