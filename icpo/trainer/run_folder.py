"""The output folder of a run: who holds it, what it holds, whether a new run may use it, and
whether a checkpoint may be resumed with a given config. Torch-free; nothing here is written
unless the caller asks (``claim`` at start, ``clear_run`` for ``--overwrite``, ``clean_stale``)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from icpo.errors import UserError

RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", "tensorboard")
"""What a run writes into ``trainer.output_dir`` (``--overwrite`` removes exactly these)."""

MUST_MATCH = (
    "algorithm.name", "algorithm.omega.schedule", "algorithm.omega.omega_max",
    "algorithm.omega.omega_min", "algorithm.omega.peak_fraction", "rollout.n", "model.path",
    "model.dtype", "data.prompt_key", "data.answer_key",
    "data.max_prompt_length", "data.overlong_prompts", "data.template", "data.shuffle",
    "data.seed", "trainer.train_batch_size", "trainer.zero_stage", "actor.ppo_mini_batch_size",
    "actor.ppo_epochs", "actor.lr_schedule", "actor.lr_warmup_steps",
    "model.lora_rank", "model.lora_alpha", "model.target_modules",
)
"""Fields a resumed run must share with its checkpoint: they fix the algorithm, the data
stream, the schedules' shape and the saved optimizer state's layout. The training data is
compared by content (a moved file is fine), or by ``data.train_files`` for a checkpoint that
recorded no fingerprint."""

IGNORED = ("trainer.output_dir", "trainer.progress_bar", "trainer.log_every",
           "trainer.tensorboard", "trainer.wandb_project", "trainer.resume_total_steps",
           "reward.timeout_s")
"""Fields that change nothing a resumed run computes (not even worth a warning)."""


LOCK_FILE = ".icpo.lock"
"""The lock a run holds on its output folder for its whole life (``PID host`` inside)."""

_held: dict[str, int] = {}
"""Folders this process holds (resolved path -> the lock file's descriptor, kept open)."""
_created: set[str] = set()
"""Of those, the ones whose lock file this process created (``release`` removes it)."""


def _drop_inherited_locks() -> None:
    # A forked child (the reward worker, a DataLoader's) closes its copies, so the lock ends
    # with the run's own process and never outlives it in a child.
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()
    _created.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def claim(output_dir: Path) -> str | None:
    """Take ``output_dir``'s lock (``LOCK_FILE``, an exclusive ``flock``) for the rest of this
    process's life, or until :func:`release`; the folder must exist. Refused with a UserError
    naming the holder's PID while another live process holds it. A lock file left by a killed
    run holds no lock (the kernel drops a ``flock`` with its process) and is taken over. Taking
    a folder this process already holds is a no-op. Returns a warning when the file system
    cannot lock (the run goes on; concurrent runs into the folder are then not detected).

    Rank 0 of a run takes it, for the whole run: the other ranks never do, so the processes of
    one run cannot refuse each other, on one node or many."""
    key = str(Path(output_dir).resolve())
    if key in _held:
        return None
    path = Path(output_dir) / LOCK_FILE
    while True:
        created = not path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"trainer.output_dir: cannot create {path}: "
                            f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            holder = _holder(fd) if busy else []
            os.close(fd)
            if not busy:
                return (f"cannot lock {path} ({e.strerror or e}); a second run started into "
                        "this folder would not be refused")
            who = (f"PID {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "")
                   if holder else "a process that has not written its PID yet")
            raise UserError(f"trainer.output_dir: {str(output_dir)!r} is in use by another run "
                            f"({who}; lock {path}); wait for it to end or stop it, or choose "
                            "another output_dir") from None
        try:  # a releasing holder may have removed the file between our open and flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    line = f"{os.getpid()} {socket.gethostname()}\n".encode()
    os.pwrite(fd, line, 0)
    os.ftruncate(fd, len(line))
    _held[key] = fd
    if created:
        _created.add(key)
    return None


def release(output_dir: Path) -> None:
    """Give ``output_dir``'s lock back (a refused or finished run); its file goes too when this
    process created it, so a refused run leaves the folder as it found it. Removed while still
    locked, which :func:`claim`'s inode check makes safe."""
    key = str(Path(output_dir).resolve())
    fd = _held.pop(key, None)
    if fd is None:
        return
    if key in _created:
        _created.discard(key)
        try:
            os.unlink(Path(output_dir) / LOCK_FILE)
        except FileNotFoundError:
            pass
    os.close(fd)


def _holder(fd: int) -> list[str]:
    """``[PID, host]`` from a held lock file. Its holder writes them right after taking the
    lock: until then the file is empty or names the run before it (a dead PID), so look again
    for up to a second."""
    import time

    words: list[str] = []
    for _ in range(20):
        words = os.pread(fd, 256, 0).decode(errors="replace").split()
        if len(words) >= 2 and words[0].isdigit():
            if words[1] != socket.gethostname():
                return words[:2]
            try:
                os.kill(int(words[0]), 0)
                return words[:2]
            except ProcessLookupError:
                pass
            except PermissionError:  # alive, another user's
                return words[:2]
        time.sleep(0.05)
    return words[:2]


def run_files(output_dir: Path) -> list[str]:
    """The run files present in ``output_dir`` (an empty ``checkpoints/`` counts as absent)."""
    found = []
    for name in RUN_FILES:
        p = output_dir / name
        if p.is_dir() and not any(p.iterdir()):
            continue
        if p.exists():
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def clear_run(output_dir: Path) -> None:
    """``--overwrite``: remove the previous run's files (only those of RUN_FILES)."""
    for name in RUN_FILES:
        p = output_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def clean_stale(checkpoints: Path) -> list[str]:
    """Remove half-written ``.step_k.tmp`` folders; put back a ``.step_k.old`` whose replacement
    never landed (a kill between the two renames of a re-saved step). Returns what was done."""
    done: list[str] = []
    if not checkpoints.is_dir():
        return done
    for p in sorted(checkpoints.glob(".step_*.tmp")):
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed incomplete {p.name}")
    for p in sorted(checkpoints.glob(".step_*.old")):
        final = checkpoints / p.name[1:-len(".old")]
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.rename(final)
            done.append(f"restored {final.name}")
    return done


def find_resumable(output_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names (None when the run saved none yet). A ``latest`` naming a
    missing or incomplete folder is an error: resuming from an older one silently would
    repeat steps; the user picks one with ``--resume PATH``."""
    root = output_dir / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        complete = sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file()) \
            if root.is_dir() else []
        if complete:
            raise UserError(f"--resume: {latest} is missing but {root} holds checkpoints; "
                            f"resume one explicitly, e.g. --resume {complete[-1]}")
        return None
    name = latest.read_text().strip()
    path = root / name
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume: {latest} names {name!r}, which is missing or incomplete "
                        f"(deleted?); resume another checkpoint with --resume PATH")
    return path


def data_fingerprint(records: list[Any]) -> str:
    """sha256 of the training prompts and answers, in order: what the data sampler's stream
    and saved position refer to."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.prompt, r.ground_truth], sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


APPLIED_ON_RESUME = ("actor.lr", "actor.betas", "actor.weight_decay")
"""Optimizer settings a resume may change: icpo.trainer.checkpoint.load_checkpoint puts the
resuming config's values into the loaded optimizer and schedule."""


def compare_for_resume(saved: dict[str, Any], new: dict[str, Any], *, saved_data: str | None,
                       new_data: str, resume_total_steps: str) -> list[str]:
    """Check the config a checkpoint was written with against the resuming one. Raises
    UserError naming the first field in MUST_MATCH that differs (or the training data's
    content, or ``trainer.total_steps`` unless ``resume_total_steps="rescale"``); returns one
    warning per other changed field."""
    old, cur = _flat(saved), _flat(new)
    must = MUST_MATCH if saved_data is not None else (*MUST_MATCH, "data.train_files")
    for name in must:
        if name in old and old[name] != cur.get(name):
            raise UserError(f"--resume: {name} was {old[name]!r} in the checkpoint and is "
                            f"{cur.get(name)!r} now; it must not change on resume (start a new "
                            "run in another output_dir)")
    if saved_data is not None and saved_data != new_data:
        raise UserError("--resume: the training prompts (data.train_files' content) differ from "
                        "those the checkpoint was trained on; the data stream cannot continue")
    t_old, t_new = old.get("trainer.total_steps"), cur.get("trainer.total_steps")
    warnings = []
    if t_old is not None and t_old != t_new:
        if resume_total_steps != "rescale":
            raise UserError(
                f"--resume: trainer.total_steps was {t_old} and is {t_new} now; the omega and lr "
                "schedules depend on it. Keep it, or set trainer.resume_total_steps=rescale to "
                "recompute both schedules over the new length")
        warnings.append(f"trainer.total_steps {t_old} -> {t_new}: omega and lr schedules "
                        "rescaled to the new length")
    for name in sorted(set(old) | set(cur)):
        if name in must or name in IGNORED or name == "trainer.total_steps":
            continue
        if old.get(name) != cur.get(name):
            applied = ("; the optimizer continues with the new value" if name in
                       APPLIED_ON_RESUME else "")
            if name == "actor.lr":
                applied += " (through the lr schedule from the resumed step)"
            warnings.append(f"{name} changed on resume: {old.get(name)!r} -> "
                            f"{cur.get(name)!r}{applied}")
    return warnings
