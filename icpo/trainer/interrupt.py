"""Ctrl-C during training: stop at a consistent point, save, say how to resume, exit 130.

A step changes the model only in its update phase. Before that (generation, rewards,
scoring) a Ctrl-C abandons the step at once: the weights, optimizer and schedule are still
those of the last finished step, and the trainer rewinds the prompt sampler to where that step
left it, so a checkpoint written then resumes exactly. During the update the first Ctrl-C is
remembered and the step runs to its end (update, logging); a second one abandons it at once
without saving, since the weights are then half-way between two steps.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

EXIT_CODE = 130
"""Exit status after Ctrl-C: 128 + SIGINT, what shells report for an interrupted command."""


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C; the one-line message has been printed (rank 0)."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(message)
        self.checkpoint = checkpoint


class InterruptGuard:
    """Installs a SIGINT handler for the ``with`` block (main thread only; elsewhere it does
    nothing and Python's default applies). ``in_update()`` says whether the model is being
    changed; while it is, the first Ctrl-C only sets :attr:`requested`. It is installed even
    when the process started with SIGINT ignored (``nohup icpo train ... &`` from a script), so
    ``kill -INT`` still stops such a run cleanly; the inherited disposition is restored after."""

    def __init__(self, in_update: Callable[[], bool]):
        self.in_update = in_update
        self.requested = False
        self._previous = None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.in_update() and not self.requested:
            self.requested = True
            print("\nicpo: Ctrl-C: finishing this step's update, then stopping "
                  "(Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt


def resume_hint(output_dir: str) -> str:
    """The command that continues a run from the newest checkpoint in ``output_dir``."""
    return f"icpo train --config {output_dir}/config.yaml --resume"
