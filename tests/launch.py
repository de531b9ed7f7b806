"""What the tests that start ``torchrun`` subprocesses share: a free port and a child
environment without this process's rendezvous variables (in-process trainers set them)."""

import os
import socket

RENDEZVOUS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's env minus the rendezvous variables, with one OpenMP thread per child."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env["OMP_NUM_THREADS"] = "1"
    return env
