"""The small parts of peer fetching: piece lists, the range header, the static single flight,
the settings that turn it on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cachemesh.config import Settings
from cachemesh.errors import InvalidInputError
from cachemesh.fetch.peer_http import format_ranges, parse_ranges
from cachemesh.fetch.peers import Peer, StaticPeers
from cachemesh.fetch.pieces import PieceList, compute, piece_ranges
from cachemesh.fetch.ranges import RangeSet


def test_a_piece_list_is_the_sha256_of_each_piece(tmp_path: Path):
    data = os.urandom(2 * 1000 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    pieces = compute(path, sha, len(data), 1000)
    assert pieces is not None
    assert pieces.ranges() == [(0, 1000), (1000, 2000), (2000, 2007)]
    assert pieces.digests[2] == hashlib.sha256(data[2000:]).hexdigest()
    assert pieces.matches(1, data[1000:2000]) and not pieces.matches(1, data[:1000])
    assert PieceList.from_json(pieces.to_json()) == pieces
    # Bytes that are not the blob they claim to be give no list at all.
    assert compute(path, "0" * 64, len(data), 1000) is None
    assert compute(path, sha, len(data) + 1, 1000) is None


@pytest.mark.parametrize("text", [
    "not json", "{}", '{"format": 1, "sha256": "x", "size": 1, "piece_size": 1, "digests": []}',
    '{"format": 1, "sha256": "' + "a" * 64 + '", "size": 10, "piece_size": 4, "digests": []}',
])
def test_a_malformed_piece_list_is_refused(text: str):
    with pytest.raises(ValueError):
        PieceList.from_json(text)


def test_piece_ranges_cover_the_blob_once():
    assert piece_ranges(0, 4) == []
    assert piece_ranges(9, 4) == [(0, 4), (4, 8), (8, 9)]


def test_the_range_header_round_trips_and_refuses_nonsense():
    ranges = ((0, 100), (200, 201))
    assert format_ranges(ranges) == "0-99,200-200"
    assert parse_ranges("0-99,200-200", 300) == ranges
    assert parse_ranges("", 300) == ()
    for bad in ("0-300", "5-4", "x-1", "7"):
        with pytest.raises(ValueError):
            parse_ranges(bad, 300)


def test_bad_bytes_can_be_taken_out_of_a_range_set():
    landed = RangeSet([(0, 100), (200, 300)])
    landed.remove(50, 250)
    assert landed.intervals() == [(0, 50), (250, 300)]
    landed.remove(0, 50)
    assert landed.intervals() == [(250, 300)] and landed.prefix_end() == 0


def test_the_lowest_named_fetching_node_goes_to_the_origin():
    peers = [Peer(n, f"http://{n}:8008") for n in ("a", "b", "c", "d")]
    c = StaticPeers("c", peers, grace_s=2.0)
    assert [p.name for p in c.candidates("0" * 64)] == ["a", "b", "d"]
    # A lower-named node fetches it: follow it, however long it takes.
    assert not c.origin_turn("x", {"a": "absent", "b": "fetching"}, 60.0)
    # Lower-named nodes alive but not fetching (yet): wait for them, then go.
    assert not c.origin_turn("x", {"a": "absent", "b": "partial"}, 0.5)
    assert c.origin_turn("x", {"a": "absent", "b": "partial"}, 2.0)
    # Dead lower-named nodes are not waited for; higher-named ones never count.
    assert c.origin_turn("x", {"a": "dead", "b": "dead", "d": "fetching"}, 0.0)
    assert StaticPeers("a", peers).origin_turn("x", {"b": "fetching"}, 0.0)


def test_static_peers_come_from_the_settings(tmp_path: Path):
    env = {"CACHEMESH_HOME": str(tmp_path), "CACHEMESH_NODE_NAME": "b",
           "CACHEMESH_CLUSTER_TOKEN": "t" * 16,
           "CACHEMESH_PEERS": "b=http://10.0.0.2:8008, a=http://10.0.0.1:8008"}
    settings = Settings.from_env(env)
    assert settings.cluster.peers == (("a", "http://10.0.0.1:8008"),
                                      ("b", "http://10.0.0.2:8008"))
    static = StaticPeers.from_settings(settings.cluster)
    assert [p.name for p in static.candidates("x")] == ["a"]
    for bad in ({"CACHEMESH_CLUSTER_TOKEN": ""}, {"CACHEMESH_PEERS": "a"},
                {"CACHEMESH_PEERS": "a=ftp://x:1"}, {"CACHEMESH_PEER_FAULT": "melt"}):
        with pytest.raises(InvalidInputError):
            Settings.from_env({**env, **bad})
