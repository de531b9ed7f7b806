"""Atomic checkpoints: everything a step needs to continue exactly.

Layout of ``<output_dir>/checkpoints/step_000010/``:
  ``model/``        the policy in Hugging Face format (``from_pretrained`` loads it) + tokenizer;
                    with LoRA, the adapters in PEFT's format (``PeftModel.from_pretrained``)
  ``deepspeed/``    DeepSpeed's engine state: optimizer, lr schedule, ZeRO partitions (with
                    LoRA, of the adapters only: the frozen base weights come from model.path)
  ``trainer_state.json``  step, data-sampler position, config
  ``rng_rank{r}.pt``      Python / NumPy / torch RNG states of each rank
Everything is written into ``.step_000010.tmp`` first and renamed once complete, so a crash
never leaves a half-written checkpoint that ``--resume`` could pick up; leftovers are cleaned at
the next start (``run_folder.clean_stale``). ``latest`` names the newest complete one, and the
trainer never writes a checkpoint from non-finite weights (``Trainer.save``). Several nodes
need ``output_dir`` on one shared file system (docs/distributed.md; ``check_ranks_agree``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icpo._io import atomic_write_text
from icpo.errors import UserError
from icpo.trainer import distributed as dist

_DS_TAG = "state"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_lora(actor) -> bool:
    from icpo.models.lora import is_peft_model

    return is_peft_model(actor.module)


def _save_hf_model(actor, tokenizer, out: Path) -> None:
    """The policy as a Hugging Face folder (with LoRA: its adapters, PEFT's format); under
    ZeRO-3 the full weights (the adapters) are gathered to rank 0."""
    module = actor.module
    if _is_lora(actor):
        from icpo.models.lora import save_adapters

        save_adapters(module, out, actor.zero_optimization_stage(), write=dist.rank() == 0)
        if dist.rank() == 0:
            tokenizer.save_pretrained(out)
        return
    state_dict = None
    if actor.zero_optimization_stage() == 3:
        state_dict = actor._zero3_consolidated_16bit_state_dict()
    if dist.rank() == 0:
        module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _without_frozen_weights(module: torch.nn.Module):
    """Inside, ``module.state_dict()`` leaves out every frozen weight. DeepSpeed's
    ``exclude_frozen_parameters`` alone misses a tied one under its second name (it goes by
    ``named_parameters()``, which names a tied weight once): the tied LM head, most of a model
    with a 152k vocabulary, would be saved with the adapters."""
    frozen = [n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]

    def drop(_module, state, prefix, _metadata):
        for name in frozen:
            state.pop(prefix + name, None)

    handle = module.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def _disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, or torch's zip writer failing (it reports a full disk as
    ``[enforce fail at inline_container.cc] ... file write failed``, never naming the disk)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return isinstance(e, RuntimeError) and ("inline_container" in text or "write failed" in text
                                            or "No space left" in text)


def save_checkpoint(root: Path, step: int, actor, tokenizer, trainer_state: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; returns its final path. A full
    disk is a one-line UserError naming it; the half-written ``.step_k.tmp`` is removed (the
    previous checkpoint and ``latest`` are untouched)."""
    tmp = root / f".step_{step:06d}.tmp"
    try:
        return _save_checkpoint(root, step, actor, tokenizer, trainer_state)
    except (OSError, RuntimeError) as e:
        if not _disk_full(e):
            raise
        if dist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        where = getattr(e, "filename", None) or tmp
        try:
            free = f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
        except OSError:
            free = ""
        raise UserError(f"no space left on device writing {where} (checkpoint step {step}{free}); "
                        "free space or point trainer.output_dir at a larger disk, then resume "
                        "from the last checkpoint") from None


def _save_checkpoint(root: Path, step: int, actor, tokenizer,
                     trainer_state: dict[str, Any]) -> Path:
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _save_hf_model(actor, tokenizer, tmp / "model")
    lora = _is_lora(actor)
    with _without_frozen_weights(actor.module) if lora else contextlib.nullcontext():
        actor.save_checkpoint(str(tmp / "deepspeed"), tag=_DS_TAG, save_latest=False,
                              exclude_frozen_parameters=lora)
    torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.rank() == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        old = root / f".{name}.old"
        if final.exists():  # a step saved again (resumed from an older checkpoint)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)  # put back at start if a crash comes before the next line
        os.replace(tmp, final)
        atomic_write_text(root / "latest", name)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


_HYPERPARAMETERS = ("betas", "weight_decay", "eps")
"""Optimizer settings of the resuming config that win over the checkpoint's (with the lr)."""


def _schedule_groups(actor) -> tuple[Any, list[dict[str, Any]]]:
    sched = getattr(actor, "lr_scheduler", None)
    opt = sched.optimizer if sched is not None else actor.optimizer
    return sched, opt.param_groups


def _apply_resumed_hyperparameters(actor, base_lrs: list[float] | None,
                                   hyper: list[dict[str, Any]]) -> None:
    """Loading the optimizer and schedule brings back the checkpoint's lr, betas and weight
    decay; the run continues with the resuming config's (the values the optimizer was built
    with), as TRL and verl runs do when a resume changes them: the new base lr goes through
    the schedule at the resumed step. Unchanged values are left exactly as loaded."""
    sched, groups = _schedule_groups(actor)
    for group, values in zip(groups, hyper):
        group.update(values)
    if sched is None or base_lrs is None or list(sched.base_lrs) == base_lrs:
        return
    sched.base_lrs = list(base_lrs)
    lambdas = getattr(sched, "lr_lambdas", None)
    for i, (group, base) in enumerate(zip(groups, base_lrs)):
        group["initial_lr"] = base
        factor = lambdas[i](sched.last_epoch) if lambdas else 1.0
        group["lr"] = base * factor
    sched._last_lr = [g["lr"] for g in groups]


def load_checkpoint(path: Path, actor) -> dict[str, Any]:
    """Restore engine, optimizer, schedule and this rank's RNG from ``path``; returns the
    trainer state saved with it. The lr, betas and weight decay are the resuming config's
    (:func:`_apply_resumed_hyperparameters`)."""
    sched, groups = _schedule_groups(actor)
    base_lrs = list(sched.base_lrs) if sched is not None else None
    hyper = [{k: g[k] for k in _HYPERPARAMETERS if k in g} for g in groups]
    # LoRA: the saved module state holds the adapters only; the base weights stay as loaded.
    check_checkpoint_files(path)
    try:
        load_path, _ = actor.load_checkpoint(str(path / "deepspeed"), tag=_DS_TAG,
                                             load_module_strict=not _is_lora(actor),
                                             load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    except Exception as e:  # noqa: BLE001 (torch.load / DeepSpeed raise many types for a bad file)
        first = (str(e).strip().splitlines() or [""])[0]
        raise _unreadable(path, f"{type(e).__name__}: {first}") from None
    if load_path is None:
        raise _unreadable(path, "DeepSpeed found no state in it")
    _apply_resumed_hyperparameters(actor, base_lrs, hyper)
    rng_file = path / f"rng_rank{dist.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def _unreadable(path: Path, problem: str) -> UserError:
    """A checkpoint that cannot be resumed, naming the previous complete one if there is any."""
    def step_of(p: Path) -> int:
        return int(p.name[5:]) if p.name[5:].isdigit() else -1

    older = sorted((p for p in path.parent.glob("step_*") if 0 <= step_of(p) < step_of(path)
                    and (p / "trainer_state.json").is_file()), key=step_of)
    hint = (f"; resume from the previous one with --resume {older[-1]}" if older
            else "; no earlier checkpoint to resume from")
    return UserError(f"--resume: checkpoint {path} is truncated or incomplete ({problem}){hint}")


def check_checkpoint_files(path: Path) -> None:
    """The DeepSpeed state of checkpoint ``path`` is there and every file of it whole (a torch
    zip file keeps its directory at the end: a truncated one has none). Reads directories only;
    run before the model loads (preflight) and again by :func:`load_checkpoint`."""
    state = path / "deepspeed" / _DS_TAG
    files = sorted(state.glob("*.pt")) if state.is_dir() else []
    if not any(f.name.endswith("model_states.pt") for f in files):
        raise _unreadable(path, f"no DeepSpeed model state in {state}")
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (OSError, zipfile.BadZipFile) as e:
            raise _unreadable(path, f"{f.relative_to(path)}: {e}") from None


def check_ranks_agree(checkpoint: Path | None, trainer_state: dict[str, Any] | None) -> None:
    """Every rank must resume the same checkpoint, or none. Each rank reads ``latest`` itself
    (preflight runs before the process group exists); nodes that do not share
    ``trainer.output_dir``'s file system see different ones, and would train from different
    steps. Collective: every rank raises alike."""
    if dist.world_size() == 1:
        return
    mine = None
    if checkpoint is not None:
        digest = hashlib.sha256(json.dumps(trainer_state, sort_keys=True).encode()).hexdigest()
        mine = (checkpoint.name, digest)
    seen: list[Any] = [None] * dist.world_size()
    torch.distributed.all_gather_object(seen, mine)
    if any(s != seen[0] for s in seen):
        found = ", ".join(f"rank {r}: {s[0] if s else 'none'}" for r, s in enumerate(seen))
        if len({s[0] if s else None for s in seen}) == 1:
            found += ", each with another trainer_state.json"
        raise UserError(f"--resume: the ranks found different checkpoints ({found}); every node "
                        "must see trainer.output_dir on one shared file system "
                        "(docs/distributed.md)")
