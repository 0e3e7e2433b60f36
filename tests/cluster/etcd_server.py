"""A real etcd for the tests: Debian's ``etcd`` binary on free loopback ports, with its
data in a temporary directory, stopped (by its pid) by whoever started it.

Used by ``tests/cluster/conftest.py`` (one shared etcd, and one per test for the tests
that stop or replace it); the multi-node tests of cluster mode start their nodes against
the same fixtures.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TLSFiles:
    """Server side of etcd's TLS: its certificate and key, and the CA its clients' certs
    must chain to (``--client-cert-auth``)."""

    cert: Path
    key: Path
    client_ca: Path


class EtcdServer:
    """One etcd member on 127.0.0.1. :meth:`stop` then :meth:`start` keeps its data;
    :meth:`replace` starts an empty etcd on the same address (its data lost)."""

    def __init__(self, root: Path, *, tls: TLSFiles | None = None) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed")
        self.binary = binary
        self.root = root
        self.tls = tls
        self.client_port = free_port()
        self.peer_port = free_port()
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        """The form of CACHEMESH_CLUSTER."""
        return f"etcd://{self.endpoint}"

    @property
    def data_dir(self) -> Path:
        return self.root / f"data-{self.generation}"

    @property
    def log_path(self) -> Path:
        return self.root / "etcd.log"

    def start(self, timeout: float = 15.0) -> None:
        scheme = "https" if self.tls else "http"
        client = f"{scheme}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            self.binary, "--name", "test",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--initial-cluster-state", "new",
            # One member: elect itself quickly after a restart.
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]
        if self.tls:
            args += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                     "--trusted-ca-file", str(self.tls.client_ca), "--client-cert-auth"]
        self.root.mkdir(parents=True, exist_ok=True)
        # ETCD_* variables of the environment would change etcd's flags: none pass.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env=env)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        # /health is served on the client port; with TLS, a put through etcdctl-like
        # calls needs certificates, so the listening socket is enough there.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become ready in {timeout} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.tls:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.client_port)) == 0
        try:
            r = httpx.get(f"http://{self.endpoint}/health", timeout=1.0, trust_env=False)
        except httpx.TransportError:
            return False
        return r.status_code == 200 and r.json().get("health") == "true"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; only the process this object started."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def replace(self) -> None:
        """Stop this etcd and start an empty one on the same address."""
        self.stop()
        self.generation += 1
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"
