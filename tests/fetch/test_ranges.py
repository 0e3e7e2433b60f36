"""RangeSet against a model (a set of byte offsets), and the partial-state record."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachemesh.fetch.ranges import PartialFiles, PartialState, RangeSet, split

SIZE = 200
intervals = st.lists(
    st.tuples(st.integers(0, SIZE), st.integers(0, SIZE)).map(lambda t: (min(t), max(t))),
    max_size=25,
)


def as_bytes(ranges: list[tuple[int, int]]) -> set[int]:
    return {i for s, e in ranges for i in range(s, e)}


@settings(max_examples=300, deadline=None)
@given(intervals, st.integers(0, SIZE), st.integers(0, SIZE))
def test_range_set_matches_a_set_of_offsets(added, a, b):
    rs = RangeSet(added)
    model = as_bytes(added)
    got = rs.intervals()
    assert as_bytes(got) == model
    # disjoint, sorted, merged (adjacent ranges join)
    for (s1, e1), (s2, e2) in pairwise(got):
        assert s1 < e1 < s2 < e2
    assert rs.total() == len(model)
    start, end = min(a, b), max(a, b)
    assert rs.covers(start, end) == all(i in model for i in range(start, end))
    assert as_bytes(list(rs.gaps(SIZE))) == set(range(SIZE)) - model
    prefix = 0
    while prefix in model:
        prefix += 1
    assert rs.prefix_end() == prefix


@given(intervals, st.integers(1, 64))
def test_split_covers_the_gaps_in_aligned_pieces_of_at_most_chunk(added, chunk):
    gaps = list(RangeSet(added).gaps(SIZE))
    pieces = split(gaps, chunk)
    assert as_bytes(pieces) == as_bytes(gaps)
    assert sum(e - s for s, e in pieces) == sum(e - s for s, e in gaps)
    for s, e in pieces:
        assert 0 < e - s <= chunk
        assert s // chunk == (e - 1) // chunk  # never crosses a chunk boundary


def test_state_round_trips_and_malformed_records_are_refused(tmp_path):
    files = PartialFiles(tmp_path / "fetch", "k" * 64)
    assert files.read_state() is None
    state = PartialState(100, RangeSet([(0, 10), (50, 60)]), object="s3://b/k")
    files.write_state(state)
    again = files.read_state()
    assert again is not None
    assert again.landed == state.landed and again.size == 100 and again.sha256 is None
    for bad in ['{"format": 2, "size": 1, "landed": []}',
                '{"format": 1, "size": 10, "landed": [[5, 20]]}',
                '{"format": 1, "size": 10, "landed": [[5, 3]]}',
                '{"format": 1, "size": -1, "landed": []}',
                '{"format": 1, "size": 10, "landed": [], "sha256": "xyz"}',
                "not json", ""]:
        files.state.write_text(bad)
        assert files.read_state() is None, bad
    files.write_state(state)
    files.part.write_bytes(b"x")
    files.discard()
    assert not files.state.exists() and not files.part.exists()
    assert json.loads(state.to_json())["landed"] == [[0, 10], [50, 60]]


@pytest.mark.parametrize("ranges,expected", [
    ([(0, 5), (5, 10)], [(0, 10)]),
    ([(0, 5), (6, 10)], [(0, 5), (6, 10)]),
    ([(6, 10), (0, 5), (4, 7)], [(0, 10)]),
    ([(3, 3)], []),
])
def test_range_set_merges(ranges, expected):
    assert RangeSet(ranges).intervals() == expected


def test_split_ramps_up_from_byte_zero_only():
    """A watched fetch's head comes in doubling pieces, then the aligned grid resumes."""
    mib = 1024 * 1024
    pieces = split([(0, 40 * mib)], 16 * mib, 256 * 1024)
    sizes = [b - a for a, b in pieces]
    assert sizes[:6] == [256 * 1024 * 2**i for i in range(6)]
    assert pieces[-2:] == [(16 * mib, 32 * mib), (32 * mib, 40 * mib)]
    assert all(b == c for (_, b), (c, _) in pairwise(pieces)) and pieces[0][0] == 0
    assert split([(5, 40 * mib)], 16 * mib, 256 * 1024) == split([(5, 40 * mib)], 16 * mib)
    assert split([(0, 100)], 16 * mib, 256 * 1024) == [(0, 100)]
