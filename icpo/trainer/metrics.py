"""Where a step's metrics go: ``metrics.jsonl`` (always), TensorBoard and W&B (optional),
and a progress bar on the console. Only rank 0 writes.

``metrics.jsonl`` is only ever appended to. A resumed run appends a marker line
``{"step": k, "event": "resume", ...}`` and then re-logs the steps after checkpoint ``k``;
:func:`read_metrics` returns the history as it stands (the lines of steps a resume redid are
superseded, not deleted). A last line torn by a crash mid-write is moved to
``metrics.jsonl.torn`` when the file is next opened, so every line of the file stays JSON."""

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


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a ``metrics.jsonl`` as the run stands: a resume marker at step
    ``k`` supersedes the earlier lines of steps after ``k`` (the resumed run redid them).
    A malformed line is a ValueError naming file and line."""
    rows: list[dict] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if row.get("event") == "resume":
            rows = [r for r in rows if r.get("step", 0) <= row["step"]]
        else:
            rows.append(row)
    return rows


_BAR_FIELDS = (("reward/mean", "reward"), ("accuracy", "train_acc"), ("val/accuracy", "val_acc"))
"""Progress-bar figures, (metric, label): reward = mean reward of this step's responses (the
verifiable reward, plus noise when set; before ICPO's bonus), train_acc = the fraction of them
with a correct answer, val_acc = held-out accuracy at the latest evaluation."""


class MetricsLogger:
    """One JSON line per step in ``<output_dir>/metrics.jsonl``, plus optional sinks."""

    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = False, wandb_project: str | None = None,
                 progress_bar: bool = True, config: dict | None = None, log_every: int = 1,
                 resumed: bool = False):
        self.enabled = enabled
        self.log_every = log_every
        self.path = output_dir / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._recover_torn_line()
        if resumed:
            with self.path.open("a") as f:
                marker = {"step": start_step, "event": "resume", "time": time.time()}
                f.write(json.dumps(marker) + "\n")
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

    def _recover_torn_line(self) -> None:
        """Move an unterminated last line (a write cut short) to ``metrics.jsonl.torn``."""
        if not self.path.exists():
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            with self.path.with_name(self.path.name + ".torn").open("ab") as torn:
                torn.write(data[cut:] + b"\n")
            f.truncate(cut)

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
