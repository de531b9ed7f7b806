"""Errors a user can fix: the CLI prints each as one line (``icpo train: error: ...``) and exits
with status 2, in one process and under a launcher. Torch-free, so the CLI can catch them
without importing the trainer."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or a state of the run folder that the user must change; the message names the
    cause (the config field, file, folder or command-line flag) and, where there is one, the fix."""


class TrainingStopped(UserError):
    """The run was stopped by a guard (non-finite updates, a destroyed policy): continuing
    would only write garbage. The last checkpoint written before it is intact."""


__all__ = ["TrainingStopped", "UserError"]
