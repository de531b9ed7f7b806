"""Two "hosts" on this machine: Linux network namespaces joined by a veth pair.

Each namespace holds one end of the veth, with an address from 198.18.0.0/15 (reserved for
benchmarking, RFC 2544: nothing else on a machine uses it) and its own loopback; nothing is
routed out, so traffic stays between the two. Processes started with ``Host.prefix`` see only
their host's interfaces, as on a separate machine (the file system is still shared).

Names carry this process's pid and a counter, so concurrent test runs do not collide, and
namespaces left by a run that was killed (pid gone) are removed before new ones are made.
Everything made is removed on leaving ``netns_pair`` (also after a failure) and, should the
``with`` never unwind, at interpreter exit. Needs root and iproute2's ``ip netns``;
``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Iterator

SUBNET = "198.18.0.0/30"
ADDRS = ("198.18.0.1", "198.18.0.2")
_PREFIX = "icpo-mn"
_NAME = re.compile(rf"^{_PREFIX}-(\d+)-\d+-h[01]$")
_counter = itertools.count()


@dataclass(frozen=True)
class Host:
    netns: str
    ifname: str
    addr: str

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a command on this host."""
        return ["ip", "netns", "exec", self.netns]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    # Root in a container may still lack CAP_SYS_ADMIN or veth: try both, in a throw-away
    # namespace (its veth goes with it).
    probe = f"{_PREFIX}-{os.getpid()}-{next(_counter)}-h0"
    try:
        for args in (["netns", "add", probe],
                     ["-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]):
            done = _ip(*args, check=False)
            if done.returncode != 0:
                return f"`ip {' '.join(args)}` failed: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _netns_names() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_inside(netns: str) -> None:
    """SIGKILL what still runs in ``netns`` (only ever one of ours): a namespace with a process
    in it outlives ``ip netns del``, and with it the veth and its address."""
    pids = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = _ip("netns", "pids", netns, check=False).stdout.split()
        time.sleep(0.05)


def kill_all(host: Host) -> None:
    """SIGKILL every process on ``host``, as if the machine lost power."""
    _kill_inside(host.netns)


def _delete(names: list[str], links: list[str]) -> None:
    present = set(_netns_names())
    for name in names:
        if name in present:
            _kill_inside(name)
            _ip("netns", "del", name, check=False)
    for link in links:  # a veth still in this namespace: creation failed half way
        _ip("link", "del", link, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces of this helper whose creating process is gone; returns their names."""
    stale = [n for n in _netns_names()
             if (m := _NAME.match(n)) and not _pid_alive(int(m.group(1)))]
    _delete(stale, [])
    return stale


@contextlib.contextmanager
def netns_pair() -> Iterator[tuple[Host, Host]]:
    """Two hosts, ``198.18.0.1`` and ``198.18.0.2`` on a /30, each with ``lo`` up."""
    remove_stale()
    pid, k = os.getpid(), next(_counter)
    names = [f"{_PREFIX}-{pid}-{k}-h{i}" for i in (0, 1)]
    links = [f"ic{pid}k{k}h{i}"[:15] for i in (0, 1)]  # IFNAMSIZ: 15 characters
    hosts = tuple(Host(n, ln, a) for n, ln, a in zip(names, links, ADDRS))
    def cleanup() -> None:
        _delete(names, links)

    atexit.register(cleanup)  # if the ``with`` never unwinds
    try:
        try:
            for name in names:
                _ip("netns", "add", name)
            _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
            for h in hosts:
                _ip("link", "set", h.ifname, "netns", h.netns)
                _ip("-n", h.netns, "addr", "add", f"{h.addr}/30", "dev", h.ifname)
                _ip("-n", h.netns, "link", "set", h.ifname, "up")
                _ip("-n", h.netns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"netns set-up failed: {' '.join(e.cmd)}: "
                               f"{e.stderr.strip()}") from e
        yield hosts
    finally:
        cleanup()
        atexit.unregister(cleanup)
