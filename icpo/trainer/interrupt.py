"""Ctrl-C and SIGTERM during training: stop at a consistent point, save, say how to resume, exit
130 (Ctrl-C, SIGINT) or 143 (SIGTERM: what Slurm, Kubernetes and torchrun send before a kill).

A step changes the model only in its update phase. In one process, a signal before that
(generation, rewards, scoring) abandons the step at once: the weights, optimizer and schedule
are still those of the last finished step, and the trainer rewinds the prompt sampler to where
that step left it, so a checkpoint written then resumes exactly. During the update the first
signal is remembered and the step runs to its end (update, logging); a second Ctrl-C abandons
it at once without saving, since the weights are then half-way between two steps. A repeated
SIGTERM is ignored: a scheduler that signals every process of a job and a launcher that
forwards the signal deliver it twice, and whoever insists follows up with SIGKILL anyway. While
the checkpoint is written, SIGTERM is ignored too.

Several processes (torchrun forwards the signal it gets to every worker; a scheduler signals
them all) would each stop somewhere else, and a rank blocked in a collective cannot even run
Python's handler. So there the first signal is only remembered, wherever it lands: every rank
finishes the running step, and at each step boundary the ranks sum their flags
(:meth:`InterruptGuard.should_stop`, one tiny all-reduce per step), so all stop after the same
step and save it together. That takes up to one step: torchrun waits ``--shutdown_timeout`` (30
s by default) before its SIGKILL, Slurm ``KillWait``, Kubernetes
``terminationGracePeriodSeconds``; raise it for long steps.

A failing reward function (:class:`icpo.errors.RewardError`) ends the run the same way: the
last finished step is saved first, then the error names the function and the sample.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable

EXIT_CODE = 130
"""Exit status after Ctrl-C: 128 + SIGINT, what shells report for an interrupted command."""

SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
"""The signals that stop training cleanly, by the name the messages give them."""


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM; the one-line message has been printed (rank 0).
    ``exit_code``: 128 + the signal's number (130, 143)."""

    def __init__(self, message: str, checkpoint: str | None, exit_code: int = EXIT_CODE):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code


class InterruptGuard:
    """Installs the SIGINT and SIGTERM handler for the ``with`` block (main thread only;
    elsewhere it does nothing and Python's defaults apply). ``in_update()`` says whether the
    model is being changed; while it is, or always with ``world > 1``, the first signal only sets
    :attr:`requested`. It is installed even when the process started with a signal ignored
    (``nohup icpo train ... &`` from a script), so ``kill -INT`` still stops such a run cleanly;
    the inherited dispositions are restored after."""

    def __init__(self, in_update: Callable[[], bool], world: int = 1, rank: int = 0):
        self.in_update = in_update
        self.world, self.rank = world, rank
        self.requested = False
        self.signum: int | None = None
        """The first signal received (or, after :meth:`should_stop`, one another rank got)."""
        self.agreed = False
        """Every rank saw the stop at the same step boundary (:meth:`should_stop`)."""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    @property
    def name(self) -> str:
        """How the messages call the signal that stopped the run."""
        return SIGNALS.get(self.signum, "Ctrl-C")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self.requested and signum == signal.SIGTERM:  # a repeat (see the module's doc)
            return
        if not self.requested and (self.world > 1 or self.in_update()):
            self.requested = True
            what = "this step's update" if self.world == 1 else "this step on every process"
            if self.rank == 0:
                print(f"\nicpo: {self.name}: finishing {what}, then stopping (Ctrl-C to stop "
                      "at once, without saving)", file=sys.stderr, flush=True)
            return
        self.requested = True  # so that a repeated SIGTERM does not interrupt the unwinding
        raise KeyboardInterrupt

    def should_stop(self) -> bool:
        """Whether training stops at this step boundary. With several processes every rank
        must call it at every boundary: it sums the ranks' flags, so they all stop here."""
        if self.world > 1:
            import torch

            from icpo.trainer.distributed import all_reduce_sum

            votes = all_reduce_sum(torch.tensor([float(self.requested),
                                                 float(self.signum == signal.SIGTERM)]))
            if votes[0].item() > 0:
                self.requested = True
                if self.signum is None:
                    self.signum = signal.SIGTERM if votes[1].item() > 0 else signal.SIGINT
        if self.requested:
            self.agreed = True
        return self.requested


class _sigterm_ignored:
    """SIGTERM does nothing in the block (main thread only): the stop it asks for is under way,
    and a second one (see the module's doc) must not kill the checkpoint being written."""

    def __enter__(self) -> None:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def resume_hint(output_dir: str) -> str:
    """The command that continues a run from the newest checkpoint in ``output_dir``."""
    return f"icpo train --config {output_dir}/config.yaml --resume"


def stop_report(trainer: Any, guard: InterruptGuard, error: Exception | None = None) -> Exception:
    """After a signal (or ``error``, a :class:`~icpo.errors.RewardError`): save when the
    trainer's state is that of a finished step every rank agrees on, and return the exception to
    raise: :class:`TrainingInterrupted` (its line printed by rank 0) or ``error``'s type with
    where the run stopped, what was saved and how to resume appended (printed by the caller)."""
    cfg = trainer.cfg.trainer
    where = f"step {trainer.step}/{cfg.total_steps}"
    saved, note = None, ""
    if trainer._updating:
        note = "stopped during an update, not saved"
    elif not cfg.save_on_interrupt:
        note = "not saved (trainer.save_on_interrupt=false)"
    elif trainer.world > 1 and not guard.agreed:
        note = "not saved (several processes stop at different points)"
    elif trainer.step == 0:
        note = "no step finished, nothing to save"
    else:
        if trainer._step_start_sampler is not None:  # abandoned step: rewind its prompts
            trainer.sampler.load_state_dict(trainer._step_start_sampler)
        latest = trainer._latest_checkpoint()
        same = latest is not None and latest.name == f"step_{trainer.step:06d}"
        with _sigterm_ignored():
            saved = str(latest if same else trainer.save())  # this very state is saved already
    latest = trainer._latest_checkpoint()
    tail = f"saved {saved}" if saved else note + (f"; last checkpoint: {latest}" if latest
                                                   else "; no checkpoint yet")
    if saved or latest:
        tail += f"; resume: {resume_hint(str(trainer.output_dir))}"
    else:  # the folder holds this run's files but no checkpoint: --resume would refuse it too
        tail += (f"; to start again: icpo train --config {trainer.output_dir}/config.yaml "
                 "--overwrite")
    checkpoint = saved or (str(latest) if latest else None)
    if error is not None:
        return type(error)(f"{error} (stopped after {where}; {tail})")
    what = "interrupted" if guard.signum in (None, signal.SIGINT) else f"stopped by {guard.name}"
    msg = f"icpo: {what} after {where}; {tail}"
    if trainer.rank == 0:
        print(msg, file=sys.stderr, flush=True)
    return TrainingInterrupted(msg, checkpoint, guard.exit_code)


def train_to_end(trainer: Any) -> tuple[list[dict[str, Any]] | None, int]:
    """Run ``trainer.train()`` and leave the process group: ``(history, 0)``, or ``(None, 130 /
    143)`` after a stop by signal (the trainer has printed where it stopped). Other errors
    propagate without leaving the group: a rank that failed must not wait for the others."""
    try:
        history = trainer.train()
    except TrainingInterrupted as e:
        if trainer.world == 1:
            trainer.close()
        return None, e.exit_code
    trainer.close()
    return history, 0


__all__ = ["EXIT_CODE", "InterruptGuard", "SIGNALS", "TrainingInterrupted", "resume_hint",
           "stop_report", "train_to_end"]
