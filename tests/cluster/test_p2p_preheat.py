"""Preheat through the control API of real ``serve --cluster`` nodes (three, on loopback):
ECI's CreateDataCache with ``Nodes``/``MinCopies``, ``N`` nodes picked once for every
node to read, the same declaration on another node accepted, per-node progress in GET,
and the declarations refused where they cannot mean anything."""

from __future__ import annotations

import os

from tests.cluster.nodes import Cluster, wait_until


def _eci(name: str, folder: str, **extra: object) -> dict[str, object]:
    return {"Name": name, "DataSource": {"Type": "NAS", "Options": {
        "server": "localhost", "path": folder}}, **extra}


def test_eci_nodes_n_picks_nodes_once_and_reports_each(three_nodes: Cluster) -> None:
    a, b, c = three_nodes["a"], three_nodes["b"], three_nodes["c"]
    folder = three_nodes.origin / "preheat-two"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(os.urandom(64 * 1024))
    body = _eci("preheat-two", str(folder), Nodes=2, MinCopies=1)
    first = a.http.post("/api/v1/datacaches", json=body)
    assert first.status_code == 202, first.text
    assigned = first.json()["cluster"]["assigned"]
    assert len(assigned) == 2 and set(assigned) <= {"a", "b", "c"}
    assert first.json()["cluster"]["min_copies"] == 1
    # The same declaration on another node: accepted, the same nodes.
    again = c.http.post("/api/v1/datacaches", json=body)
    assert again.status_code == 202, again.text
    assert again.json()["cluster"]["assigned"] == assigned

    def progress() -> dict | None:
        seen = b.http.get("/api/v1/datacaches/preheat-two").json()
        done = {n: p["state"] for n, p in seen["nodes"].items()}
        return seen if done == {n: "Available" for n in assigned} else None

    seen = wait_until(progress, 30, "the two picked nodes to hold the cache", every=0.2)
    assert seen["node"] == "b"
    assert all(p["progress"] == 1.0 for p in seen["nodes"].values())
    left_out = ({"a", "b", "c"} - set(assigned)).pop()
    out = three_nodes[left_out].http.get("/api/v1/datacaches/preheat-two").json()
    assert out["status"] == "Pending" and out["node"] == left_out  # declared, not here
    # Another declaration under the name: 409.
    other = b.http.post("/api/v1/datacaches", json=_eci("preheat-two", str(folder), Nodes=1))
    assert other.status_code == 409, other.text


def test_bad_nodes_are_refused(three_nodes: Cluster) -> None:
    a = three_nodes["a"]
    folder = three_nodes.origin / "preheat-bad"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"x")
    for nodes in (0, "NOT A NAME", [], True):
        answer = a.http.post("/api/v1/datacaches", json={
            "name": "preheat-bad", "source": str(folder), "nodes": nodes})
        assert answer.status_code in (400, 422), (nodes, answer.text)
    assert a.http.get("/api/v1/datacaches/preheat-bad").status_code == 404
