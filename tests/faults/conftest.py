"""Fault campaign fixtures: a real ``cachemesh serve`` in its own process, the CLI
run as a user runs it, and a slow local origin.

The server runs as a child process (not a thread of the test) so that a test
can SIGKILL it, or one of its workers, exactly as the kernel or an operator
would. ``FAULT_SLOW_READ`` (seconds per 256 KiB read) makes local sources slow,
like a busy NAS, so that a kill lands in the middle of a pull.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import httpx
import psutil
import pytest

TOY = Path(__file__).parents[1] / "serve" / "toy_models.py"

# The CLI, with local sources slowed down when FAULT_SLOW_READ is set.
CLI = textwrap.dedent("""
    import os, sys, time
    delay = float(os.environ.get("FAULT_SLOW_READ") or 0)
    if delay:
        from cachemesh.sources import local
        real_open = local.LocalSource.open
        class Slow:
            def __init__(self, f): self.f = f
            def readinto(self, b):
                time.sleep(delay)
                return self.f.readinto(memoryview(b)[:256 * 1024])
            def __enter__(self): return self
            def __exit__(self, *a): self.f.close()
        local.LocalSource.open = lambda self, file: Slow(real_open(self, file))
    from cachemesh.cli import main
    sys.argv[0] = "cachemesh"
    main()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def cli(home: Path, *args: str, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``cachemesh ARGS`` in a fresh process on store ``home``."""
    full = {**os.environ, "CACHEMESH_HOME": str(home), **(env or {})}
    return subprocess.run([sys.executable, "-c", CLI, *args], env=full, capture_output=True,
                          text=True, timeout=timeout, check=False)


def assert_verify_ok(home: Path) -> None:
    """``cachemesh cache verify`` (re-hashing every blob) exits 0 and prints ok."""
    out = cli(home, "cache", "verify")
    assert out.returncode == 0 and "ok" in out.stderr, (out.stdout, out.stderr)


def toy_model_dir(root: Path, name: str, shards: int = 0, shard_bytes: int = 0) -> Path:
    """A custom-runtime model directory (toy.py from the server tests) with weight shards."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOY, d / "toy.py")
    for i in range(shards):
        (d / f"shard-{i:02d}.bin").write_bytes(os.urandom(shard_bytes))
    return d


def toy_option(name: str, directory: Path, **params: object) -> str:
    """The ``--model`` option that serves a toy model directory."""
    extra = "".join(f",{k}={v}" for k, v in params.items())
    return f"{name}={directory},runtime=custom,class=toy:Echo{extra}"


class ServeProcess:
    """``cachemesh serve`` as a child process on a free loopback port."""

    def __init__(self, home: Path, models: list[str], *, workers: int = 1,
                 memory: str = "2GiB", slow_read: float = 0.0, log: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--port", str(self.port), "--workers", str(workers), "--memory", memory]
        for m in models:
            args += ["--model", m]
        full = {**os.environ, "CACHEMESH_HOME": str(home), "FAULT_SLOW_READ": str(slow_read),
                "CACHEMESH_FETCH_CONCURRENCY": "2", **(env or {})}
        self.log_path = log or home.parent / f"serve-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-c", CLI, *args], env=full,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self.orphans: list[psutil.Process] = []

    def wait_live(self, timeout: float = 60) -> ServeProcess:
        def live() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log()}")
            try:
                return self.client.get("/v2/health/live").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(live, timeout, "the server to answer")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> list[psutil.Process]:
        """SIGKILL the server process only; returns the workers it had."""
        workers = self.workers()
        self.orphans = workers  # the fixture kills any that outlive the test
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return workers

    def stop(self) -> None:
        """SIGTERM (a drain), then SIGKILL if it does not end."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> Self:
        return self.wait_live()

    def __exit__(self, *exc: object) -> None:
        self.stop()


INFER = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}


def infer(server: ServeProcess, model: str, timeout: float = 60) -> httpx.Response:
    return server.client.post(f"/v2/models/{model}/infer", json=INFER, timeout=timeout)


@pytest.fixture
def home(clean_env: Path) -> Path:
    return clean_env


@pytest.fixture
def servers() -> Iterator[list[ServeProcess]]:
    """Servers a test starts; any still running at the end are stopped."""
    started: list[ServeProcess] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.stop()
        for p in s.orphans:  # a broken build may leave workers behind: not our next test's
            if p.is_running():
                p.kill()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs to put a store on (needs root; skipped where mounting is refused)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk under it is full."""
    block = b"\0" * 65536
    try:
        with open(path, "wb") as f:
            while True:
                f.write(block)
                f.flush()
    except OSError:
        pass


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict]:
    """What a fault test measured (seconds, counts). With ``FAULT_FIGURES=PATH``
    they are added to that JSON file under the test's name (docs/reliability.md)."""
    found: dict = {}
    yield found
    path = os.environ.get("FAULT_FIGURES")
    if path and found:
        import json

        p = Path(path)
        data = json.loads(p.read_text()) if p.exists() else {}
        data[request.node.name] = {k: round(v, 3) if isinstance(v, float) else v
                                   for k, v in found.items()}
        p.write_text(json.dumps(data, indent=2) + "\n")
