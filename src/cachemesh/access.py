"""Who is asking, and what they may do: tokens, scopes and protected buckets.

Protocol-free. A transport (the HTTP middleware in ``serve/adapters/auth.py``; the
gRPC adapter, ``serve/adapters/v2_grpc.py``, for each call) hands the credentials of a request to
:meth:`Keyring.authenticate`, which checks them against the server's tokens for
the kind of operation asked (:data:`CONTROL`, :data:`INFERENCE`,
:data:`METRICS`, or :data:`OPEN`) and returns a :class:`Principal`. The
transport then runs the request under it (:func:`acting_as`), and the core asks
:func:`current` whenever a protected bucket is involved (:func:`can_use`): a
model service or a cache API does not see headers.

Tokens and what they grant::

    CACHEMESH_API_TOKEN        control: the control API, the repository extension,
                               and also inference and /metrics
    CACHEMESH_INFERENCE_TOKEN  inference only
    CACHEMESH_METRICS_TOKEN    /metrics only (a scraper's read-only token)
    a bucket's token           the models and caches of that bucket
                               (``cachemesh bucket protect``; store/buckets.py)

An operation class needs a token only when one is configured for it: inference
needs the inference (or control) token once ``CACHEMESH_INFERENCE_TOKEN`` is
set; /metrics needs the metrics (or control) token once either is set; control
needs the control token once ``CACHEMESH_API_TOKEN`` is set. A protected
bucket needs its own token in addition, whatever else the caller holds: the
control token alone does not show another team's bucket. Comparisons are
constant-time (digests compared with :func:`hmac.compare_digest`).

Requests outside any transport (the CLI on the node, background work such as
eager loads) run as :data:`ANONYMOUS`, which opens no protected bucket, or
explicitly as :data:`INTERNAL`. The CLI never asks: it is the store's owner and
reads the store directly.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ForbiddenError, InvalidInputError, UnauthorizedError

if TYPE_CHECKING:
    from .config import Settings
    from .store.buckets import Buckets

OPEN, INFERENCE, METRICS, CONTROL = "open", "inference", "metrics", "control"
# A request's first tokens only (Authorization plus bucket tokens) are looked at;
# more are ignored rather than hashed one by one against every protected bucket.
MAX_TOKENS = 8
MAX_TOKEN_BYTES = 4096


@dataclass(frozen=True)
class Principal:
    """The caller of one request: the scopes its tokens grant, and the tokens it
    presented (kept to open protected buckets; never printed)."""

    scopes: frozenset[str] = frozenset()
    tokens: tuple[str, ...] = field(default=(), repr=False, compare=False)
    internal: bool = False  # cachemesh itself: opens every bucket

    def __repr__(self) -> str:
        kind = "internal" if self.internal else ",".join(sorted(self.scopes)) or "anonymous"
        return f"Principal({kind}, {len(self.tokens)} token(s))"


ANONYMOUS = Principal()
INTERNAL = Principal(scopes=frozenset({CONTROL, INFERENCE, METRICS}), internal=True)

_current: ContextVar[Principal] = ContextVar("cachemesh_principal", default=ANONYMOUS)


def current() -> Principal:
    """The principal of the request being served (ANONYMOUS outside any)."""
    return _current.get()


@contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Run the block (and the tasks it starts) as ``principal``."""
    token = _current.set(principal)
    try:
        yield principal
    finally:
        _current.reset(token)


def can_use(buckets: Buckets, bucket: str, principal: Principal | None = None) -> bool:
    """Whether the principal (the current one by default) may see and use ``bucket``."""
    who = principal if principal is not None else _current.get()
    if who.internal or not buckets.is_protected(bucket):
        return True
    return buckets.opens(bucket, who.tokens)


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Keyring:
    """The server-wide tokens, kept as digests, and what each grants."""

    def __init__(self, control: str | None = None, inference: str | None = None,
                 metrics: str | None = None) -> None:
        for token in (control, inference, metrics):
            if token is not None and not 16 <= len(token) <= MAX_TOKEN_BYTES:
                raise InvalidInputError(
                    f"a server token must be 16 to {MAX_TOKEN_BYTES} characters long")
        grants = [(control, frozenset({CONTROL, INFERENCE, METRICS})),
                  (inference, frozenset({INFERENCE})), (metrics, frozenset({METRICS}))]
        self._grants = [(_hash(t), g) for t, g in grants if t]
        self._required = {
            OPEN: None,
            CONTROL: CONTROL if control else None,
            INFERENCE: INFERENCE if inference else None,
            METRICS: METRICS if (metrics or control) else None,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        return cls(settings.api_token, settings.inference_token, settings.metrics_token)

    @property
    def enabled(self) -> bool:
        return bool(self._grants)

    def requires(self, access: str) -> str | None:
        """The scope that ``access`` needs now, or None when it is open."""
        try:
            return self._required[access]
        except KeyError:
            raise ValueError(f"unknown access class {access!r}") from None

    def scopes_of(self, token: str) -> frozenset[str]:
        digest = _hash(token)
        scopes: frozenset[str] = frozenset()
        for known, grants in self._grants:
            # Every configured token is compared, match or not: no early exit.
            if hmac.compare_digest(digest, known):
                scopes = scopes | grants
        return scopes

    def authenticate(self, access: str, bearer: Sequence[str] = (),
                     others: Sequence[str] = ()) -> Principal:
        """The principal for a request of class ``access`` that presented ``bearer``
        tokens (Authorization) and ``others`` (bucket tokens).

        Raises :class:`UnauthorizedError` when a token is needed and none, or none
        valid, was given, and :class:`ForbiddenError` for a valid token of the
        wrong scope. Tokens that match no server token are kept: they may open a
        protected bucket. An open endpoint (health) looks at no token at all, and
        what cannot be a token (longer than :data:`MAX_TOKEN_BYTES`, or past the
        first :data:`MAX_TOKENS`) is dropped unread, never hashed.
        """
        needed = self.requires(access)
        if access == OPEN:
            return Principal()
        usable = [t for t in bearer if len(t) <= MAX_TOKEN_BYTES][:MAX_TOKENS]
        room = MAX_TOKENS - len(usable)
        kept = [t for t in others if len(t) <= MAX_TOKEN_BYTES][:room]
        scopes: frozenset[str] = frozenset()
        for token in usable:
            scopes |= self.scopes_of(token)
        if needed is not None and needed not in scopes:
            if not bearer:
                raise UnauthorizedError(f"this {access} endpoint needs a bearer token"
                                        " (Authorization: Bearer <token>)")
            if not scopes:
                raise UnauthorizedError("the bearer token is not valid", invalid=True)
            raise ForbiddenError(f"the bearer token does not allow {access} requests",
                                 scope=needed)
        return Principal(scopes=scopes, tokens=tuple(usable) + tuple(kept))
