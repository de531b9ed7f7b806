"""Reward calls in a child process, each with a deadline (``reward.timeout_s``).

Why a process: nothing inside a process can stop a Python function that never returns. A
watchdog thread cannot stop another thread; ``signal.setitimer`` raises only on the main thread
and only between bytecodes, so a regular expression backtracking in C (or any C call that holds
the GIL) outlives it. A child can always be killed.

Why fork: the child is a copy of the trainer process at its first reward call, so it already
holds the reward function, whatever module, file or test defined it: nothing is imported again,
no ``__main__`` is re-run (as ``spawn`` would), and it starts in milliseconds. The child runs
only the reward function: it must not use CUDA (a forked child cannot), nor threads or network
clients its module started at import (they do not survive a fork); such a function can run in
the training process with ``reward.timeout_s=0``, without a deadline. PyTorch's DataLoader forks
its workers the same way.

One child per :class:`ForkedCalls`, started on first use and reused; a batch goes over a pipe
in one message and the results come back one by one, so each sample's deadline starts when the
previous result arrived. On a timeout the child is killed (SIGKILL) and the next call starts a
fresh one. The child ignores SIGINT and SIGTERM (Ctrl-C and a scheduler's SIGTERM are the
training process's to handle) and, on Linux, is killed when the training process dies.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
import weakref
from multiprocessing.connection import Connection, Pipe
from typing import Any, Callable, Sequence

FORK_AVAILABLE = hasattr(os, "fork")
"""Whether calls can run in a child (not on Windows: there they run in-process, no deadline)."""


class CallFailed(Exception):
    """``fn`` raised for item ``index`` in the child; ``message`` is what it said."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index, self.message = index, message


class CallTimedOut(Exception):
    """No result for item ``index`` within the deadline; the child was killed."""

    def __init__(self, index: int):
        super().__init__(f"item {index} timed out")
        self.index = index


class ChildDied(Exception):
    """The child ended while working on item ``index`` (``how``: "exit status 1",
    "signal 9", ...): the function called ``os._exit``, crashed, or was killed from outside."""

    def __init__(self, index: int, how: str):
        super().__init__(f"the reward process died ({how})")
        self.index, self.how = index, how


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this child when the process that forked it ends (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it ended before prctl took effect
        os._exit(0)


def _serve(fn: Callable[[Any], Any], conn: Connection, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    while True:
        try:
            items = conn.recv()
        except (EOFError, OSError):  # the training process closed the pipe or ended
            return
        for item in items:
            try:
                result = ("ok", fn(item))
            except BaseException as e:  # noqa: BLE001 (the user's code: SystemExit too)
                result = ("error", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            try:
                conn.send(result)
            except Exception as e:  # noqa: BLE001 (pickling fails before anything is sent)
                result = ("error", f"returned a value that cannot be sent back ({e})")
                conn.send(result)
            if result[0] == "error":  # the caller stops at the first error: so does the batch
                break


class ForkedCalls:
    """``fn(item)`` for the items of a batch, in a forked child, each within ``timeout_s``."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn
        self._pid: int | None = None
        self._conn: Connection | None = None
        self._finalizer: weakref.finalize | None = None

    def _start(self) -> None:
        parent_end, child_end = Pipe()
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()  # or the child prints the parent's buffered output again
        with warnings.catch_warnings():  # Python >= 3.12 warns on fork with threads running
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 0
            try:
                parent_end.close()
                _serve(self.fn, child_end, parent)
            except BaseException:  # noqa: BLE001  (the forked child must reach os._exit)
                code = 1
            finally:
                os._exit(code)
        child_end.close()
        self._pid, self._conn = pid, parent_end
        self._finalizer = weakref.finalize(self, _kill, pid)

    def _alive(self) -> bool:
        if self._pid is None:
            return False
        try:
            return os.waitpid(self._pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def _how_it_ended(self) -> str:
        try:
            _, status = os.waitpid(self._pid, 0)
        except ChildProcessError:
            return "already reaped"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return f"killed by {signal.Signals(sig).name}" if sig in signal.valid_signals() \
                else f"signal {sig}"
        return f"exit status {os.WEXITSTATUS(status)}"

    def close(self) -> None:
        """Kill the child (a later call starts a new one)."""
        if self._conn is not None:
            self._conn.close()
        if self._finalizer is not None:
            self._finalizer()  # kills and reaps
        self._pid = self._conn = self._finalizer = None

    def map(self, items: Sequence[Any], timeout_s: float) -> list[Any]:
        """``[fn(item) for item in items]`` computed in the child. Raises CallTimedOut (the child
        killed), CallFailed (the child waits for the next batch) or ChildDied."""
        if not items:
            return []
        if not self._alive():  # first use, or it ended between two batches
            self.close()
            self._start()
        done = False
        try:
            self._conn.send(list(items))
            out = []
            for k in range(len(items)):
                if not self._conn.poll(timeout_s):
                    raise CallTimedOut(k)
                try:
                    status, payload = self._conn.recv()
                except (EOFError, OSError):
                    self._conn.close()
                    how = self._how_it_ended()
                    self._finalizer.detach()
                    self._pid = self._conn = self._finalizer = None
                    done = True
                    raise ChildDied(k, how) from None
                if status == "error":
                    done = True  # the child stopped this batch and waits for the next one
                    raise CallFailed(k, payload)
                out.append(payload)
            done = True
            return out
        finally:
            if not done:  # a timeout, or Ctrl-C / SIGTERM while waiting: its state is unknown
                self.close()
