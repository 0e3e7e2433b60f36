"""The fetcher alone, against an in-memory object: ranges, resume, retries,
verification, single-flight, progress and the observer hook."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading

import pytest

from cachemesh.errors import IntegrityError, SourceError, TransientSourceError
from cachemesh.fetch import Fetcher, Flight, identity_key
from cachemesh.fetch.ranges import PartialFiles
from tests.fetch.conftest import CHUNK, KIB, FakeObject


def blob_bytes(store, ref) -> bytes:
    return store.blobs.path(ref.sha256).read_bytes()


def partial_files(store, identity: str) -> PartialFiles:
    return PartialFiles(store.blobs.tmp_dir / "fetch", identity_key(identity))


@pytest.mark.parametrize("hash_mode", ["stream", "end"])
@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 5 * CHUNK + 123])
def test_parallel_ranges_give_the_exact_verified_blob(store, fetch_settings, hash_mode, size):
    obj = FakeObject(os.urandom(size))
    counted = []
    fetcher = Fetcher(store, fetch_settings, hash_mode=hash_mode)
    ref = fetcher.fetch(obj.request(sha256=obj.sha256), counted.append)
    assert (ref.sha256, ref.size) == (obj.sha256, size)
    assert blob_bytes(store, ref) == obj.data
    assert obj.served == size  # every byte read once
    assert sum(counted) == size
    assert sorted(obj.reads) == [(s, min(s + CHUNK, size)) for s in range(0, size, CHUNK)]
    assert store.blobs.path(ref.sha256).stat().st_mode & 0o222 == 0


def test_ranges_run_in_parallel_up_to_range_concurrency(store, fetch_settings):
    obj = FakeObject(os.urandom(12 * CHUNK))
    obj.gate = threading.Event()
    active, peak = [0], [0]
    lock = threading.Lock()
    real = obj.read

    def read(start, end):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            yield from real(start, end)
        finally:
            with lock:
                active[0] -= 1

    threading.Timer(0.3, obj.gate.set).start()
    Fetcher(store, fetch_settings).fetch(obj.request(read=read))
    assert peak[0] == fetch_settings.range_concurrency


@pytest.mark.parametrize("kind", ["md5", "git_sha1"])
def test_md5_and_git_blob_ids_are_verified_too(store, fetch_settings, kind):
    obj = FakeObject(os.urandom(3 * CHUNK))
    if kind == "md5":
        digest = hashlib.md5(obj.data).hexdigest()
    else:  # what `git hash-object` prints
        digest = hashlib.sha1(b"blob %d\0" % len(obj.data) + obj.data).hexdigest()
    request = obj.request(**{kind: digest.upper()})
    assert request.verification == kind.replace("_", "-")
    ref = Fetcher(store, fetch_settings).fetch(request)
    assert ref.sha256 == obj.sha256
    with pytest.raises(IntegrityError, match={"md5": "MD5", "git_sha1": "git blob id"}[kind]):
        Fetcher(store, fetch_settings).fetch(
            FakeObject(obj.data).request(**{kind: "0" * len(digest)}))


def test_a_cut_connection_resumes_at_the_byte_it_stopped(store, fetch_settings):
    obj = FakeObject(os.urandom(4 * CHUNK))
    obj.cuts = [CHUNK + 1000, 3 * CHUNK + 5]
    counted = []
    ref = Fetcher(store, fetch_settings).fetch(obj.request(sha256=obj.sha256), counted.append)
    assert blob_bytes(store, ref) == obj.data
    assert obj.served == len(obj.data)  # nothing fetched twice
    assert sum(counted) == len(obj.data)
    assert (CHUNK + 1000, 2 * CHUNK) in obj.reads  # the retry asked only for the rest


def test_transient_errors_are_retried_then_give_up_keeping_the_partial(store, fetch_settings):
    obj = FakeObject(os.urandom(2 * CHUNK))
    obj.transient = fetch_settings.fetch_retries  # one fewer than would fail
    ref = Fetcher(store, fetch_settings).fetch(obj.request())
    assert blob_bytes(store, ref) == obj.data

    # A piece that keeps failing fails the fetch, but what landed stays for a resume.
    obj = FakeObject(os.urandom(6 * CHUNK))
    request = obj.request()
    broken = obj.read

    def read(start, end):
        if start >= 4 * CHUNK:
            raise TransientSourceError("fake origin: 503 forever")
        return broken(start, end)

    with pytest.raises(TransientSourceError, match="gave up after 4 attempts"):
        Fetcher(store, fetch_settings).fetch(dataclasses.replace(request, read=read))
    state = partial_files(store, request.identity).read_state()
    assert state is not None and state.landed.covers(0, 4 * CHUNK)
    assert not state.landed.covers(4 * CHUNK, 6 * CHUNK)
    served_before = obj.served

    counted = []
    ref = Fetcher(store, fetch_settings).fetch(request, counted.append)
    assert blob_bytes(store, ref) == obj.data
    assert obj.served - served_before == 2 * CHUNK  # only the missing ranges
    assert sum(counted) == len(obj.data)  # landed bytes counted once, at the start
    assert not partial_files(store, request.identity).part.exists()


def test_permanent_errors_fail_at_once(store, fetch_settings):
    obj = FakeObject(os.urandom(CHUNK))

    def read(start, end):
        raise SourceError("fake origin: gone")
        yield b""  # pragma: no cover

    with pytest.raises(SourceError, match="gone"):
        Fetcher(store, fetch_settings).fetch(obj.request(read=read))


def test_an_origin_sending_too_much_is_refused(store, fetch_settings):
    obj = FakeObject(os.urandom(CHUNK))

    def read(start, end):
        yield obj.data[start:end] + b"extra"

    with pytest.raises(SourceError, match="more than"):
        Fetcher(store, fetch_settings).fetch(obj.request(read=read))


def test_corrupted_bytes_are_fetched_again_and_never_visible(store, fetch_settings):
    obj = FakeObject(os.urandom(3 * CHUNK))
    obj.corrupt = 1
    counted = []
    ref = Fetcher(store, fetch_settings).fetch(obj.request(sha256=obj.sha256), counted.append)
    assert blob_bytes(store, ref) == obj.data
    assert obj.served == 2 * len(obj.data)  # the whole object again: the bad range is unknown
    assert sum(counted) == len(obj.data)  # progress does not count the second pass

    liar = FakeObject(os.urandom(2 * CHUNK))
    with pytest.raises(IntegrityError, match="fetched 2 times"):
        Fetcher(store, fetch_settings).fetch(liar.request(sha256="0" * 64))
    assert store.blobs.files_on_disk() == {obj.sha256: len(obj.data)}
    assert not list((store.blobs.tmp_dir / "fetch").glob("*.part"))


def test_a_stream_without_ranges_restarts_from_zero_and_counts_once(store, fetch_settings):
    obj = FakeObject(os.urandom(3 * CHUNK))
    obj.cuts = [CHUNK + 7]
    counted = []
    ref = Fetcher(store, fetch_settings).fetch(
        obj.request(ranged=False, sha256=obj.sha256), counted.append)
    assert blob_bytes(store, ref) == obj.data
    assert obj.reads == [(0, 3 * CHUNK), (0, 3 * CHUNK)]
    assert sum(counted) == len(obj.data)


def test_single_flight_between_threads_reads_once(store, fetch_settings):
    obj = FakeObject(os.urandom(8 * CHUNK))
    obj.delay_s = 0.002
    results, counts = [], []

    def run():
        n = []
        results.append(Fetcher(store, fetch_settings).fetch(obj.request("shared-id"), n.append))
        counts.append(sum(n))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.sha256 for r in results}) == 1 and results[0].sha256 == obj.sha256
    assert obj.served == len(obj.data)
    assert counts == [len(obj.data)] * 3  # waiters' progress reaches the size too


def test_a_verified_identity_is_not_fetched_again_unless_unversioned(store, fetch_settings):
    obj = FakeObject(os.urandom(2 * CHUNK))
    fetcher = Fetcher(store, fetch_settings)
    fetcher.fetch(obj.request("v1"))
    ref = fetcher.fetch(obj.request("v1"))
    assert ref.sha256 == obj.sha256 and obj.served == len(obj.data)
    # Without a version in the identity, only a waiter may reuse the result.
    other = FakeObject(obj.data)
    fetcher.fetch(other.request("no-version", versioned=False))
    fetcher.fetch(other.request("no-version", versioned=False))
    assert other.served == 2 * len(obj.data)
    # A blob collected since is fetched again.
    store.blobs.unlink(obj.sha256)
    fetcher.fetch(obj.request("v1"))
    assert obj.served == 2 * len(obj.data)


def test_a_partial_with_a_mismatched_record_starts_afresh(store, fetch_settings):
    obj = FakeObject(os.urandom(2 * CHUNK))
    files = partial_files(store, "stale")
    files.dir.mkdir(parents=True)
    files.part.write_bytes(b"junk")  # wrong size, no record
    ref = Fetcher(store, fetch_settings).fetch(obj.request("stale", sha256=obj.sha256))
    assert blob_bytes(store, ref) == obj.data


def test_checkpoints_name_only_bytes_that_are_on_disk(store, fetch_settings):
    obj = FakeObject(os.urandom(16 * CHUNK), piece=4 * KIB)
    obj.delay_s = 0.002
    request = obj.request()
    files = partial_files(store, request.identity)
    seen, wrong = [], []

    def check():
        state = files.read_state()
        if state is not None and state.sha256 is None:
            try:
                on_disk = files.part.read_bytes()
            except FileNotFoundError:
                return  # committed meanwhile
            for s, e in state.landed.intervals():
                if on_disk[s:e] != obj.data[s:e]:
                    wrong.append((s, e))
            seen.append(state.landed.total())

    fetcher = Fetcher(store, fetch_settings, checkpoint_s=0.05)
    done = threading.Event()

    def poll():
        while not done.is_set():
            check()
            done.wait(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        fetcher.fetch(request)
    finally:
        done.set()
        poller.join()
    assert any(0 < n < len(obj.data) for n in seen), seen
    assert wrong == []


def test_a_flight_sees_ranges_land_and_reads_them_from_the_partial(store, fetch_settings):
    obj = FakeObject(os.urandom(8 * CHUNK))
    obj.delay_s = 0.003
    fetcher = Fetcher(store, fetch_settings)
    request = obj.request(sha256=obj.sha256)
    got = {}

    # The loader's own fetcher (same store) sees the pull's fetch: the registry
    # is per process, keyed by the partial file.
    with Fetcher(store, fetch_settings).watch(request.identity) as flight:
        worker = threading.Thread(target=lambda: got.setdefault("ref", fetcher.fetch(request)))
        worker.start()
        # The last chunk, while the fetch runs: read from the partial file.
        path = flight.wait(7 * CHUNK, 8 * CHUNK, timeout=10)
        with open(path, "rb") as f:
            f.seek(7 * CHUNK)
            assert f.read(CHUNK) == obj.data[7 * CHUNK:]
        worker.join()
        assert flight.wait(0, len(obj.data), timeout=1) == store.blobs.path(obj.sha256)
        assert flight.landed_ranges() == [(0, len(obj.data))]
        assert flight.generation == 1 and flight.done
    assert obj.served == len(obj.data)  # one read of the origin served both


def test_an_observer_passed_to_fetch_hears_every_byte(store, fetch_settings):
    obj = FakeObject(os.urandom(5 * CHUNK + 3))
    obj.cuts = [2 * CHUNK + 11]
    flight = Flight()
    Fetcher(store, fetch_settings).fetch(obj.request(), observer=flight)
    assert flight.landed_ranges() == [(0, len(obj.data))]
    assert flight.blob == store.blobs.path(obj.sha256)

    failing = Flight()

    def read(start, end):
        raise SourceError("fake origin: gone")
        yield b""  # pragma: no cover

    with pytest.raises(SourceError):
        Fetcher(store, fetch_settings).fetch(obj.request(read=read), observer=failing)
    with pytest.raises(SourceError, match="gone"):
        failing.wait(0, 1, timeout=1)


def test_a_flight_times_out_when_nothing_is_fetched(store, fetch_settings):
    with (Fetcher(store, fetch_settings).watch("nobody-fetches-this") as flight,
          pytest.raises(TimeoutError)):
        flight.wait(0, 1, timeout=0.05)


def test_watched_objects_get_the_connections_first_in_the_order_they_were_watched(
        store, fetch_settings):
    """One connection, three objects fetched at once: the two that a loader watches get
    it first, in the order it watched them; the unwatched one, which had it, waits."""
    fetcher = Fetcher(store, dataclasses.replace(fetch_settings, range_concurrency=1))
    objs = {name: FakeObject(os.urandom(8 * CHUNK)) for name in ("plain", "second", "first")}
    gate = threading.Event()
    log: list[str] = []  # which object each ranged read was for, in order

    def read_of(name: str):
        def read(start: int, end: int):
            log.append(name)
            return objs[name].read(start, end)
        return read

    for obj in objs.values():
        obj.gate = gate
    requests = {name: obj.request(f"rank-{name}", read=read_of(name))
                for name, obj in objs.items()}
    with fetcher.watch(requests["first"].identity), fetcher.watch(requests["second"].identity):
        threads = [threading.Thread(target=fetcher.fetch, args=(requests["plain"],))]
        threads[0].start()
        while not log:  # it holds the connection, held at the gate
            threading.Event().wait(0.01)
        threads += [threading.Thread(target=fetcher.fetch, args=(requests[n],))
                    for n in ("second", "first")]
        for t in threads[1:]:
            t.start()
        threading.Event().wait(0.3)  # both queue for the connection
        gate.set()
        for t in threads:
            t.join(30)
    assert log == ["plain"] + ["first"] * 8 + ["second"] * 8 + ["plain"] * 7
