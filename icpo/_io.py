"""Atomic file writes: one way, one fsync policy, for every file icpo, its benchmarks and its
experiments write whole (configs, data files, reports, plots, the checkpoint ``latest``).

A reader never sees a half-written file, and after a crash or power loss the path holds either
the old content or the new, never an empty or torn file. The steps: write a temporary file in the
destination's folder (a rename is atomic only within one filesystem), flush and fsync it (else the
rename can reach the disk before the data), ``os.replace`` it onto the path, then fsync the folder
so the rename itself is durable. The final file gets the mode a plain ``open(path, "w")`` would
give (0o666 minus the umask; ``tempfile.mkstemp``'s 0o600 would hide data and configs from the
rest of a group). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def _fsync_folder(folder: Path) -> None:
    # Best effort: some platforms (Windows) and filesystems cannot open or fsync a directory;
    # the file's own data is already on disk by then.
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_temp(path: Path) -> Path:
    """Create an empty, unique temporary file beside ``path``; ``O_EXCL`` makes it ours alone, and
    creating it with 0o666 lets the umask decide its mode as for any new file."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a path of its own
    (``torch.save``, ``savefig``, ``pq.write_table``, ``open``); when the block ends without an
    exception the file is fsynced and moved onto ``path``, else it is removed and ``path`` is left
    as it was. Missing parent folders are created. The temporary name ends in ``.tmp``: give
    writers that infer the format from the suffix (``savefig``) the format explicitly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the writer has closed its handle; any handle flushes the file's data
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]
