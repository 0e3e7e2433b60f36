"""Network namespaces on a bridge, with links capped by ``tc``: a small data centre in a test.

::

    namespace {tag}-sw:   bridge br0 ── vb1 ── vb2 ── … (one port per host)
    namespace {tag}-{h}:  lo, eth0 = 10.213.0.{i}/24 (veth to vb{i}); no default route,
                          so nothing outside these namespaces can be reached

A host's link can be capped in each direction with a token bucket (``tc qdisc ... tbf``):
on ``eth0`` for what it sends, on ``vb{i}`` in the switch for what it receives. netem is
not in every kernel; tbf is.

:class:`Network` removes everything it made when it is closed: the processes it started
(by their process group, which each one leads), then its namespaces (their veths,
bridge and qdiscs go with them). It is a context manager; tests close it in a finalizer,
so a failed test leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0"


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "network namespaces need iproute2 (ip, tc)"
    tag = f"cmprobe{os.getpid() % 100000}"
    try:
        subprocess.run(["ip", "netns", "add", tag], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return f"cannot create a network namespace: {detail.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "del", tag], capture_output=True, timeout=10)
    return None


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One namespace on the bridge."""

    name: str
    netns: str
    ip: str
    index: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
        """Start ``argv`` inside this host's namespace, in a process group of its own."""
        out = open(log, "ab")  # noqa: SIM115 - owned by the process's lifetime
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], env=dict(env),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], env: Mapping[str, str],
            timeout: float) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host's namespace to its end."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], env=dict(env),
                              capture_output=True, text=True, timeout=timeout)

    def kill(self, proc: subprocess.Popen) -> None:
        """Kill a process this host started, and its group, at once (SIGKILL)."""
        stop_group(proc, signal.SIGKILL)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 5.0) -> None:
    """Signal the process group ``proc`` leads; SIGKILL it if it outlives ``wait_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


class Network:
    """A bridge and the hosts on it (see the module docstring)."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"cm{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        _run("ip", "netns", "add", self.switch)
        self._made.append(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")

    def add(self, name: str, *, up_mbit: float | None = None,
            down_mbit: float | None = None) -> Host:
        """A new host on the bridge; ``up_mbit``/``down_mbit`` cap what it sends/receives."""
        index = len(self.hosts) + 1
        netns = f"{self.tag}-{name}"
        _run("ip", "netns", "add", netns)
        self._made.append(netns)
        port = f"vb{index}"
        _run("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name",
             "eth0", "netns", netns)
        _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip = f"{SUBNET}.{index}"
        _run("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        if up_mbit is not None:
            cap(netns, "eth0", up_mbit)
        if down_mbit is not None:
            cap(self.switch, port, down_mbit)
        host = self.hosts[name] = Host(name, netns, ip, index)
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.procs:
                stop_group(proc, signal.SIGKILL)
        for netns in reversed(self._made):
            # A namespace goes with its last process; its veths, bridge and qdiscs with it.
            for _ in range(20):
                done = subprocess.run(["ip", "netns", "del", netns], capture_output=True,
                                      timeout=30)
                if done.returncode == 0:
                    break
                time.sleep(0.1)
        self._made.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cap(netns: str, dev: str, mbit: float) -> None:
    """Cap what ``dev`` sends to ``mbit`` megabits/s with a token bucket filter."""
    rate = int(mbit * 1_000_000)
    burst = max(rate // 8 // 100, 64 * 1024)  # 10 ms of traffic, at least 64 KiB
    _run("tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate}bit",
         "burst", str(burst), "latency", "100ms")


def leftovers(tag: str) -> list[str]:
    """Namespaces of ``tag`` that still exist (a test asserts there are none)."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in done.stdout.splitlines()
            if line.split() and line.split()[0].startswith(f"{tag}-")]
