"""The output folder of a run: what it holds, whether a new run may use it, and whether a
checkpoint may be resumed with a given config. Torch-free; nothing here is written unless the
caller asks (``clear_run`` for ``--overwrite``, ``clean_stale`` at start)."""

from __future__ import annotations

import hashlib
import json
import shutil
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
           "trainer.tensorboard", "trainer.wandb_project", "trainer.resume_total_steps")
"""Fields that change nothing a resumed run computes (not even worth a warning)."""


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
            warnings.append(f"{name} changed on resume: {old.get(name)!r} -> {cur.get(name)!r}")
    return warnings
