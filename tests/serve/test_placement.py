"""The placement policy (a pure function over slots) and the copy scaler's decisions."""

from __future__ import annotations

from cachemesh.serve.core.copies import CopyPolicy, RateMeter, decide, pick
from cachemesh.serve.core.placement import Resident, held, place
from cachemesh.serve.core.placement import SlotState as Slot

MB = 1024 * 1024
GB = 1024 * MB
BASE = 100 * MB


def r(key: str, size: int, last_used: float, *, model: str | None = None, inflight: int = 0,
      loaded_at: float = 0.0, uses: float = 1.0, loading: bool = False) -> Resident:
    return Resident(key, model or key, size * MB, inflight, last_used, loaded_at, loading, uses)


def workers(budget: int, *specs: tuple[int, list[Resident]], rss: list[int] | None = None,
            alive: tuple[bool, ...] | None = None) -> list[Slot]:
    """Worker slots of one server: they share ``budget``; ``specs`` gives (id, residents)."""
    slots = []
    for i, (sid, residents) in enumerate(specs):
        sizes = sum(x.size for x in residents if not x.loading)
        used = held(BASE, rss[i] if rss else 0, sizes,
                    sum(x.size for x in residents if x.loading))
        slots.append(Slot(sid, alive[i] if alive else True, budget - BASE * (len(specs) - 1),
                          used, BASE, tuple(residents), sum(x.inflight for x in residents)))
    return slots


def node(sid: int, capacity: int, residents: list[Resident], load: int = 0) -> Slot:
    """A node of a mesh: bounded by its own capacity, no shared pool."""
    return Slot(sid, True, capacity * MB, BASE + sum(x.size for x in residents), BASE,
                tuple(residents), load)


def test_an_empty_slot_with_room_wins_and_nothing_is_evicted():
    slots = workers(GB, (1, []), (2, []), rss=[150 * MB, 120 * MB])
    plan = place(10 * MB, slots, now=100, pool=GB)
    assert plan.slot == 2 and plan.evict == ()  # both empty: more free memory decides
    assert "not full" in plan.reasons[-1] and "slot 2: empty" in plan.reasons[-1]


def test_the_slot_that_read_the_weights_ahead_wins_while_it_has_room():
    # Worker 1 holds the prefetched weights in its RSS: less free memory, yet preferred.
    slots = workers(8 * GB, (1, []), (2, []), rss=[2 * GB, 120 * MB])
    plan = place(GB, slots, now=100, pool=8 * GB, prefer=1)
    assert plan.slot == 1 and plan.evict == () and "read its weights ahead" in plan.reasons[-1]
    assert place(GB, slots, now=100, pool=8 * GB).slot == 2
    # Without room there, it is not worth an eviction: another slot takes it.
    full = workers(8 * GB, (1, [r("big", 5000, last_used=1)]), (2, []),
                   rss=[7 * GB, 120 * MB])
    assert place(GB, full, now=100, pool=8 * GB, prefer=1).slot == 2


def test_among_slots_with_room_the_oldest_least_recently_used_model_decides():
    slots = [node(1, 1000, [r("a", 50, last_used=50)]), node(2, 1000, [r("b", 50, last_used=10)]),
             node(3, 1000, [r("c", 50, last_used=10), r("d", 50, last_used=60)])]
    plan = place(10 * MB, slots, now=100)
    # 2 and 3 hold a model last used at 10; 2 holds fewer models
    assert plan.slot == 2 and "least recently used 90.0s ago" in plan.reasons[-1]
    # a tie on everything else goes to the slot with fewer requests in flight
    tied = [node(1, 1000, [], load=5), node(2, 1000, [], load=1)]
    assert place(10 * MB, tied, now=100).slot == 2


def test_a_slot_that_is_not_full_beats_evicting_on_an_older_one():
    # node 1 holds the oldest model but is full; node 2 has room
    slots = [node(1, 200, [r("old", 100, last_used=1)]), node(2, 400, [r("new", 100, last_used=99)])]
    plan = place(50 * MB, slots, now=100)
    assert plan.slot == 2 and plan.evict == ()


def test_nodes_evict_only_their_own_models():
    slots = [node(1, 200, [r("old", 100, last_used=1)]), node(2, 200, [r("new", 100, last_used=99)])]
    plan = place(80 * MB, slots, now=100)
    assert (plan.slot, plan.evict) == (1, ("old",))
    plan = place(80 * MB, slots, now=100, exclude=frozenset({1}))
    assert (plan.slot, plan.evict) == (2, ("new",))


def test_workers_share_the_pool_and_evict_least_recently_used_idle_models():
    slots = workers(400 * MB, (1, [r("old", 50, 10), r("busy", 50, 5, inflight=1)]),
                    (2, [r("new", 50, 90)]))  # 350 held of 400: 50 free
    plan = place(80 * MB, slots, now=100, pool=400 * MB)
    assert plan.evict == ("old",) and plan.slot == 1
    assert any("evict old (idle" in x for x in plan.reasons)
    plan = place(120 * MB, slots, now=100, pool=400 * MB)
    assert plan.evict == ("old", "new")  # room on worker 2 serves a load on worker 1
    plan = place(160 * MB, slots, now=100, pool=400 * MB)  # only "busy" could make room
    assert plan.wait and plan.slot is None and "1 busy" in plan.reasons[-1]


def test_extra_copies_go_first_even_before_an_older_model():
    slots = workers(500 * MB,
                    (1, [r("hot#1", 50, 90, model="hot"), r("cold", 50, 10)]),
                    (2, [r("hot#2", 50, 80, model="hot")]))  # 350 of 500: 150 free
    plan = place(190 * MB, slots, now=100, pool=500 * MB)
    assert plan.evict == ("hot#2",)  # the copy used less recently goes; "hot" keeps one
    assert any("evict hot#2 (extra copy" in x for x in plan.reasons)
    plan = place(240 * MB, slots, now=100, pool=500 * MB)
    assert plan.evict == ("hot#2", "cold")  # then the least recently used
    plan = place(290 * MB, slots, now=100, pool=500 * MB)
    assert plan.evict == ("hot#2", "cold", "hot#1")


def test_the_less_used_half_goes_first_and_young_models_stay():
    slots = workers(250 * MB, (1, [r("hot", 50, 10, uses=5.0), r("cold", 50, 50, uses=1.0)]))
    plan = place(60 * MB, slots, now=100, pool=250 * MB)
    assert plan.evict == ("cold",)  # used once recently: goes before the older but hot one
    slots = workers(200 * MB, (1, [r("young", 50, 99, loaded_at=99.5)]))
    plan = place(60 * MB, slots, now=100, pool=200 * MB, min_resident_s=2)
    assert plan.wait and "loaded less than 2s ago" in plan.reasons[-1]
    # a loading model is neither evicted nor counted free
    slots = workers(300 * MB, (1, [r("incoming", 150, 0, loading=True)]))
    plan = place(60 * MB, slots, now=100, pool=300 * MB)
    assert plan.wait


def test_never_two_copies_on_one_slot_and_extra_copies_take_free_room_only():
    slots = workers(GB, (1, [r("m#1", 50, 90, model="m")]), (2, []))
    plan = place(50 * MB, slots, now=100, pool=GB, exclude=frozenset({1}))
    assert plan.slot == 2
    plan = place(50 * MB, slots, now=100, pool=GB, exclude=frozenset({1, 2}))
    assert plan.slot is None and not plan.wait and "holds a copy already" in plan.reasons[0]
    full = workers(300 * MB, (1, [r("m#1", 50, 90, model="m")]), (2, [r("x", 50, 1)]))
    plan = place(50 * MB, full, now=100, pool=300 * MB, exclude=frozenset({1}), evict=False)
    assert plan.slot is None and not plan.wait and plan.evict == ()
    assert "without evicting" in plan.reasons[-1]


def test_too_large_dead_slots_avoided_slots_and_rss_beyond_what_is_accounted():
    slots = workers(250 * MB, (1, []))
    plan = place(200 * MB, slots, now=100, pool=250 * MB)  # 250 budget less 100 worker memory
    assert plan.too_large and "more than the memory budget" in plan.reasons[0]
    assert place(50 * MB, [node(1, 100, [])], now=0).too_large  # a node: its own capacity
    dead = workers(GB, (1, []), (2, []), alive=(False, True))
    assert place(MB, dead, now=0, pool=GB).slot == 2
    assert place(MB, workers(GB, (1, []), alive=(False,)), now=0, pool=GB).wait
    # a slot a load failed on is avoided while another can take it, used if none can
    two = workers(GB, (1, []), (2, []), rss=[100 * MB, 300 * MB])
    assert place(MB, two, now=0, pool=GB, avoid=frozenset({1})).slot == 2
    assert place(MB, two, now=0, pool=GB, avoid=frozenset({1, 2})).slot == 1
    # memory an unload did not give back counts
    rss = workers(400 * MB, (1, [r("a", 50, 1)]), rss=[380 * MB])
    assert place(50 * MB, rss, now=100, pool=400 * MB).evict == ("a",)


def policy(rate: float = 10, max_copies: int = 0, cooldown: float = 5) -> CopyPolicy:
    return CopyPolicy(copy_rate=rate, max_copies=max_copies, cooldown_s=cooldown)


def test_copies_are_added_past_the_threshold_up_to_the_max_and_the_slots():
    assert decide(9.0, 1, policy(), slots=4, now=0, low_since=None).delta == 0
    s = decide(11.0, 1, policy(), slots=4, now=0, low_since=None)
    assert s.delta == 1 and "more than 10/s for each of 1 copy" in s.reason
    assert decide(25.0, 2, policy(), slots=4, now=0, low_since=None).delta == 1
    assert decide(25.0, 3, policy(), slots=4, now=0, low_since=None).delta == 0
    assert decide(1000.0, 2, policy(max_copies=2), slots=4, now=0, low_since=None).delta == 0
    assert decide(1000.0, 2, policy(), slots=2, now=0, low_since=None).delta == 0
    assert decide(1000.0, 1, policy(rate=0), slots=4, now=0, low_since=None).delta == 0


def test_an_extra_copy_goes_after_the_cooldown_and_not_at_the_threshold():
    # 2 copies are for more than 10/s; they stay while the rate is above 80% of that
    assert decide(8.5, 2, policy(), 4, now=0, low_since=None) == decide(8.5, 2, policy(), 4, 0, None)
    assert decide(8.5, 2, policy(), 4, now=0, low_since=None).low_since is None
    s = decide(5.0, 2, policy(), 4, now=10, low_since=None)
    assert s.delta == 0 and s.low_since == 10 and "cooling down" in s.reason
    assert decide(5.0, 2, policy(), 4, now=14, low_since=10).delta == 0
    s = decide(5.0, 2, policy(), 4, now=15, low_since=10)
    assert s.delta == -1 and s.low_since == 15 and "1 copy is enough" in s.reason
    # the rate coming back resets the cool-down
    assert decide(30.0, 2, policy(), 4, now=16, low_since=10).low_since is None


def test_the_rate_meter_and_picking_by_requests_in_flight():
    meter = RateMeter(window=2.0)
    assert meter.sample(0.0, 0) == 0.0
    assert meter.sample(1.0, 50) == 50.0
    assert meter.sample(2.0, 100) == 50.0
    assert meter.sample(4.0, 100) == 0.0  # nothing in the last two seconds

    class C:
        def __init__(self, name: str, inflight: int, picked: int) -> None:
            self.name, self.inflight, self.picked = name, inflight, picked

    assert pick([C("a", 3, 1), C("b", 1, 9), C("c", 2, 0)]).name == "b"
    assert pick([C("a", 1, 5), C("b", 1, 2)]).name == "b"  # a tie: the one picked longest ago
