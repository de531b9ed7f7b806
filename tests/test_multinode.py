"""Two nodes rehearsed on one machine: each "host" is a network namespace (tests/netns.py) with
its own address, and runs one training process of the tiny preset under ZeRO-2 (DeepSpeed on
gloo, CPU). The run is killed on both hosts after its step-2 checkpoint and during step 3,
resumed with ``--resume`` on both, and must end with the weights, bit for bit, and the metrics
of an uninterrupted ``torchrun --nproc_per_node 2`` run on loopback.

Launched with ``torchrun --nnodes 2 --node_rank R`` and with DeepSpeed's launcher
(``deepspeed --hostfile H --no_ssh --node_rank R``, no ssh). The hosts share this machine's
file system, as nodes sharing ``trainer.output_dir`` do; docs/distributed.md says what that
covers and what it does not (NCCL, GPUs, separate disks).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
import torch
from launch import clean_env, free_port

from icpo.trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_icpo.py"
STEPS, SAVE_EVERY = 4, 2
TIMEOUT_S = 300
# Wall-clock and throughput figures differ between any two runs; everything else must not.
NONDETERMINISTIC = ("time/", "perf/")

_NO_NETNS = netns.unavailable()
# Module-wide, so that the reference run (a module fixture, set up first) is skipped too.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_NO_NETNS is not None,
                                 reason=f"two-host test needs network namespaces: {_NO_NETNS}")]

# The bundled reward, plus a gate: with ICPO_TEST_STOP_AT set, a step that begins once that
# checkpoint is `latest` marks the rank as stopped and waits to be killed. The kill then always
# falls after the checkpoint and before the run ends, however slow the machine.
GATE = '''
import os
import time
from pathlib import Path

from icpo.rewards.verifiable import compute_score


def gated(data_source, solution_str, ground_truth, extra_info=None):
    stop_at = os.environ.get("ICPO_TEST_STOP_AT")
    if stop_at:
        out = Path(os.environ["ICPO_TEST_OUT"])
        latest = out / "checkpoints" / "latest"
        if latest.is_file() and latest.read_text().strip() == stop_at:
            (out / f"stopped_rank{os.environ['RANK']}").touch()
            time.sleep(3600)
    return compute_score(data_source, solution_str, ground_truth, extra_info)
'''


def overrides(out: Path, gate: Path) -> list[str]:
    """The tiny preset made small: 4 prompts x G=4 per step, 16-token responses, two optimizer
    steps per step (one prompt per rank each), a checkpoint every second step."""
    return ["--train-size", "16", "--val-size", "4",
            f"trainer.output_dir={out}", f"trainer.total_steps={STEPS}",
            f"trainer.save_every={SAVE_EVERY}", "trainer.eval_every=0", "trainer.zero_stage=2",
            "trainer.train_batch_size=4", "actor.ppo_mini_batch_size=2", "rollout.n=4",
            "rollout.max_response_length=16", "trainer.progress_bar=false",
            "trainer.num_threads=1", f"reward.function={gate}:gated"]


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gate") / "gate_reward.py"
    path.write_text(GATE)
    return path


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def run_to_end(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])}... exited {proc.returncode}:\n{_tail(log)}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, gate) -> Path:
    """The reference: one host, two processes, loopback, never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(SCRIPT), *overrides(out, gate)]
    run_to_end(cmd, clean_env(), out.parent / "log.txt")
    return out


@pytest.fixture
def hosts():
    with netns.netns_pair() as pair:
        yield pair


def launcher_cmd(launcher: str, node_rank: int, port: int, hostfile: Path) -> list[str]:
    master = ["--master_addr", netns.ADDRS[0], "--master_port", str(port)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--node_rank", str(node_rank), "--nproc_per_node", "1", *master]
    # --no_ssh: this node's processes only, no pdsh; the hostfile gives the world's shape.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
            "--no_ssh", "--node_rank", str(node_rank), *master]


def start_hosts(hosts, launcher: str, port: int, args: list[list[str]],
                env_extra: dict[str, str], logs: Path, tag: str
                ) -> list[tuple[subprocess.Popen, Path]]:
    """Host i runs ``args[i]``."""
    hostfile = logs / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=1\n" for i in range(len(hosts))))
    started = []
    for i, host in enumerate(hosts):
        # gloo binds to the address of this machine's hostname unless told the interface, and
        # that address is not in the namespace: name the veth (docs/distributed.md).
        env = {**clean_env(), "GLOO_SOCKET_IFNAME": host.ifname, **env_extra}
        cmd = [*host.prefix, *launcher_cmd(launcher, i, port, hostfile), str(SCRIPT), *args[i]]
        log = logs / f"{tag}_host{i}.txt"
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started.append((proc, log))
    return started


def wait_all(started, hosts, timeout: float = TIMEOUT_S) -> list[int]:
    """The hosts' exit codes; both are killed if either is still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    for proc, log in started:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for host in hosts:
                netns.kill_all(host)
            pytest.fail(f"still running after {timeout} s:\n{_tail(log)}")
    return [proc.returncode for proc, _ in started]


def kill_when_stopped(hosts, started, out: Path, timeout: float = TIMEOUT_S) -> None:
    """Wait until every rank is held in step 3, then SIGKILL everything on both hosts."""
    marks = [out / f"stopped_rank{r}" for r in range(len(hosts))]
    deadline = time.monotonic() + timeout
    while not all(m.exists() for m in marks):
        ended = [(p.returncode, log) for p, log in started if p.poll() is not None]
        if ended:
            pytest.fail(f"{ended[0][1].name} exited {ended[0][0]} before being killed:\n"
                        f"{_tail(ended[0][1])}")
        if time.monotonic() > deadline:
            pytest.fail(f"no rank reached step {SAVE_EVERY + 1} in {timeout} s:\n"
                        f"{_tail(started[0][1])}")
        time.sleep(0.1)
    for host in hosts:
        netns.kill_all(host)  # the launcher and its workers (their own sessions) alike
    for proc, _ in started:
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL


def safetensors_of(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model = run / "checkpoints" / f"step_{STEPS:06d}" / "model"
    files = sorted(model.glob("*.safetensors"))
    assert files, f"no safetensors in {model}"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def safetensors_of_start() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from icpo.models import resolve_model_path

    return load_file(Path(resolve_model_path("icpo/tiny")) / "model.safetensors")


def deterministic(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC) and k != "time"}
            for r in records]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_hosts_killed_and_resumed_equal_uninterrupted(hosts, launcher, gate, uninterrupted,
                                                          tmp_path):
    out = tmp_path / "run"
    args = overrides(out, gate)
    stop = {"ICPO_TEST_STOP_AT": f"step_{SAVE_EVERY:06d}", "ICPO_TEST_OUT": str(out)}
    # A fresh namespace has every port free: a fixed one cannot collide with other tests.
    started = start_hosts(hosts, launcher, 29500, [args, args], stop, tmp_path, "first")
    kill_when_stopped(hosts, started, out)

    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step_{SAVE_EVERY:06d}"
    ckpt = root / f"step_{SAVE_EVERY:06d}"
    # Rank 0 wrote the folder; each rank's own state is in it (the hosts share the disk).
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert len(list((ckpt / "deepspeed").rglob("*optim_states.pt"))) == 2  # a ZeRO-2 partition each
    assert not (root / f"step_{STEPS:06d}").exists()

    if launcher == "torchrun":
        # Host 1 without the shared disk: its own, empty output_dir. Both ranks must refuse,
        # not train from different steps.
        alone = overrides(tmp_path / "host1_disk" / "run", gate)
        started = start_hosts(hosts, launcher, 29502, [["--resume", *args], ["--resume", *alone]],
                              {}, tmp_path, "unshared")
        assert wait_all(started, hosts) == [1, 1]
        for _, log in started:
            assert ("the ranks found different checkpoints (rank 0: step_000002, rank 1: none)"
                    in log.read_text(errors="replace")), _tail(log)

    started = start_hosts(hosts, launcher, 29501, [["--resume", *args]] * 2, {}, tmp_path,
                          "resumed")
    for code, (_, log) in zip(wait_all(started, hosts), started):
        assert code == 0, f"{log.name}: exit {code}:\n{_tail(log)}"
        assert "Traceback" not in log.read_text(errors="replace"), _tail(log)

    assert (root / "latest").read_text().strip() == f"step_{STEPS:06d}"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    a, b = safetensors_of(uninterrupted), safetensors_of(out)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"weights differ from the uninterrupted run's: {differing[:5]}"
    start = safetensors_of_start()
    assert any(not torch.equal(start[k], a[k]) for k in a if k in start), "training moved nothing"
    ref, got = read_metrics(uninterrupted / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert deterministic(got) == deterministic(ref)

