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

        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), dev


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
