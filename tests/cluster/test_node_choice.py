"""The pure decisions of cluster placement: which node loads a copy, which copy answers,
how many copies a version wants across nodes (serve/cluster/node_choice.py, cluster_copies.py),
and the scaling document's bounds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cachemesh.cluster.records import CopyState, NodeRecord
from cachemesh.serve.cluster.cluster_copies import wanted
from cachemesh.serve.cluster.node_choice import pick_copy, rank_for_load
from cachemesh.serve.core.documents import Scaling

GiB = 1 << 30


def node(name: str, free: int = GiB, last_used: float = 0.0, **fields: object) -> NodeRecord:
    copies = [CopyState(model="other", last_used=last_used)] if last_used else []
    return NodeRecord(name=name, node_id=name, advertise=f"http://{name}:8008",
                      capacity_bytes=4 * GiB, memory_used_bytes=4 * GiB - free, copies=copies,
                      **fields)


def test_rank_files_then_memory_then_lru_then_here() -> None:
    records = [node("a", free=GiB), node("b", free=2 * GiB), node("c", free=2 * GiB,
                                                                   last_used=100.0)]
    assert rank_for_load(records, "a", grain=1) == ["b", "c", "a"]
    assert rank_for_load(records, "a", grain=4 * GiB) == ["a", "b", "c"]  # all alike: LRU
    assert rank_for_load(records, "a", has_files={"a"}) == ["a", "b", "c"]
    tie = [node("a"), node("b")]
    assert rank_for_load(tie, "b") == ["b", "a"]  # no hop on a tie


def test_rank_prefers_the_node_whose_record_has_the_files() -> None:
    # b has the version's files (its record's ``prepared``) but the least free memory and
    # the newest use: files first, then memory, then LRU, as the issue orders them.
    records = [node("a", free=3 * GiB), node("b", free=GiB, last_used=100.0,
                                             prepared={"m": ["v1"]}),
               node("c", free=2 * GiB, prepared={"m": ["v2"], "other": ["v1"]})]
    assert rank_for_load(records, "a", model="m", version="v1", grain=1) == ["b", "a", "c"]
    assert rank_for_load(records, "a", model="m", version="v2", grain=1) == ["c", "a", "b"]
    # another version, or another model, of the same name: no files anywhere
    assert rank_for_load(records, "a", model="m", version="v3", grain=1) == ["a", "c", "b"]
    assert rank_for_load(records, "a", model="n", version="v1", grain=1) == ["a", "c", "b"]
    assert rank_for_load(records, "a", grain=1) == ["a", "c", "b"]  # no model: no files
    # the default version, named or not
    assert rank_for_load([node("a"), node("b", prepared={"m": ["default"]})], "a",
                         model="m") == ["b", "a"]
    # a draining node with the files is still left out
    assert rank_for_load([node("a"), node("b", draining=True, prepared={"m": ["default"]})],
                         "a", model="m") == ["a"]


def test_record_hint_is_read_by_older_and_newer_readers() -> None:
    record = node("a", prepared={"m": ["v1"]})
    data = record.to_bytes()
    assert NodeRecord.from_bytes(data).has_files("m", "v1")
    # a record without the field (an older node) has no files: placement ranks it on memory
    old = record.model_dump(mode="json")
    del old["prepared"]
    assert not NodeRecord.model_validate(old).has_files("m", "v1")
    # an unknown field from a newer node is ignored
    assert NodeRecord.model_validate({**old, "later": 1}).name == "a"


def test_rank_leaves_out_draining_excluded_and_unable() -> None:
    records = [node("a", draining=True), node("b"), node("c", cannot_load={"m": "no source"}),
               node("d")]
    assert rank_for_load(records, "b", model="m", excluded={"d"}) == ["b"]
    assert rank_for_load(records, "b", model="other") == ["b", "c", "d"]


def test_pick_copy_fewest_in_flight_then_oldest_pick() -> None:
    assert pick_copy(["a", "b"], {"a": 2, "b": 1}, {}) == "b"
    assert pick_copy(["a", "b"], {}, {"a": 5, "b": 3}) == "b"
    assert pick_copy([], {}, {}) is None


def test_wanted_copies() -> None:
    assert wanted(0, 0, 2, 1, 1000.0) == 2  # min_copies, whatever the rate
    assert wanted(50, 0, 0, 1, 60.0) == 2  # hot: one more
    assert wanted(50, 0, 0, 2, 60.0) == 0  # not hot: nothing asked beyond what it has
    assert wanted(50, 2, 0, 2, 500.0) == 2  # capped by max_copies


def test_min_copies_not_above_max() -> None:
    assert Scaling(min_copies=2, max_copies=2).min_copies == 2
    with pytest.raises(ValidationError, match="min_copies"):
        Scaling(min_copies=3, max_copies=2)
