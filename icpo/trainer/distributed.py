"""Process-group set-up and the few collectives the trainer needs.

One process (``python examples/train_icpo.py``), ``torchrun`` and the ``deepspeed`` launcher all
end up here: missing rendezvous variables are filled in for a lone process, the backend is NCCL
on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCHED = False
"""Whether a launcher (torchrun, deepspeed) started this process: it set RANK before we did."""
_FILLED_IN = False
"""Whether we set RANK ourselves (a lone process): a later trainer in the same process then
finds RANK set but was not launched either."""


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """Initialize the process group once; returns ``(rank, world_size, device)``."""
    global _LAUNCHED, _FILLED_IN
    _LAUNCHED = _LAUNCHED or ("RANK" in os.environ and not _FILLED_IN)
    if "RANK" not in os.environ:
        _FILLED_IN = True
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    elif not os.environ.get("DS_ACCELERATOR"):
        os.environ["DS_ACCELERATOR"] = "cpu"
    if not dist.is_initialized():
        import deepspeed

        if not use_cuda and int(os.environ["WORLD_SIZE"]) == 1:
            _skip_shm_comm_op()
        elif not use_cuda:
            _announce_shm_comm_build()
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), dev


def _skip_shm_comm_op() -> None:
    """One process on CPU: keep DeepSpeed from JIT-compiling its shared-memory all-reduce op.

    DeepSpeed 0.19's ``TorchBackend`` builds the ``deepspeed_shm_comm`` C++ op (30 s on an
    idle 2-core machine, minutes on a busy one, silently) whenever its probe table
    ``deepspeed.ops.__compatible_ops__`` marks it compatible; the op only speeds up
    collectives between processes on one host, which a single process never runs. DeepSpeed
    caches that table in its module so that edits persist; marking the op incompatible makes
    ``build_shm_op`` return None and the backend use plain gloo. Several processes still
    build it (once per TORCH_EXTENSIONS_DIR)."""
    import deepspeed.ops

    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):  # another DeepSpeed layout: build as it decides
        pass


def _announce_shm_comm_build() -> None:
    """Several processes on CPU: DeepSpeed compiles its shared-memory op on first use. Keep
    the build per environment (``<venv>/torch_extensions`` unless TORCH_EXTENSIONS_DIR is set,
    so environments do not rebuild and lock one shared cache) and say so before the wait."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    root = os.environ.get("TORCH_EXTENSIONS_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"))
    built = any(os.path.isdir(os.path.join(d, "deepspeed_shm_comm"))
                for d in [root, *(e.path for e in os.scandir(root) if e.is_dir())]
                ) if os.path.isdir(root) else False
    if not built and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"icpo: compiling DeepSpeed's shared-memory communication op once for this "
              f"environment into {root} (30 s to a few minutes)", file=sys.stderr, flush=True)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over ranks (a copy; float64 on CPU so gloo can carry it)."""
    out = values.detach().to("cpu", torch.float64).clone()
    if world_size() > 1:
        dist.all_reduce(out)
    return out


def all_gather_floats(values: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks of each rank's 1-D float tensor (lengths may differ)."""
    local = values.detach().to("cpu", torch.float64).flatten()
    if world_size() == 1:
        return local
    sizes = [None] * world_size()
    dist.all_gather_object(sizes, local.numel())
    pad = torch.zeros(max(sizes), dtype=torch.float64)
    pad[: local.numel()] = local
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then tear the process group down explicitly."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_launched_process(code: int = 0) -> None:
    """End a process started by a launcher (torchrun / deepspeed) right away,
    once its work is saved and the group is shut down. The C++ teardown of interpreter exit
    aborted a rank now and then on CPU with gloo ("terminate called without an active
    exception", exit -6) after everything was written, which the launcher reports as a failed
    run. Outside a launcher this returns and Python exits normally."""
    if not _LAUNCHED:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
