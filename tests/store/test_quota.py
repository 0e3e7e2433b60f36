from cachemesh.store.quota import Candidate, plan_eviction


def test_lru_first_and_stops_when_enough() -> None:
    refs = {"a": {"old"}, "b": {"mid"}, "c": {"new"}}
    sizes = {"a": 10, "b": 10, "c": 10}
    cands = [Candidate("new", 3, frozenset("c")), Candidate("old", 1, frozenset("a")),
             Candidate("mid", 2, frozenset("b"))]
    assert plan_eviction(cands, 15, refs, sizes) == (["old", "mid"], 20)


def test_shared_blobs_free_only_when_every_owner_goes() -> None:
    refs = {"shared": {"x", "y", "pinned"}, "only-x": {"x"}}
    sizes = {"shared": 100, "only-x": 1}
    cands = [Candidate("x", 1, frozenset({"shared", "only-x"})),
             Candidate("y", 2, frozenset({"shared"}))]
    # "pinned" still references the shared blob, so evicting x and y frees 1 byte.
    assert plan_eviction(cands, 50, refs, sizes) is None
    assert plan_eviction(cands, 1, refs, sizes) == (["x"], 1)


def test_blobs_the_new_pull_reuses_are_not_counted() -> None:
    refs = {"a": {"old"}}
    assert plan_eviction([Candidate("old", 1, frozenset("a"))], 5, refs, {"a": 10},
                         keep_blobs={"a"}) is None


def test_nothing_needed() -> None:
    assert plan_eviction([], 0, {}, {}) == ([], 0)
