"""Peers first: a transfer that takes a blob's pieces from other nodes, the origin the rest.

A :class:`SwarmTransfer` is a :class:`~.transfer.Transfer` whose workers are told, piece
by piece, which read to use: a peer's or the origin's. It runs for an object whose
sha256 is known before the fetch (peers find blobs by content) when the fetcher has
peers (``peers.py``)::

    start: the record is written at once (peers see this node fetching the blob), and
           every candidate peer is asked what it has
    a watcher thread per candidate follows what it has (its watch stream, peer_http.py);
           whether this node may use the origin now is Peers.origin_turn (the
           cluster-wide single flight); the piece list is fetched once a peer holds the
           blob verified
    workers (the fetcher's slots) take, in this order:
        1. a missing piece some peer has: the rarest first, from the holder this node
           asks least (at most PER_PEER_INFLIGHT at once); the piece arrives whole and
           is checked against the piece list, if known, before it is written
        2. when it is this node's turn: a piece that no peer has, from the origin
        3. otherwise they wait for the watcher's next look
    a peer that fails is dropped for the rest of the transfer: slow (under the peers'
           low-speed limit), cut or unreachable, or a piece that fails its hash; its
           pieces go back to the pool and come from another peer or the origin
    the end: the blob's sha256, as for any transfer. If it fails while pieces from
           peers went unchecked (no list was known yet), the list is fetched, the bad
           pieces found, their peers blamed, the pieces fetched again, and the sha256
           checked again; otherwise the attempt fails, and the fetcher's next attempt
           asks the origin alone.

Pieces that land here are served to the other peers at once (``serve/adapters/blobs.py`` reads
the record, checkpointed every PEER_CHECKPOINT_S), so a model spreads as a swarm, not
as a star from the first node. Nothing here is visible before the blob's sha256 passed:
the partial lives under ``tmp/`` as for every fetch.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..errors import (
    AccessDeniedError,
    IntegrityError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
)
from .hashing import PrefixHasher
from .ledger import PeerLedger, PeerTally
from .peer_http import Availability, PeerBusy, PeerClient
from .peers import Peer, Peers, PeerState
from .pieces import PIECE_SIZE, PieceList, piece_ranges
from .reads import TooSlow
from .transfer import Read, Transfer

if TYPE_CHECKING:
    from ..store.blobs import BlobRef
    from .fetcher import Fetcher, FetchRequest
    from .observe import FetchObserver
    from .progress import Progress
    from .ranges import PartialFiles

# How long a worker waits for news before it looks again (a grace period may end), and
# how long a watcher waits before it watches a peer again.
POLL_S = 0.25
# How often a swarm makes its landed ranges visible to peers (and durable).
PEER_CHECKPOINT_S = 0.1
# Pieces asked of one peer at once by one transfer.
PER_PEER_INFLIGHT = 2
# A peer that sends as many ranges as it allows (503) is left alone this long; a piece it
# is sending to another peer right now is asked of it again after RANGE_BUSY_S.
BUSY_BACKOFF_S = 0.3
RANGE_BUSY_S = 0.2
# Pieces read from the origin at once while other nodes fetch the same blob.
ORIGIN_INFLIGHT_SWARM = 2
# A peer that did not answer is asked again after this long.
DEAD_RETRY_S = 2.0
# How often the candidates are asked for again while a transfer runs: nodes that start
# fetching the blob later join the swarm (a static list never changes; the index does).
SCOUT_S = 0.5
# Rounds of "find the bad pieces, fetch them again" after a failed sha256.
REPAIR_ROUNDS = 2


class SwarmTransfer(Transfer):
    """One attempt at one blob, peers first (see the module docstring)."""

    def __init__(
        self,
        fetcher: Fetcher,
        request: FetchRequest,
        files: PartialFiles,
        progress: Progress,
        observer: FetchObserver | None,
        *,
        peers: Peers,
        client: PeerClient,
        ledger: PeerLedger,
    ) -> None:
        super().__init__(fetcher, request, files, progress, observer)
        assert request.sha256 is not None
        self.sha = request.sha256
        self.peers = peers
        self.client = client
        self.ledger = ledger
        self.checkpoint_s = min(self.checkpoint_s, PEER_CHECKPOINT_S)
        self.pieces = piece_ranges(request.size, PIECE_SIZE)
        self.cond = threading.Condition(self.lock)
        self.avail: dict[str, Availability] = {}
        self.dropped: dict[str, str] = {}  # peer -> why it is no longer asked
        self.busy_until: dict[str | tuple[str, int], float] = {}  # a peer, or a peer's piece
        self.origin_inflight = 0
        self.inflight: set[int] = set()
        self.inflight_to: Counter[str] = Counter()
        self.unverified: dict[int, str] = {}  # piece -> peer, landed before the list was known
        self.piece_list: PieceList | None = None
        self.tally = PeerTally()
        self.known: dict[str, Peer] = {}  # candidates watched, by name
        self._t0 = time.monotonic()
        self._halt = threading.Event()
        self._turn_asked: str | None = None  # None, "asking", "done" (_first_turn)

    # -- the transfer's hooks -----------------------------------------------------------

    def run(self) -> BlobRef:
        ok = False
        try:
            ref = super().run()
            ok = True
            return ref
        finally:
            self._halt.set()
            self._tell_finished(ok)
            try:
                self.ledger.add(self.tally)
            except OSError:
                pass  # counts only

    def plan(self) -> None:
        self.checkpoint(force=True)  # the record: peers now see this node fetching the blob
        self.peers.started(self.sha, self.req.size)
        self._ask_all()

    def checkpoint(self, *, force: bool = False) -> None:
        super().checkpoint(force=force)
        with self.lock:
            ranges = self.landed.intervals()
        self.peers.landed(self.sha, self.req.size, ranges)

    def _tell_finished(self, ok: bool) -> None:
        """The index learns the end; the node that fetched from the origin publishes the
        blob's piece hashes (read back from the verified blob: one more read of it)."""
        pieces = None
        if ok and self.peers.claimed(self.sha):
            from .pieces import PieceLists

            pieces = PieceLists(self.f.store).get(self.sha, self.req.size)
        self.peers.finished(self.sha, self.req.size, ok=ok, pieces=pieces)

    def workers(self) -> int:
        return self.f.concurrency

    def _run_workers(self) -> None:
        self._halt = threading.Event()  # watchers of an earlier round stop with their own
        self.known = {}
        self._scout(self._halt)
        threading.Thread(target=self._scouting, args=(self._halt,), daemon=True,
                         name="cachemesh-peer-scout").start()
        try:
            super()._run_workers()
        finally:
            # Not joined: a watcher ends at its watch's next line (WATCH_HEARTBEAT_S at most).
            self._halt.set()

    def next_task(self) -> tuple[int, int, Read] | None:
        with self.cond:
            while not self.stop.is_set():
                missing = [i for i, (s, e) in enumerate(self.pieces)
                           if i not in self.inflight and not self.landed.covers(s, e)]
                if not missing and not self.inflight:
                    return None
                task = self._peer_task(missing) if missing else None
                if task is None and missing and self._origin_turn():
                    if self._first_turn():
                        continue  # the peers were asked again: choose with their answers
                    task = self._origin_task(missing)
                if task is not None:
                    return task
                self.cond.wait(POLL_S)
            return None

    def digests(self) -> dict[str, str]:
        digests = super().digests()
        for _ in range(REPAIR_ROUNDS):
            if digests["sha256"] == self.sha or not self._repair():
                break  # right, or nothing to blame on a peer: the origin's attempt is next
            self._run_workers()
            digests = super().digests()
        return digests

    # -- choosing -----------------------------------------------------------------------

    def _peer_task(self, missing: list[int]) -> tuple[int, int, Read] | None:
        """The rarest missing piece that a ready peer has, from its least asked holder.

        A piece that other peers have too is not asked of the node fetching the blob from
        the origin (the seed): every new piece must leave by its upload link, which the
        copies that others can give would otherwise fill (super-seeding, from the asking
        side; serve/adapters/sharing.py does its part)."""
        now = time.monotonic()
        live = [n for n in self.avail if n not in self.dropped and n in self.known]
        ready = {n for n in live if self.busy_until.get(n, 0.0) <= now
                 and self.inflight_to[n] < PER_PEER_INFLIGHT}
        seed = self._seed()
        best: tuple[tuple[int, float], int, list[str]] | None = None
        for i in missing:
            start, end = self.pieces[i]
            holders = [n for n in live if self.avail[n].covers(start, end)]
            if seed in holders and len(holders) > 1:
                holders.remove(seed)
            usable = [n for n in holders
                      if n in ready and self.busy_until.get((n, i), 0.0) <= now]
            if usable:
                rank = (len(holders), random.random())
                if best is None or rank < best[0]:
                    best = (rank, i, usable)
        if best is None:
            return None
        _, i, usable = best
        name = min(usable, key=lambda n: (self.inflight_to[n], random.random()))
        peer = self.known[name]
        return self._task(i, name, self._peer_read(peer, i))

    def _seed(self) -> str | None:
        """The other node that fetches the blob from the origin (Peers.seed), or None when
        that is this node or nobody is."""
        fetching = [n for n, a in self.avail.items() if a.state == "fetching"
                    and n not in self.dropped]
        return self.peers.seed(self.sha, fetching)

    def _origin_task(self, missing: list[int]) -> tuple[int, int, Read] | None:
        """The first missing piece that no peer still asked has (in order: a loader's).

        While other nodes fetch the blob too, at most ORIGIN_INFLIGHT_SWARM pieces come
        from the origin at once: pieces then land one after another, and spread while
        the next ones come, rather than all at the end of a wide parallel read."""
        others = any(a.state == "fetching" and n not in self.dropped
                     for n, a in self.avail.items())
        if others and self.origin_inflight >= ORIGIN_INFLIGHT_SWARM:
            return None
        for i in missing:
            start, end = self.pieces[i]
            if not any(a.covers(start, end) for n, a in self.avail.items()
                       if n not in self.dropped):
                return self._task(i, None, self.origin)
        return None

    def _task(self, i: int, peer: str | None, read: Read) -> tuple[int, int, Read]:
        self.inflight.add(i)
        if peer is not None:
            self.inflight_to[peer] += 1
        else:
            self.origin_inflight += 1

        def run(start: int, end: int, sink: Transfer, stop: threading.Event) -> None:
            try:
                read(start, end, sink, stop)
            finally:
                with self.cond:
                    self.inflight.discard(i)
                    if peer is not None:
                        self.inflight_to[peer] -= 1
                    else:
                        self.origin_inflight -= 1
                    self.cond.notify_all()

        start, end = self.pieces[i]
        return start, end, run

    # -- a peer's read ------------------------------------------------------------------

    def _peer_read(self, peer: Peer, i: int) -> Read:
        def read(start: int, end: int, sink: Transfer, stop: threading.Event) -> None:
            try:
                data = self.client.read(peer, self.sha, start, end, stop)
            except PeerBusy as exc:
                with self.cond:
                    if exc.what == "range":  # on its way to another peer: take it there
                        self.busy_until[(peer.name, i)] = time.monotonic() + RANGE_BUSY_S
                    else:
                        self.busy_until[peer.name] = time.monotonic() + BUSY_BACKOFF_S
                return
            except SourceNotFoundError:
                # Not (or no longer) there, or a look taken as it committed: ask what it
                # has now, and not this piece from it again for a moment.
                with self.cond:
                    self.busy_until[(peer.name, i)] = time.monotonic() + RANGE_BUSY_S
                self._learn(peer, self.client.probe(peer, self.sha))
                return
            except TooSlow:
                self._drop(peer.name, "slow")
                return
            except (TransientSourceError, AccessDeniedError, SourceError, IntegrityError):
                if not stop.is_set():
                    self._drop(peer.name, "unreachable")
                return
            with self.cond:
                pieces = self.piece_list
            if pieces is not None and not pieces.matches(i, data):
                self._drop(peer.name, "bad-piece")
                return
            sink.write(start, data)
            with self.cond:
                self.tally.fetched[peer.name] += len(data)
                if pieces is None:
                    self.unverified[i] = peer.name  # checked if the blob's sha256 fails

        return read

    def _drop(self, name: str, why: str) -> None:
        with self.cond:
            if name not in self.dropped:
                self.dropped[name] = why
            self.tally.faults[(name, why)] += 1
            self.cond.notify_all()

    # -- bad bytes found after they landed ---------------------------------------------

    def _repair(self) -> bool:
        """After a failed sha256: take out the pieces from peers that went unchecked and
        fail the piece list (asked for now if need be); whether there were any."""
        if self.piece_list is None:
            self._refresh()  # a peer may hold the blob verified by now (and give the list)
        if self.piece_list is None:
            # One already known verified is not asked again by _refresh: its watcher learnt
            # it, and that watcher's own ask for the list may not have come back yet.
            self._fetch_piece_list()
        with self.cond:
            pieces, suspects = self.piece_list, dict(self.unverified)
            self.unverified.clear()
        if pieces is None:
            return False
        bad = {i: peer for i, peer in suspects.items() if not self._on_disk_matches(pieces, i)}
        if bad:
            self._reject(bad, "bad-blob")
        return bool(bad)

    def _on_disk_matches(self, pieces: PieceList, i: int) -> bool:
        start, end = self.pieces[i]
        data = os.pread(self.fd, end - start, start)
        return pieces.matches(i, data)

    def _reject(self, bad: dict[int, str], kind: str) -> None:
        """Take bad pieces out of what landed (they are fetched again) and blame their peers."""
        with self.cond:
            for i, peer in bad.items():
                self.landed.remove(*self.pieces[i])
                self.unverified.pop(i, None)
                if peer not in self.dropped:
                    self.dropped[peer] = kind
                self.tally.faults[(peer, kind)] += 1
            # The digests followed bytes that are gone: start them over from the file.
            old, self.hasher = self.hasher, PrefixHasher(
                self.fd, self.req.size, mode=self.f.hash_mode,
                also=[k for k in self.req.published if k != "sha256"])
            self.hasher.prefix(self.landed.prefix_end())
            total = self.landed.total()
            self.cond.notify_all()
        if old is not None:
            old.close()
        self.progress.set(total)
        self.emit_started()  # a streaming reader must forget what it read

    def _fetch_piece_list(self) -> None:
        """The list from a peer that holds the blob verified, if one does. Pieces that come
        after it are checked as they land; those that came before are checked only if the
        blob's sha256 fails (reading them back costs a hash of most of the blob)."""
        published = self.peers.piece_list(self.sha, self.req.size)
        if published is not None and published.piece_size == PIECE_SIZE:
            with self.cond:
                if self.piece_list is None:
                    self.piece_list = published
            return
        with self.cond:
            holders = [n for n, a in self.avail.items()
                       if a.state == "verified" and n not in self.dropped]
        for peer in self.peers.candidates(self.sha):
            if peer.name in holders:
                found = self.client.pieces(peer, self.sha, self.req.size)
                if found is not None and found.piece_size == PIECE_SIZE:
                    with self.cond:
                        if self.piece_list is None:
                            self.piece_list = found
                    return

    # -- watching the peers ---------------------------------------------------------------

    def _origin_turn(self) -> bool:
        """Whether this node may ask the origin now (Peers.origin_turn); a dropped peer
        counts as dead: what it alone has must come from the origin after all."""
        seen: dict[str, PeerState] = {
            n: ("dead" if n in self.dropped else a.state) for n, a in self.avail.items()}
        return self.peers.origin_turn(self.sha, seen, time.monotonic() - self._t0)

    def _first_turn(self) -> bool:
        """The first time this transfer may use the origin, while it knows peers: ask them
        all again first (True while that is under way or just done: look again). The turn
        comes when the seed lets its claim go, once it holds the blob whole; what this node
        last heard from it may be a moment old. Called with the lock held; released while
        the peers answer (the other workers wait)."""
        if self._turn_asked == "done" or not self.known:
            return False
        if self._turn_asked == "asking":
            self.cond.wait(POLL_S)
            return True
        self._turn_asked = "asking"
        peers = [p for n, p in self.known.items() if n not in self.dropped]
        self.cond.release()
        try:
            self._probe(peers)
        finally:
            self.cond.acquire()
            self._turn_asked = "done"
            self.cond.notify_all()
        return True

    def _scouting(self, halt: threading.Event) -> None:
        while not halt.wait(SCOUT_S):
            self._scout(halt)

    def _scout(self, halt: threading.Event) -> None:
        """Start a watcher for every candidate not watched yet."""
        for peer in self.peers.candidates(self.sha):
            with self.cond:
                if peer.name in self.known or halt.is_set():
                    continue
                self.known[peer.name] = peer
            threading.Thread(target=self._watch, args=(peer, halt), daemon=True,
                             name=f"cachemesh-peer-{peer.name}").start()

    def _ask_all(self) -> None:
        """Every candidate at once, answers now (no long poll): the start of the transfer."""
        self._probe(list(self.peers.candidates(self.sha)))

    def _probe(self, peers: list[Peer]) -> None:
        """Ask ``peers`` what they have, in parallel, and learn their answers."""
        if not peers:
            return
        with ThreadPoolExecutor(min(8, len(peers)), thread_name_prefix="cachemesh-probe") as pool:
            answers = list(pool.map(lambda p: self.client.probe(p, self.sha), peers))
        for peer, answer in zip(peers, answers, strict=True):
            self._learn(peer, answer)

    def _watch(self, peer: Peer, halt: threading.Event) -> None:
        """Follow one peer while the transfer runs, through its watch stream (peer_http):
        a piece that lands there is seen here within one of the peer's checkpoints."""
        while not halt.is_set():
            with self.cond:
                known = self.avail.get(peer.name)
                if peer.name in self.dropped or (known is not None
                                                 and known.state == "verified"):
                    return  # dropped, or it has all of it
            try:
                for answer in self.client.watch(peer, self.sha):
                    if halt.is_set():
                        return
                    self._learn(peer, answer)
                    if answer.state == "verified":
                        return
            except TransientSourceError:
                self._learn(peer, Availability("dead"))
                halt.wait(DEAD_RETRY_S)
                continue
            halt.wait(POLL_S)  # the peer ended its watch: watch again

    def _learn(self, peer: Peer, answer: Availability) -> None:
        if answer.size is not None and answer.size != self.req.size:
            answer = Availability("absent")  # another object under this sha256?
        with self.cond:
            self.avail[peer.name] = answer
            want_list = (self.piece_list is None and answer.state == "verified"
                         and peer.name not in self.dropped)
            self.cond.notify_all()
        if want_list:
            self._fetch_piece_list()

    def _refresh(self) -> None:
        """Ask the candidates not known to hold the blob verified again, now."""
        with self.cond:
            holders = {n for n, a in self.avail.items() if a.state == "verified"}
        for peer in self.peers.candidates(self.sha):
            if peer.name not in holders and peer.name not in self.dropped:
                self._learn(peer, self.client.probe(peer, self.sha))

