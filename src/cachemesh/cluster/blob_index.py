"""The blob index in etcd: who holds (or fetches) which sha256, who fetches it from its
origin, what an origin's file is, and a blob's piece hashes.

The keys (``keys.py`` draws the whole key space; ``P`` is the cluster prefix)::

    P/blobs/{sha256}/{node}     HolderRecord   written by that node only, plain put; bound to
                                               the node's lease (its server's membership), so
                                               that a node that leaves or dies takes its
                                               entries with it. "fetching" at a pull's start,
                                               its landed ranges at most every
                                               HOLDER_INTERVAL_S, "held" at its end.
    P/fetching/{sha256}         FetchClaim     create-if-absent (put_if rev 0) by the node that
                                               fetches the blob from its origin: the cluster-wide
                                               single flight. Bound to the lease of the process
                                               that fetches, so a pull that dies frees it within
                                               a lease TTL and another node takes it; deleted
                                               (at the revision it was written) when done.
    P/origins/{sha256(identity)} OriginRecord  create-if-absent, once, by a node that fetched the
                                               bytes from the origin and checked them against
                                               what the origin publishes; ``checked`` names
                                               what (["sha256"], ["md5"], ...; ["size"] when
                                               the origin published only a size). No lease.
    P/pieces/{sha256}           PieceRecord    create-if-absent, once, by the node that verified
                                               the blob (its sha256) after fetching it. No lease.

Why trust a mapping written by another node: nodes hold the cluster token, so they are
trusted parties, and the bytes are checked anyway: a blob found through a mapping is
verified against the mapping's sha256 and against every digest the origin publishes.
The origin identity is hashed before it becomes a key: it may name a private endpoint.

This module speaks only to :class:`~.kv.KV` (async); ``fetch/etcd_peers.py`` puts it
behind the fetcher's synchronous :class:`~cachemesh.fetch.peers.Peers`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from typing import Literal

from pydantic import Field, ValidationError

from ..errors import RevisionConflictError
from .keys import Keys
from .kv import KV
from .records import _Record, parse_each

log = logging.getLogger(__name__)

# Least seconds between two writes of a node's landed bytes for one blob in flight.
HOLDER_INTERVAL_S = 2.0


class HolderRecord(_Record):
    """``blobs/{sha256}/{node}``: a node holds the blob, or fetches it."""

    node: str
    url: str = Field(description="the node's advertise URL: where peers ask for the blob")
    state: Literal["fetching", "held"]
    size: int = Field(ge=0)
    landed: int = Field(default=0, ge=0, description="bytes landed (fetching)")
    ranges: list[tuple[int, int]] = Field(
        default_factory=list, description="[start, end) landed, the first few (fetching)")
    updated_at: float = 0.0

    @classmethod
    def from_bytes(cls, data: bytes) -> HolderRecord:
        return cls.model_validate_json(data)


class FetchClaim(_Record):
    """``fetching/{sha256}``: the one node that fetches the blob from its origin."""

    node: str
    since: float = 0.0

    @classmethod
    def from_bytes(cls, data: bytes) -> FetchClaim:
        return cls.model_validate_json(data)


class OriginRecord(_Record):
    """``origins/{sha256 of identity}``: what an origin's file is, and how that was learnt."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    checked: tuple[str, ...] = Field(
        description="what the origin published and the bytes matched; ('size',): only a size")
    node: str
    at: float = 0.0

    @property
    def size_only(self) -> bool:
        return set(self.checked) <= {"size"}

    @classmethod
    def from_bytes(cls, data: bytes) -> OriginRecord:
        return cls.model_validate_json(data)


class PieceRecord(_Record):
    """``pieces/{sha256}``: the blob's piece hashes (fetch/pieces.py's list)."""

    size: int = Field(ge=0)
    piece_size: int = Field(gt=0)
    digests: tuple[str, ...]
    node: str

    @classmethod
    def from_bytes(cls, data: bytes) -> PieceRecord:
        return cls.model_validate_json(data)


def identity_digest(identity: str) -> str:
    """The key component of an origin identity (never the identity itself)."""
    if not identity:
        raise ValueError("an empty origin identity")
    return hashlib.sha256(identity.encode()).hexdigest()


class BlobIndex:
    """Reads and writes the blob index of one cluster prefix (see the module docstring)."""

    def __init__(self, kv: KV, keys: Keys) -> None:
        self.kv = kv
        self.keys = keys

    # -- holders ----------------------------------------------------------------------

    async def holders(self, sha256: str) -> list[HolderRecord]:
        """Every node that holds or fetches the blob, by name (malformed entries skipped)."""
        snapshot = await self.kv.get_prefix(self.keys.blob_holders(sha256))
        return parse_each(snapshot.kvs, HolderRecord, "holder record")

    async def announce(self, sha256: str, record: HolderRecord, lease: int) -> int:
        """Write this node's entry (it alone writes it); ``lease``: its node's lease."""
        if not lease:
            raise ValueError("a holder entry must hang on its node's lease")
        record = record.model_copy(update={"updated_at": time.time()})
        return await self.kv.put(self.keys.blob_holder(sha256, record.node), record.to_bytes(),
                                 lease=lease)

    async def announce_all(self, node: str, url: str, lease: int,
                           blobs: Iterable[tuple[str, int]]) -> int:
        """Announce every blob a node holds (at its join and after a new lease); the count."""
        n = 0
        for sha256, size in blobs:
            await self.announce(sha256, HolderRecord(node=node, url=url, state="held",
                                                     size=size), lease)
            n += 1
        return n

    async def withdraw(self, sha256: str, node: str) -> bool:
        """Remove this node's entry (the blob was collected, or its fetch failed)."""
        return await self.kv.delete(self.keys.blob_holder(sha256, node))

    async def holder_counts(self, sha256s: Iterable[str]) -> dict[str, set[str]]:
        """For each blob, the nodes that hold it verified ("held")."""
        out: dict[str, set[str]] = {}
        for sha in sha256s:
            out[sha] = {h.node for h in await self.holders(sha) if h.state == "held"}
        return out

    # -- single flight ------------------------------------------------------------------

    async def claim(self, sha256: str, node: str, lease: int) -> str | None:
        """Try to become the one node fetching the blob from its origin.

        Returns the name of the node that holds the claim now (``node`` if this call or
        an earlier one on the same ``lease`` won it), or None if the claim vanished between
        the conflict and the read (try again).

        A claim of this node's name on another lease was left by an earlier pull of this
        node (its process ended without giving it back, and its lease has not run out
        yet): one node fetches a blob once at a time (the store's fetch lock), so it is
        taken over, compare-and-delete at the revision read, rather than trusted: trusting
        it would make two fetchers once the old lease ran out and another node claimed."""
        if not lease:
            raise ValueError("a fetch claim must hang on a lease")
        key = self.keys.fetching(sha256)
        for _ in range(3):
            try:
                await self.kv.put_if(key, FetchClaim(node=node, since=time.time()).to_bytes(),
                                     mod_revision=0, lease=lease)
                return node
            except RevisionConflictError:
                pass
            found = await self.kv.get(key)
            if found is None:
                return None
            try:
                holder = FetchClaim.from_bytes(found.value).node
            except ValidationError:
                log.warning("a malformed fetch claim at %s: taken as someone else's", key)
                return ""
            if holder != node or found.lease == lease:
                return holder
            try:  # our node's, on an earlier lease: stale
                await self.kv.delete(key, mod_revision=found.mod_revision)
            except RevisionConflictError:
                pass
        return None

    async def claimant(self, sha256: str) -> str | None:
        found = await self.kv.get(self.keys.fetching(sha256))
        if found is None:
            return None
        try:
            return FetchClaim.from_bytes(found.value).node
        except ValidationError:
            return ""

    async def release(self, sha256: str, node: str, lease: int | None = None) -> bool:
        """Give the claim back if this node (on ``lease``, when given) holds it (compare
        on the revision read)."""
        key = self.keys.fetching(sha256)
        found = await self.kv.get(key)
        if found is None:
            return False
        if lease is not None and found.lease != lease:
            return False
        try:
            if FetchClaim.from_bytes(found.value).node != node:
                return False
        except ValidationError:
            return False
        try:
            return await self.kv.delete(key, mod_revision=found.mod_revision)
        except RevisionConflictError:
            return False

    # -- origins and pieces ---------------------------------------------------------------

    async def origin(self, identity: str) -> OriginRecord | None:
        found = await self.kv.get(self.keys.origin(identity_digest(identity)))
        if found is None:
            return None
        try:
            return OriginRecord.from_bytes(found.value)
        except ValidationError:
            log.warning("ignoring a malformed origin record for %s", found.key)
            return None

    async def record_origin(self, identity: str, record: OriginRecord) -> bool:
        """Create the mapping if absent; True if this call wrote it. A mapping already there
        that names other bytes is kept (first writer wins) and logged: the origin changed
        its file under one identity, or a node misbehaves."""
        if not record.checked:
            raise ValueError("an origin record must say what was checked")
        key = self.keys.origin(identity_digest(identity))
        try:
            await self.kv.put_if(key, record.to_bytes(), mod_revision=0)
            return True
        except RevisionConflictError:
            found = await self.origin(identity)
            if found is not None and (found.sha256, found.size) != (record.sha256, record.size):
                log.warning("origin mapping %s names %s (%d bytes); %s fetched %s (%d bytes)",
                            key, found.sha256, found.size, record.node, record.sha256,
                            record.size)
            return False

    async def pieces(self, sha256: str) -> PieceRecord | None:
        found = await self.kv.get(self.keys.pieces(sha256))
        if found is None:
            return None
        try:
            return PieceRecord.from_bytes(found.value)
        except ValidationError:
            log.warning("ignoring a malformed piece record for %s", sha256)
            return None

    async def record_pieces(self, sha256: str, record: PieceRecord) -> bool:
        """Create the piece list if absent (once per blob); True if this call wrote it."""
        try:
            await self.kv.put_if(self.keys.pieces(sha256), record.to_bytes(), mod_revision=0)
            return True
        except RevisionConflictError:
            return False
