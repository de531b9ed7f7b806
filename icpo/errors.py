"""Errors a user can fix, and the one way every entry point reports them.

``icpo train`` / ``eval`` / ``data`` / ``filter-coarse`` / ``export``, ``examples/*.py`` and the
``python -m`` tools run their work through :func:`run_main`: a user error is printed as one line
(``<prog>: error: <cause>``) and the process exits with status 2, in one process and under a
launcher; Ctrl-C outside the training loop prints one line and exits 130; anything else is a bug
and keeps its traceback. Torch-free, so an entry point can use it before torch is imported.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

USER_ERROR_EXIT = 2
"""Exit status for a user error (what argparse uses for a bad command line)."""


class UserError(ValueError):
    """Bad input or a state of the run folder that the user must change; the message names the
    cause (the config field, file, folder or command-line flag) and, where there is one, the fix."""


class TrainingStopped(UserError):
    """The run was stopped by a guard (non-finite updates, a destroyed policy): continuing
    would only write garbage. The last checkpoint written before it is intact."""


class RewardError(UserError):
    """The reward function raised, returned something that is not a reward, or did not return
    within ``reward.timeout_s``; the message names the function and the sample. The trainer
    saves the last finished step before it ends the run (icpo/trainer/interrupt.py)."""


# Other modules' error types that mean "the user's input", found in sys.modules rather than
# imported: an exception of a module that was never imported cannot have been raised, and
# importing icpo.data here would pull in torch (and invert the layers).
_USER_ERROR_TYPES = (("icpo.config.schema", "ConfigError"), ("icpo.data.dataset", "DataError"),
                     ("icpo.data.coarse", "CoarseFilterError"))


def is_user_error(e: BaseException) -> bool:
    """Bad input the user can fix (reported in one line, no traceback)."""
    if isinstance(e, (UserError, FileNotFoundError)):
        return True
    for module, name in _USER_ERROR_TYPES:
        tp = getattr(sys.modules.get(module), name, None)
        if tp is not None and isinstance(e, tp):
            return True
    return False


def _end_launched_process(code: int) -> None:
    """A rank started by torchrun / deepspeed ends at once, as a successful one does (see
    icpo.trainer.distributed.exit_launched_process); a lone process returns here. Looked up,
    not imported: only a process that set up training has a launcher to answer to."""
    dist = sys.modules.get("icpo.trainer.distributed")
    if dist is not None:
        dist.exit_launched_process(code)


def run_main(prog: str, fn: Callable[[], int | None]) -> int:
    """Run an entry point's work ``fn`` and return its exit status: ``fn``'s own (None = 0),
    2 after a user error (one line on stderr), 130 after a Ctrl-C that the training loop did not
    handle itself (loading, evaluation). Other exceptions propagate with their traceback."""
    try:
        return fn() or 0
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted\n")
        sys.stderr.flush()
        return 130
    except Exception as e:  # noqa: BLE001 (re-raised unless it is the user's input)
        if not is_user_error(e):
            raise
        # One write: the ranks of a launched run share stderr, and lines must not interleave.
        sys.stderr.write(f"{prog}: error: {e}\n")
        sys.stderr.flush()
        _end_launched_process(USER_ERROR_EXIT)
        return USER_ERROR_EXIT


# --------------------------------------------------------------------------- argument checks

def check_range(flag: str, value: Any, *, at_least: float | None = None,
                below: float | None = None, integer: bool = False) -> None:
    """``value`` of command-line ``flag`` is a (finite) number in ``[at_least, below)``."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        raise UserError(f"{flag}: got {value!r}; expected {kind}")
    if at_least is not None and value < at_least or below is not None and value >= below:
        num = (lambda v: str(int(v))) if integer else (lambda v: f"{v:g}")
        bounds = [f">= {num(at_least)}" if at_least is not None else "",
                  f"< {num(below)}" if below is not None else ""]
        raise UserError(f"{flag}: got {value!r}; expected {kind} "
                        + " and ".join(b for b in bounds if b))


def check_new_files(folder: str | os.PathLike, names: Iterable[str], *, overwrite: bool,
                    flag: str = "--out") -> list[Path]:
    """The paths ``folder/name`` a command is about to write: ``folder`` must be a folder (or
    not exist yet, nor anything above it be a file), and none of the files may exist unless
    ``overwrite``; refused with one line naming ``flag`` otherwise. Nothing is written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag}: {str(folder)!r} is a file; expected a folder")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag}: {str(folder)!r} cannot be created: {str(probe)!r} is a file")
    paths = [folder / n for n in names]
    taken = [p for p in paths if p.exists()]
    if taken and not overwrite:
        raise UserError(f"{flag}: {', '.join(map(str, taken))} already "
                        f"{'exists' if len(taken) == 1 else 'exist'}; pass --overwrite to replace "
                        f"{'it' if len(taken) == 1 else 'them'}, or choose another folder")
    folders = [p for p in taken if p.is_dir()]
    if folders:
        raise UserError(f"{flag}: {folders[0]} is a folder; expected a file name")
    return paths


__all__ = ["RewardError", "TrainingStopped", "UserError", "check_new_files", "check_range",
           "is_user_error", "run_main"]
