"""Real ``cachemesh serve --cluster`` processes on loopback, for the multi-node tests.

:class:`ServeNode` is one node: its own store (``home``), its own HTTP and gRPC ports, its
log in a file beside the store, reached with httpx. :class:`Cluster` starts several
against one etcd and one key prefix. The ``three_nodes`` fixture (conftest.py) shares one
:class:`Cluster` of three nodes (``a``, ``b``, ``c``) with a whole module; see there.

Models for the tests are toys (``tests/blackbox/toy_runtime.py``): a folder with the toy
runtime and a small weights file, made by :func:`toy_spec` under the cluster's ``origin``
folder, which every node may deploy from (``CACHEMESH_SERVE_SOURCE_ROOTS``).
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.cluster.etcd_server import free_port

TOKEN = "test-cluster-token-0123456789abcdef"
TOY = Path(__file__).parents[1] / "blackbox" / "toy_runtime.py"
PREFIXES = ("CACHEMESH_", "HF_", "HUGGINGFACE_", "AWS_", "MODELSCOPE_", "TRANSFORMERS_")


def cli() -> list[str]:
    script = Path(sys.executable).with_name("cachemesh")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cachemesh"]


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def toy_spec(origin: Path, name: str, **params: Any) -> dict[str, Any]:
    """The body of ``POST /api/v1/models`` for a toy model named ``name``."""
    folder = origin / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOY, folder / "toy.py")
    (folder / "weights.bin").write_bytes(os.urandom(1024))
    return {"name": name, "source": str(folder), "runtime": "custom",
            "parameters": {"class": "toy:Toy", **{k: str(v) for k, v in params.items()}}}


def node_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    env["CACHEMESH_HOME"] = str(home)
    env["HF_HOME"] = str(home.parent / "hf-home")
    env.update(extra)
    return env


class ServeNode:
    """``cachemesh serve --cluster ...`` in a process of its own."""

    def __init__(self, home: Path, name: str, cluster_url: str, env: dict[str, str],
                 *args: str, wait: bool = True, https_ca: Path | None = None) -> None:
        """``https_ca``: the node serves HTTPS (``args`` carry --tls-cert/--tls-key) with a
        certificate this CA signed; its advertise URL is https."""
        self.home = home
        self.name = name
        self.port, self.grpc_port = free_port(), free_port()
        scheme = "https" if https_ca is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log_path = home.parent / f"serve-{name}-{self.port}.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*cli(), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--grpc-port", str(self.grpc_port), "--workers", "1",
                 "--cluster", cluster_url, "--node-name", name, "--advertise", self.url,
                 *args],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=30, trust_env=False,
                                 verify=ssl.create_default_context(cafile=str(https_ca))
                                 if https_ca is not None else True)
        if wait:
            wait_until(self.live, 60, f"node {name} to listen")

    def live(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"node {self.name} exited {self.proc.returncode}:\n"
                                 f"{self.log()[-4000:]}")
        try:
            return self.http.get("/v2/health/live").status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def nodes(self) -> dict[str, Any]:
        r = self.http.get("/api/v1/nodes")
        assert r.status_code == 200, r.text
        return r.json()

    def node_names(self) -> list[str]:
        return [n["name"] for n in self.nodes()["nodes"]]

    def model(self, name: str) -> httpx.Response:
        return self.http.get(f"/api/v1/models/{name}")

    def infer(self, name: str, value: float = 1.0) -> httpx.Response:
        return self.http.post(f"/v2/models/{name}/infer", json={"inputs": [
            {"name": "x", "shape": [1], "datatype": "FP32", "data": [value]}]})

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it did not exit; only this node's process."""
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Cluster:
    """Nodes of one cluster: one etcd, one prefix, one token, 2 s leases."""

    def __init__(self, root: Path, etcd_url: str, prefix: str, **extra_env: str) -> None:
        self.root = root
        self.etcd_url = etcd_url
        self.origin = root / "origin"
        self.origin.mkdir(parents=True, exist_ok=True)
        self.extra_env = {"CACHEMESH_CLUSTER_TOKEN": TOKEN, "CACHEMESH_CLUSTER_PREFIX": prefix,
                          "CACHEMESH_CLUSTER_LEASE_TTL": "2",
                          "CACHEMESH_SERVE_SOURCE_ROOTS": str(self.origin),
                          "CACHEMESH_SERVE_MEMORY": "1GiB", **extra_env}
        self.nodes: dict[str, ServeNode] = {}

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return node_env(self.root / name / "home", **{**self.extra_env, **extra})

    def start(self, name: str, *args: str, wait: bool = True, https_ca: Path | None = None,
              **extra: str) -> ServeNode:
        node = ServeNode(self.root / name / "home", name, self.etcd_url, self.env(name, **extra),
                         *args, wait=wait, https_ca=https_ca)
        self.nodes[name] = node
        return node

    def start_all(self, names: list[str], headers: dict[str, str] | None = None,
                  **extra_of: dict[str, str]) -> None:
        """Start the nodes at once (``extra_of[name]``: more environment for one; each
        node's client sends ``headers``), then wait until each listens and every one
        lists them all."""
        for name in names:
            self.start(name, wait=False, **extra_of.get(name, {})).http.headers.update(
                headers or {})
        for name in names:
            wait_until(self.nodes[name].live, 60, f"node {name} to listen")
        self.wait_members(names)

    def __getitem__(self, name: str) -> ServeNode:
        return self.nodes[name]

    def wait_members(self, names: list[str], timeout: float = 20) -> None:
        """Until every node lists exactly ``names``."""
        want = sorted(names)
        for name in names:
            wait_until(lambda n=name: sorted(self.nodes[n].node_names()) == want, timeout,
                       f"node {name} to list {want}")

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
