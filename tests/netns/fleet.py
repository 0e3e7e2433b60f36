"""A fleet of cachemesh nodes in network namespaces, pulling from one capped origin.

Shared by the namespace tests (``tests/netns/``) and the fleet benchmark
(``benchmarks/fleet.py``). Every node is a real ``cachemesh serve`` in its own namespace
with its own store; pulls are real ``cachemesh pull`` processes in the node's namespace;
the origin is the Hugging Face emulator (``origin.py``) behind a link capped with tbf.
With ``etcd=True`` a real etcd runs on a host of its own on the bridge (uncapped), and
the nodes find each other through the blob index (cluster mode) instead of a static
``CACHEMESH_PEERS`` list::

    fleet = Fleet(workdir, nodes=4, origin_mbit=80, node_mbit=400, repos={"org/m": path},
                  etcd=True)             # peers through the blob index in etcd (else a list)
    fleet.start()                        # etcd, origin, then every node's server, in parallel
    procs = [fleet.pull(n, "org/m") for n in fleet.nodes]
    ...; fleet.origin_served(); fleet.verify(node); fleet.metrics(node)
    fleet.close()                        # processes, then namespaces: nothing left behind
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .net import Host, Network, stop_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKEN = "netns-cluster-token-0123456789"
PORT = 8008


@dataclass(eq=False)
class Node:
    name: str
    host: Host
    home: Path
    url: str
    server: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)


class Fleet:
    """Nodes and an origin on one bridge (see the module docstring)."""

    def __init__(self, workdir: Path, *, nodes: int, origin_mbit: float,
                 node_mbit: float | None, repos: Mapping[str, Path], peers: bool = True,
                 tag: str | None = None, etcd: bool = False, lease_ttl_s: int = 3) -> None:
        self.workdir = workdir
        self.net = Network(tag)
        try:
            self.origin_host = self.net.add("origin", up_mbit=origin_mbit)
            self.etcd_host = self.net.add("etcd") if etcd else None
            self.nodes = []
            self.node_mbit = node_mbit
            for i in range(1, nodes + 1):
                self.nodes.append(self._make_node(f"n{i}"))
        except BaseException:
            self.net.close()
            raise
        self.repos = dict(repos)
        self.peers = peers
        self.stats = workdir / "origin-stats.json"
        self.endpoint = f"http://{self.origin_host.ip}:8080"
        self._origin: subprocess.Popen | None = None
        self._etcd: subprocess.Popen | None = None
        self.etcd_url = f"etcd://{self.etcd_host.ip}:2379" if self.etcd_host else None
        self.lease_ttl_s = lease_ttl_s
        for node in self.nodes:
            self._set_env(node)

    def _make_node(self, name: str) -> Node:
        host = self.net.add(name, up_mbit=self.node_mbit, down_mbit=self.node_mbit)
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        return Node(name, host, home, f"http://{host.ip}:{PORT}")

    def _set_env(self, node: Node) -> None:
        node.env = {
            "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(node.home),
            "PYTHONPATH": str(ROOT), "CACHEMESH_HOME": str(node.home / "store"),
            "CACHEMESH_NODE_NAME": node.name, "CACHEMESH_CLUSTER_TOKEN": TOKEN,
            "HF_ENDPOINT": self.endpoint, "CACHEMESH_RETRY_BACKOFF": "0.2",
            "CACHEMESH_URL": node.url,
        }
        if self.peers and self.etcd_url:
            node.env["CACHEMESH_CLUSTER"] = self.etcd_url
            node.env["CACHEMESH_CLUSTER_LEASE_TTL"] = str(self.lease_ttl_s)
        elif self.peers:
            node.env["CACHEMESH_PEERS"] = ",".join(f"{n.name}={n.url}" for n in self.nodes)

    def add_node(self, name: str) -> Node:
        """A node that joins later (cluster mode: peers find it through etcd); not started."""
        node = self._make_node(name)
        self._set_env(node)
        return node

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0, **server_env: Mapping[str, str]) -> None:
        if self.etcd_host is not None:
            self.start_etcd()
        self.start_origin()
        for node in self.nodes:
            self.start_server(node, server_env.get(node.name, {}), wait=False)
        for node in self.nodes:
            self.wait_ready(node, timeout)

    def start_etcd(self, timeout: float = 30.0) -> None:
        """Debian's etcd on the etcd host (its data under the work directory)."""
        assert self.etcd_host is not None
        ip = self.etcd_host.ip
        client, peer = f"http://{ip}:2379", f"http://{ip}:2380"
        argv = ["etcd", "--name", "netns", "--data-dir", str(self.workdir / "etcd-data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"netns={peer}", "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        self._etcd = self.etcd_host.popen(argv, env, self.workdir / "etcd.log")
        probe = [sys.executable, "-m", "tests.netns.call", "--wait", str(timeout),
                 f"{client}/health"]
        done = self.etcd_host.run(probe, {"PATH": env["PATH"], "PYTHONPATH": str(ROOT)},
                                  timeout + 10)
        if done.returncode != 0:
            raise RuntimeError(f"etcd did not start: {done.stdout}{done.stderr}"
                               f"{self._log('etcd')}")

    def start_origin(self) -> None:
        argv = [sys.executable, "-m", "tests.netns.origin", "--host", self.origin_host.ip,
                "--stats", str(self.stats)]
        for repo, path in self.repos.items():
            argv += ["--repo", f"{repo}={path}"]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
        self._origin = self.origin_host.popen(argv, env, self.workdir / "origin.log")
        deadline = time.monotonic() + 60
        while not self.stats.exists():
            if self._origin.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the origin did not start: {self._log('origin')}")
            time.sleep(0.05)

    def start_server(self, node: Node, extra: Mapping[str, str] | None = None,
                     wait: bool = True) -> None:
        argv = [str(BIN / "cachemesh"), "serve", "--host", node.host.ip, "--port", str(PORT),
                "--grpc-port", "0", "--workers", "1"]
        node.server = node.host.popen(argv, {**node.env, **(extra or {})},
                                      self.workdir / f"{node.name}-serve.log")
        if wait:
            self.wait_ready(node)

    def wait_ready(self, node: Node, timeout: float = 60.0) -> None:
        done = node.host.run([sys.executable, "-m", "tests.netns.call", "--wait", str(timeout),
                              f"{node.url}/v2/health/live"], node.env, timeout + 10)
        if done.returncode != 0:
            raise RuntimeError(f"{node.name} did not start: {done.stdout}{done.stderr}"
                               f"{self._log(node.name + '-serve')}")

    def stop_server(self, node: Node) -> None:
        if node.server is not None:
            stop_group(node.server)
            node.server = None

    def close(self) -> None:
        self.net.close()

    def _log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text()[-3000:]
        except OSError:
            return ""

    # -- what the tests do ----------------------------------------------------------------

    def pull(self, node: Node, repo: str, *args: str,
             env: Mapping[str, str] | None = None) -> subprocess.Popen:
        name = repo.replace("/", "-")
        return node.host.popen([str(BIN / "cachemesh"), "pull", f"hf://{repo}", "--name", name,
                                *args], {**node.env, **(env or {})},
                               self.workdir / f"{node.name}-pull.log")

    def cli(self, node: Node, *args: str, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", node.host.netns, str(BIN / "cachemesh"),
                               *args], env=node.env, input=stdin, capture_output=True,
                              text=True, timeout=timeout)

    def verify(self, node: Node) -> dict:
        done = self.cli(node, "cache", "verify", "--json", timeout=120)
        return json.loads(done.stdout)

    def call(self, node: Node, url: str, *, headers: Mapping[str, str] | None = None,
             method: str = "GET", body: object = None) -> dict:
        """An HTTP call made from inside ``node``'s namespace: status, headers, body size."""
        argv = [sys.executable, "-m", "tests.netns.call", "--method", method, url]
        if body is not None:
            argv += ["--json", json.dumps(body)]
        for k, v in (headers or {}).items():
            argv += ["--header", f"{k}: {v}"]
        done = node.host.run(argv, node.env, 60)
        if done.returncode != 0:
            raise RuntimeError(f"call {url} from {node.name}: {done.stderr}")
        return json.loads(done.stdout)

    def metrics(self, node: Node) -> str:
        return self.call(node, f"{node.url}/metrics")["text"]

    def etcd_keys(self, prefix: str = "/cachemesh/v1/") -> dict[str, dict]:
        """The cluster's keys under ``prefix`` (values parsed as JSON), read with etcdctl."""
        assert self.etcd_host is not None
        done = self.etcd_host.run(
            ["etcdctl", "--endpoints", f"{self.etcd_host.ip}:2379", "get", "--prefix", prefix,
             "-w", "json"], {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ETCDCTL_API": "3"}, 30)
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl: {done.stderr}")
        out = {}
        for kv in json.loads(done.stdout).get("kvs", []):
            key = base64.b64decode(kv["key"]).decode()
            try:
                out[key] = json.loads(base64.b64decode(kv.get("value", "")))
            except ValueError:
                out[key] = {"raw": base64.b64decode(kv.get("value", "")).decode(errors="replace")}
        return out

    def origin_served(self) -> int:
        for _ in range(50):
            try:
                return int(json.loads(self.stats.read_text())["served"])
            except (OSError, ValueError):
                time.sleep(0.02)
        raise RuntimeError("cannot read the origin's counters")

    def log(self, node: Node, what: str = "pull") -> str:
        return self._log(f"{node.name}-{what}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        base, _, rest = key.partition("{")
        if base == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
            return float(value)
        if base == name and not labels and not rest:
            return float(value)
    return 0.0
