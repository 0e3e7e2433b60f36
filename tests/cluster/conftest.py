"""Fixtures of the cluster tests: a real etcd (never a mock in its place), the key
prefix of one test, and the settings a node of the cluster reads.

- ``etcd``: one etcd for the whole session; each test works under its own prefix
  (``cluster_keys``), so tests do not see each other's keys.
- ``own_etcd``: an etcd of the test's own, for tests that stop, restart or replace it.
- ``three_nodes``: three real ``cachemesh serve --cluster`` processes on the shared etcd,
  one set per test module (see its docstring; ``nodes.py`` starts them).

Without the ``etcd`` binary (Debian's ``etcd-server``, listed in tools/system-packages.txt)
the tests skip, saying so; under ``CI=true`` they fail instead: CI must run them.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachemesh.cluster.keys import Keys
from tests.cluster.etcd_server import EtcdServer, etcd_binary
from tests.cluster.nodes import TOKEN, Cluster


def require_etcd() -> None:
    if etcd_binary() is not None:
        return
    why = ("etcd is not installed: apt-get install etcd-server"
           " (tools/system-packages.txt; `make venv` installs it as root)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI runs the cluster tests against a real etcd", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    """One real etcd shared by the session's tests (each under its own prefix)."""
    require_etcd()
    root = Path(tempfile.mkdtemp(prefix="cachemesh-etcd-"))
    server = EtcdServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd of this test's own: it may stop, restart or replace it."""
    require_etcd()
    server = EtcdServer(tmp_path / "etcd")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster_keys() -> Keys:
    """A prefix no other test uses."""
    return Keys(prefix=f"/test-{uuid.uuid4().hex[:12]}/")


@pytest.fixture
def cluster_env(etcd: EtcdServer, cluster_keys: Keys) -> dict[str, str]:
    """The environment of a node of the shared etcd's cluster (2 s leases)."""
    return {
        "CACHEMESH_CLUSTER": etcd.url,
        "CACHEMESH_CLUSTER_TOKEN": TOKEN,
        "CACHEMESH_CLUSTER_PREFIX": cluster_keys.prefix,
        "CACHEMESH_CLUSTER_LEASE_TTL": "2",
    }


NODE_PROC = Path(__file__).with_name("node_proc.py")


class NodeProcess:
    """A node in a child process (tests/cluster/node_proc.py), to be killed like a crash."""

    def __init__(self, etcd: EtcdServer, keys: Keys, home: Path, name: str, ttl: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(NODE_PROC), etcd.endpoint, keys.prefix, str(home), name,
             str(ttl)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def next_event(self, timeout: float = 20.0) -> dict[str, object]:
        """The next JSON line the node prints (fails with its stderr if it exits)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.kill()
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise AssertionError(f"node process printed nothing in {timeout} s:\n{err[-3000:]}")
        event: dict[str, object] = json.loads(line)
        return event

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a node failure would."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def node_process(etcd: EtcdServer, cluster_keys: Keys) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes in child processes; every one still running is killed at the end."""
    started: list[NodeProcess] = []

    def start(home: Path, name: str, ttl: int = 2) -> NodeProcess:
        node = NodeProcess(etcd, cluster_keys, home, name, ttl)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


@pytest.fixture(scope="module")
def three_nodes(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three real ``cachemesh serve --cluster`` nodes, ``a``, ``b`` and ``c``, shared by a
    test module: the session's etcd, a key prefix of the module's own, 2 s leases, one
    worker and a 1 GiB budget each, every node listing the three (tests/cluster/nodes.py).

    Use: ``def test_x(three_nodes): a, b = three_nodes["a"], three_nodes["b"]``; each node
    has ``url``, ``http`` (an httpx client), ``infer``, ``model``, ``nodes``; make models
    with ``toy_spec(three_nodes.origin, "name")`` (deployable from every node), each test
    under names of its own. A test may start more nodes in the same cluster with
    ``three_nodes.start("d", ...)`` (stopped with the module); it must not stop a, b or c.
    """
    require_etcd()
    root = tmp_path_factory.mktemp("three-nodes")
    cluster = Cluster(root, etcd.url, f"/test-{uuid.uuid4().hex[:12]}/")
    try:
        cluster.start_all(["a", "b", "c"])
        yield cluster
    finally:
        cluster.stop()
