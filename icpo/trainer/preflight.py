"""Everything about a run that can be checked before the process group, the model or DeepSpeed
exists: data files, model folder, reward function, output folder, what ``--resume`` would
resume and whether its config may continue. The trainer calls :func:`preflight` first, on every
rank, so a bad input ends every process the same way within seconds: a one-line UserError
(``icpo train`` prints it and exits 2). ``icpo.config.validate`` has already checked each
field's type and range.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icpo.config import Config
from icpo.data import load_files
from icpo.errors import UserError
from icpo.models import resolve_model_path
from icpo.trainer import run_folder


@dataclass
class Preflight:
    """What the checks found, for the trainer to use rather than read again."""

    train_records: list[Any]
    """Records of ``data.train_files``."""
    val_records: list[Any] | None
    """Records of ``data.val_files`` (at most ``val_max_samples``), None without any."""
    data_fingerprint: str
    """Content hash of the training records (saved with checkpoints, compared on resume)."""
    checkpoint: Path | None = None
    """The checkpoint to resume from, None for a new run."""
    trainer_state: dict[str, Any] | None = None
    """That checkpoint's ``trainer_state.json``."""
    notes: list[str] = field(default_factory=list)
    """Warnings for the user (printed by rank 0)."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _looks_local(path: str) -> bool:
    """A path meant as a folder: never answered with "hf download" (an ``org/name`` whose
    ``org`` is no local folder is taken as a hub id)."""
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return True
    return path.count("/") == 1 and Path(path.split("/")[0]).is_dir()


def check_model_path(name: str, path: str, attn_implementation: str | None = None) -> str:
    """The local folder of model ``path`` (a folder with ``config.json``, the bundled
    ``icpo/tiny``, or a hub id already in the Hugging Face cache), fully checked by
    :func:`icpo.models.check.check_model_folder` (config, tokenizer, weight headers,
    vocabulary sizes); no network lookup, no weights loaded."""
    from icpo.models.check import check_model_folder

    local = Path(resolve_model_path(path))
    folder = None
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"{name}: {path!r} is a folder without config.json; expected a "
                            "Hugging Face model folder")
        folder = str(local)
    elif path.count("/") == 1 and not _looks_local(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # noqa: BLE001 (an id the hub library refuses is simply not cached)
            cached = None
        if isinstance(cached, str):
            folder = str(Path(cached).parent)
    if folder is None and _looks_local(path):
        raise UserError(f"{name}: {path!r}: no such folder")
    if folder is None:
        raise UserError(f"{name}: {path!r} is neither a model folder nor a model in the local "
                        "Hugging Face cache; download it first (hf download "
                        f"{path} --local-dir DIR) and pass {name}=DIR")
    check_model_folder(folder, name, attn_implementation)
    return folder


def check_reward_function(dotted: str, name: str = "reward.function") -> None:
    """Import the reward function ``dotted`` and check it can be called with verl's four
    arguments; errors start with ``name`` (the setting that gave it)."""
    from icpo.rewards import load_reward_fn

    try:
        fn = load_reward_fn(dotted)
    except Exception as e:  # noqa: BLE001 (the user's module may raise anything on import)
        msg = str(e) if str(e).startswith("reward function") else f"{type(e).__name__}: {e}"
        raise UserError(f"{name}: {msg}") from None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    try:
        sig.bind("data_source", "solution_str", "ground_truth", {})
    except TypeError as e:
        raise UserError(f"{name}: {dotted!r} cannot be called as fn(data_source, "
                        f"solution_str, ground_truth, extra_info) ({e})") from None


_PACKAGES = (
    ("rollout.engine=vllm", lambda c: c.rollout.engine == "vllm", "vllm"),
    ("model.attn_implementation=flash_attention_2",
     lambda c: c.model.attn_implementation == "flash_attention_2", "flash_attn"),
    ("trainer.tensorboard=true", lambda c: c.trainer.tensorboard, "tensorboard"),
    ("trainer.wandb_project", lambda c: bool(c.trainer.wandb_project), "wandb"),
)
"""Settings that need an optional package, and the package's import name."""


def check_environment(cfg: Config) -> None:
    """The device and the optional packages the config asks for are there."""
    import importlib.util

    import torch

    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device: got 'cuda' but no CUDA device is available")
    for setting, wanted, package in _PACKAGES:
        if wanted(cfg) and importlib.util.find_spec(package) is None:
            raise UserError(f"{setting} needs the {package!r} package, which is not installed")


def _load(files: list[str], data_cfg: Any, name: str) -> list[Any]:
    try:
        return load_files(files, data_cfg)
    except OSError as e:  # missing, a folder, unreadable
        detail = e.strerror or str(e)
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        raise UserError(f"{name}: cannot read{where}: {detail}") from None


def check_output_dir(out: Path) -> None:
    """``trainer.output_dir`` is a folder (or can be made one) that this user can write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"trainer.output_dir: {str(out)!r} is a file; expected a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"trainer.output_dir: {str(out)!r} cannot be created: {str(probe)!r} "
                        "is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"trainer.output_dir: {str(probe)!r} is not writable")


def _make_output_dir(out: Path) -> None:
    """Create the folder and write (then remove) one file, which also catches read-only
    mounts and the cases ``os.access`` cannot see (root, ACLs)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".icpo-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"trainer.output_dir: cannot write to {str(out)!r}: "
                        f"{e.strerror or e}") from None


def _read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: cannot read {path} ({e})") from None


def _choose_checkpoint(out: Path, resume: str | None, overwrite: bool,
                       notes: list[str]) -> Path | None:
    """The checkpoint to resume from, or None for a new run; refuses a new run into another
    run's folder and a ``--resume`` that would restart a run from scratch."""
    existing = run_folder.run_files(out) if out.is_dir() else []
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if resume == "auto":
        checkpoint = run_folder.find_resumable(out)
        if checkpoint is None and existing:
            raise UserError(f"--resume: {str(out)!r} holds a run ({', '.join(existing)}) but no "
                            "checkpoint to resume from; pass --overwrite to start it again, or "
                            "use another trainer.output_dir")
        if checkpoint is None:
            notes.append(f"--resume: nothing to resume in {str(out)!r}; starting a new run")
        return checkpoint
    if resume:
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise UserError(f"--resume {resume}: not a complete icpo checkpoint "
                            "(no trainer_state.json)")
        own = (out / "checkpoints").resolve()
        if existing and checkpoint.resolve().parent != own:
            raise UserError(f"--resume {resume}: trainer.output_dir {str(out)!r} holds another "
                            f"run ({', '.join(existing)}); resume into an empty output_dir")
        return checkpoint
    if existing and not overwrite:
        raise UserError(f"trainer.output_dir: {str(out)!r} holds another run "
                        f"({', '.join(existing)}); pass --resume to continue it, --overwrite to "
                        "replace it, or choose another output_dir")
    return None


def preflight(cfg: Config, resume: str | None = None, overwrite: bool = False) -> Preflight:
    """Check everything checkable before any set-up; raise UserError (or DataError, naming file
    and line) for the first problem. Rank 0 then creates the folder and takes its lock
    (``run_folder.claim``: a second run is refused from here to this process's end), repairs it
    (stale temporary checkpoints, ``--overwrite``); nothing else is written. A run refused after
    the lock gives it back and leaves the folder as it found it."""
    out = Path(cfg.trainer.output_dir)
    rank0 = _rank() == 0
    check_output_dir(out)
    check_environment(cfg)
    check_model_path("model.path", cfg.model.path, cfg.model.attn_implementation)
    if cfg.model.ref_path and cfg.actor.kl_coef > 0:
        check_model_path("model.ref_path", cfg.model.ref_path, cfg.model.attn_implementation)
    check_reward_function(cfg.reward.function)
    train = _load(cfg.data.train_files, cfg.data, "data.train_files")
    val = None
    if cfg.data.val_files:
        val = _load(cfg.data.val_files, cfg.data, "data.val_files")
        val = val[: cfg.data.val_max_samples or None]
    result = Preflight(train, val, run_folder.data_fingerprint(train))
    if not rank0:
        return _resume_and_folder(cfg, out, resume, overwrite, result, rank0)
    fresh = not out.exists()
    _make_output_dir(out)
    result.notes += filter(None, [run_folder.claim(out)])  # before anything else is written
    try:
        return _resume_and_folder(cfg, out, resume, overwrite, result, rank0)
    except BaseException:
        run_folder.release(out)
        if fresh and not any(out.iterdir()):
            out.rmdir()
        raise


def _resume_and_folder(cfg: Config, out: Path, resume: str | None, overwrite: bool,
                       result: Preflight, rank0: bool) -> Preflight:
    """The part of :func:`preflight` that reads and repairs the output folder (rank 0 holds
    its lock): what ``--resume`` resumes, whether its config may continue, ``--overwrite``."""
    if rank0:  # before reading `latest`: a restored folder may be the one it names
        result.notes += run_folder.clean_stale(out / "checkpoints")
    result.checkpoint = _choose_checkpoint(out, resume, overwrite, result.notes)
    if result.checkpoint is not None:
        from icpo.trainer.checkpoint import check_checkpoint_files

        check_checkpoint_files(result.checkpoint)  # a truncated DeepSpeed state, before any load
        state = _read_state(result.checkpoint)
        if "config" in state:
            result.notes += run_folder.compare_for_resume(
                state["config"], cfg.to_dict(), saved_data=state.get("data_fingerprint"),
                new_data=result.data_fingerprint,
                resume_total_steps=cfg.trainer.resume_total_steps)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if state.get("world_size", world) != world:
            result.notes.append(f"resuming with {world} processes from a checkpoint written by "
                                f"{state['world_size']}: training continues, but not bitwise as "
                                "it would have (per-rank random states differ)")
        result.trainer_state = state
        if rank0:
            print(f"icpo: resuming from {result.checkpoint} (step {state.get('step', '?')})",
                  file=sys.stderr)
    if rank0:
        if overwrite:
            run_folder.clear_run(out)
        _make_output_dir(out)
        for note in result.notes:
            print(f"icpo: warning: {note}", file=sys.stderr)
    return result
