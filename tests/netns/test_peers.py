"""Peer-to-peer distribution between nodes in their own network namespaces.

Four real ``cachemesh serve`` nodes, each in a namespace with a 400 Mbit/s link and no
default route, and the Hugging Face emulator as the origin behind an 80 Mbit/s link
(tbf), all on one bridge (``net.py``, ``fleet.py``), with a real etcd on a host of its
own. Peers are found through the blob index in etcd (cluster mode,
``cluster/blob_index.py``); the cluster-wide single flight is the lease-bound claim
``fetching/{sha256}``. Every assertion is about what a user would check: bytes the origin served,
``cache verify``, the files in the view, ``/metrics``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.netns.fleet import TOKEN, Fleet, metric
from tests.netns.net import leftovers

MIB = 1024 * 1024
SECRET = "secret-bucket-token-0123456789"
# (repo, bytes of its weights file); each test has a model of its own.
MODELS = {"org/together": 40 * MIB, "org/secret": 16 * MIB, "org/flipped": 24 * MIB,
          "org/killed": 48 * MIB, "org/warm": 12 * MIB, "org/pair": 4 * MIB}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for repo, size in MODELS.items():
        folder = root / repo.replace("/", "-")
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(os.urandom(size))
        (folder / "config.json").write_text('{"model_type": "test"}')
        out[repo] = folder
    return out


@pytest.fixture(scope="module")
def fleet(netns: None, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(work, nodes=4, origin_mbit=80, node_mbit=400, repos=models, etcd=True)
    try:
        fleet.start()
        yield fleet
    finally:
        tag = fleet.net.tag
        fleet.close()
        assert leftovers(tag) == [], "namespaces left behind"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finish(fleet: Fleet, procs: dict, timeout: float = 60) -> None:
    for node, proc in procs.items():
        code = proc.wait(timeout)
        assert code == 0, f"{node.name}'s pull failed:\n{fleet.log(node)[-2000:]}"


def _view(node, bucket: str, repo: str) -> Path:
    return node.home / "store" / "buckets" / bucket / repo.replace("/", "-")


def test_four_nodes_at_once_cost_the_origin_one_copy(fleet: Fleet, models: dict[str, Path]):
    repo = "org/together"
    size = sum(p.stat().st_size for p in models[repo].iterdir())
    before = fleet.origin_served()
    procs = {node: fleet.pull(node, repo) for node in fleet.nodes}
    _finish(fleet, procs)
    served = fleet.origin_served() - before
    assert served <= 1.1 * size, f"the origin served {served / size:.2f} copies"
    weights = models[repo] / "model.safetensors"
    for node in fleet.nodes:
        report = fleet.verify(node)
        assert report["ok"], (node.name, report)
        assert _sha(_view(node, "default", repo) / "model.safetensors") == _sha(weights)
    # The index in etcd: every node holds the blob; the claim is given back; the node that
    # fetched it from the origin published its piece hashes.
    sha = _sha(weights)
    keys = fleet.etcd_keys()
    holders = {v["node"]: v["state"] for k, v in keys.items()
               if k.startswith(f"/cachemesh/v1/blobs/{sha}/")}
    assert holders == {n.name: "held" for n in fleet.nodes}, holders
    assert f"/cachemesh/v1/fetching/{sha}" not in keys
    assert keys[f"/cachemesh/v1/pieces/{sha}"]["size"] == MODELS[repo]
    # The pieces spread between the followers too, not only from the first node.
    taken = {node.name: metric(fleet.metrics(node), "cachemesh_peer_served_bytes_total")
             for node in fleet.nodes}
    assert sum(taken.values()) >= 3 * MODELS[repo], taken
    assert sum(1 for n in taken.values() if n > 0) >= 2, taken


def test_a_protected_buckets_blob_needs_its_token(fleet: Fleet, models: dict[str, Path]):
    n1, n2, n3, _ = fleet.nodes
    repo = "org/secret"
    for node in (n1, n3):
        done = fleet.cli(node, "bucket", "protect", "secret", "--token-stdin", stdin=SECRET)
        assert done.returncode == 0, done.stderr
    _finish(fleet, {n1: fleet.pull(n1, repo, "--bucket", "secret")})
    sha = _sha(models[repo] / "model.safetensors")
    url = f"{n1.url}/api/v1/blobs/sha256/{sha}"
    cluster = {"Authorization": f"Bearer {TOKEN}"}
    assert fleet.call(n2, url, method="HEAD")["status"] == 401  # no cluster token
    assert fleet.call(n2, url, method="HEAD", headers={
        "Authorization": "Bearer not-the-cluster-token-000"})["status"] == 401
    assert fleet.call(n2, url, method="HEAD", headers=cluster)["status"] == 404
    opened = fleet.call(n2, url, headers={**cluster, "Range": "bytes=0-99",
                                          "X-Cachemesh-Bucket-Token": SECRET})
    assert opened["status"] == 206 and opened["size"] == 100
    assert opened["headers"]["x-cachemesh-blob"] == "verified"

    # A node with the token takes the blob from n1; a node without it goes to the origin.
    before = fleet.origin_served()
    _finish(fleet, {n3: fleet.pull(n3, repo, "--bucket", "secret",
                                   env={"CACHEMESH_BUCKET_TOKEN": SECRET})})
    assert fleet.origin_served() - before < MIB
    before = fleet.origin_served()
    _finish(fleet, {n2: fleet.pull(n2, repo)})
    assert fleet.origin_served() - before >= MODELS[repo]
    for node in (n1, n2, n3):
        assert fleet.verify(node)["ok"]


def test_a_peer_that_flips_bytes_costs_time_not_correctness(fleet: Fleet,
                                                            models: dict[str, Path]):
    n1, n2, n3, _ = fleet.nodes
    repo = "org/flipped"
    _finish(fleet, {n1: fleet.pull(n1, repo)})
    _finish(fleet, {n2: fleet.pull(n2, repo)})
    fleet.stop_server(n2)
    fleet.start_server(n2, {"CACHEMESH_PEER_FAULT": "flip"})  # n2 now flips what it sends
    try:
        before = fleet.origin_served()
        _finish(fleet, {n3: fleet.pull(n3, repo)})
        assert fleet.origin_served() - before < MIB  # every piece came from a peer
        assert fleet.verify(n3)["ok"]
        weights = models[repo] / "model.safetensors"
        assert _sha(_view(n3, "default", repo) / "model.safetensors") == _sha(weights)
        text = fleet.metrics(n3)
        assert metric(text, "cachemesh_peer_faults_total", peer="n2", kind="bad-piece") >= 1
        assert metric(text, "cachemesh_peer_fetched_bytes_total", peer="n1") >= MODELS[repo] / 2
    finally:
        fleet.stop_server(n2)
        fleet.start_server(n2)


def test_a_peer_killed_mid_transfer_the_others_finish(fleet: Fleet, models: dict[str, Path]):
    repo = "org/killed"
    size = MODELS[repo]
    sha = _sha(models[repo] / "model.safetensors")
    before = fleet.origin_served()
    procs = {node: fleet.pull(node, repo) for node in fleet.nodes}
    deadline = time.monotonic() + 30
    while fleet.origin_served() - before < size // 3:
        assert time.monotonic() < deadline, "the origin never served a third of the model"
        time.sleep(0.05)
    # The node that holds the origin's turn (its claim in etcd) dies, server and pull.
    claim = fleet.etcd_keys().get(f"/cachemesh/v1/fetching/{sha}")
    assert claim is not None, "nobody holds the origin's turn mid-transfer"
    seed = next(n for n in fleet.nodes if n.name == claim["node"])
    seed.host.kill(procs.pop(seed))
    fleet.stop_server(seed)
    _finish(fleet, procs)
    weights = models[repo] / "model.safetensors"
    for node in procs:
        assert fleet.verify(node)["ok"]
        assert _sha(_view(node, "default", repo) / "model.safetensors") == _sha(weights)
    # The seed is gone with what it had landed; its claim went with its lease, another
    # node took it and fetched the rest, once.
    assert fleet.origin_served() - before <= 2 * size
    keys = fleet.etcd_keys()
    assert f"/cachemesh/v1/fetching/{sha}" not in keys
    assert f"/cachemesh/v1/blobs/{sha}/{seed.name}" not in keys  # its server's lease went


def _api(fleet: Fleet, node, path: str, **kw) -> dict:
    answer = fleet.call(node, f"{node.url}/api/v1/{path}", **kw)
    return {**answer, "json": json.loads(answer["text"]) if answer["text"] else None}


def test_preheat_to_all_nodes_a_late_joiner_and_min_copies(fleet: Fleet,
                                                           models: dict[str, Path]):
    """Last in the module: it adds a node and evicts caches from n1."""
    n1, n2, n3, _ = fleet.nodes
    for node in fleet.nodes:
        if node.server is None:  # stopped by an earlier test (the peer killed)
            fleet.start_server(node)
    repo, size = "org/warm", MODELS["org/warm"]
    weights = _sha(models[repo] / "model.safetensors")
    before = fleet.origin_served()
    # `cachemesh pull --nodes all` on n1: declared through n1's API, pulled by every node.
    done = fleet.cli(n1, "pull", f"hf://{repo}", "--name", "warm", "--nodes", "all",
                     "--min-copies", "2", timeout=60)
    assert done.returncode == 0, done.stderr
    assert fleet.origin_served() - before <= 1.1 * size + MIB
    for node in fleet.nodes:
        assert _sha(_view(node, "default", "warm") / "model.safetensors") == weights

    # The same declaration on another node: 2xx; another one under the name: 409.
    body = {"name": "warm", "source": f"hf://{repo}", "nodes": "all", "min_copies": 2}
    assert _api(fleet, n2, "datacaches", method="POST", body=body)["status"] == 202
    other = {**body, "nodes": 1}
    assert _api(fleet, n3, "datacaches", method="POST", body=other)["status"] == 409
    seen = _api(fleet, n2, "datacaches/warm")["json"]
    assert seen["node"] == "n2"
    assert {n: (p["state"], p["progress"]) for n, p in seen["nodes"].items()} == {
        n.name: ("Available", 1.0) for n in fleet.nodes}

    # A node that joins later pulls it too, from its peers.
    n5 = fleet.add_node("n5")
    fleet.start_server(n5)
    deadline = time.monotonic() + 30
    while _api(fleet, n2, "datacaches/warm")["json"]["nodes"].get("n5", {}).get(
            "state") != "Available":
        assert time.monotonic() < deadline, "n5 never pulled the cache declared for all"
        time.sleep(0.3)
    assert _sha(_view(n5, "default", "warm") / "model.safetensors") == weights
    assert fleet.origin_served() - before <= 1.1 * size + MIB

    # min_copies: on n1, gc down to nothing keeps the cache only two nodes hold, and
    # evicts the one five nodes hold (its entry in etcd goes with it).
    done = fleet.cli(n1, "pull", "hf://org/pair", "--name", "pair", "--nodes", "n1,n2",
                     "--min-copies", "2", timeout=60)
    assert done.returncode == 0, done.stderr
    done = fleet.cli(n1, "gc", "--max-size", "1", "--json", timeout=60)
    assert done.returncode == 0, done.stderr
    removed = json.loads(done.stdout)["removed_caches"]
    assert "warm" in removed and "pair" not in removed, removed
    assert (_view(n1, "default", "pair") / "model.safetensors").exists()
    keys = fleet.etcd_keys()
    assert "/cachemesh/v1/prewarm/warm/n1" not in keys
    assert keys["/cachemesh/v1/prewarm/pair/n1"]["state"] == "Available"
