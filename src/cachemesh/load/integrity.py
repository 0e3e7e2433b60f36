"""Check that a model's files are the bytes the store committed, as it loads.

Blobs are read-only and never written after their row is committed, but a
user with the rights (root, or the owner after a chmod) can still change one,
and through deduplication one write changes the file in every view that links
it (issue 22). With each load the server hands the worker, for every file of
the model's view, what the store knows: its sha256, its size, and when its
blob was committed (``blobs.created_at``). A :class:`Verifier` checks them:

- **cheap, every load**: a ``stat``. A size that differs fails the load; a
  modification time later than the commit makes the file *suspect*, and a
  suspect file is hashed before the model may use it. (The modification time,
  not the change time: every hardlink the store makes for a view changes the
  inode's change time; only writing the bytes, or ``utime``, changes the other.)
- **verified, when asked** (``CACHEMESH_SERVE_VERIFY_LOADS``): every file is
  hashed. A safetensors file read by cachemesh's loader is hashed as its chunks
  land (``stream.py`` asks :func:`claim`), in file order, before its tensors
  are handed out: no second read. Other files (configs, tokenizers, joblib,
  ONNX) are hashed right before the runtime reads them (it then reads them from
  the page cache), and a weight file that the runtime read some other way is
  hashed after its load.

A file whose bytes do not match raises :class:`~cachemesh.errors.IntegrityError`
naming it and its blob (``sha256``); the server then fails the load (not retried elsewhere:
every worker reads the same bytes) and records the blob as corrupt for
``cachemesh cache verify``.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..errors import IntegrityError

T = TypeVar("T")

_READ = 4 * 1024 * 1024
# A blob's mtime may trail or lead the commit by the clock of another file system.
MTIME_SLACK_S = 2.0
_ACTIVE: contextvars.ContextVar[Verifier | None] = contextvars.ContextVar(
    "cachemesh_verifier", default=None)


@dataclass(frozen=True)
class Expected:
    """What the store committed for one file of a view."""

    sha256: str
    size: int
    committed_at: float


def corrupt(path: str | os.PathLike[str], sha256: str, why: str) -> IntegrityError:
    """The error for a cached file whose bytes are not the ones its blob was committed with."""
    return IntegrityError(
        f"{path}: {why}; its blob sha256:{sha256} was changed after it was cached"
        " (`cachemesh cache verify` lists it; remove the caches that hold it and pull"
        " again)", sha256=sha256)


def hash_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_READ)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])  # releases the GIL for large updates
    return digest.hexdigest()


@dataclass
class Verifier:
    """The checks of one load. ``files``: path -> what the store committed."""

    files: Mapping[str, Expected]
    full: bool = False
    # (st_dev, st_ino) -> (path, expected) of files still to hash.
    pending: dict[tuple[int, int], tuple[str, Expected]] = field(default_factory=dict)
    claimed: dict[tuple[int, int], tuple[str, Expected]] = field(default_factory=dict)
    verified: list[str] = field(default_factory=list)  # hashed and found right
    suspect: list[str] = field(default_factory=list)  # a newer mtime than the commit

    def check(self) -> None:
        """The cheap check of every file, then the hash of those that must be hashed
        and that cachemesh's loader will not read (anything but ``*.safetensors``)."""
        for path, expected in self.files.items():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # a file the view does not hold is the pull's business, not ours
            if st.st_size != expected.size:
                raise corrupt(path, expected.sha256,
                              f"{st.st_size} bytes on disk, {expected.size} committed")
            late = st.st_mtime > expected.committed_at + MTIME_SLACK_S
            if late:
                self.suspect.append(path)
            if late or self.full:
                self.pending[(st.st_dev, st.st_ino)] = (path, expected)
        for key, (path, expected) in list(self.pending.items()):
            if not path.endswith(".safetensors"):
                self._hash(key)

    def claim(self, path: str | os.PathLike[str]) -> Expected | None:
        """The digest a loader reading ``path`` must find, if this load verifies it;
        the loader then owns the check."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino)
        found = self.pending.pop(key, None)
        if found is None:
            return None
        self.claimed[key] = found
        return found[1]

    def done(self, path: str | os.PathLike[str], expected: Expected, digest: str) -> None:
        """A loader's result for a file it claimed."""
        self.claimed = {k: v for k, v in self.claimed.items() if v[0] != str(path)}
        if digest != expected.sha256:
            raise corrupt(path, expected.sha256, f"its bytes hash to sha256:{digest}")
        self.verified.append(str(path))

    def finish(self) -> None:
        """Hash what the loader did not read (weights read by another library)."""
        for key in list(self.pending):
            self._hash(key)

    def explain(self, error: BaseException) -> None:
        """After a failed load: if a file it was to verify is corrupt, that is the error
        (a changed header fails the parse before any hash is done). Returns otherwise."""
        self.pending.update(self.claimed)
        self.claimed = {}
        for key in list(self.pending):
            try:
                self._hash(key)
            except IntegrityError as found:
                raise found from error
            except OSError:
                continue

    def run(self, load: Callable[[], T]) -> T:
        """``load()`` under this verifier: the cheap check and the hashes of the files
        the loader does not read first, then the load, then what is left."""
        self.check()
        with self.loading():
            try:
                result = load()
            except BaseException as exc:
                self.explain(exc)
                raise
        self.finish()
        return result

    def _hash(self, key: tuple[int, int]) -> None:
        path, expected = self.pending.pop(key)
        self.done(path, expected, hash_file(path))

    @contextmanager
    def loading(self) -> Iterator[Verifier]:
        """Make this the verifier that loaders in this context consult."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def claim(path: str | os.PathLike[str]) -> tuple[Verifier, Expected] | None:
    """For a loader: the active verifier and what ``path`` must hash to, if it is to."""
    verifier = _ACTIVE.get()
    if verifier is None:
        return None
    expected = verifier.claim(path)
    return None if expected is None else (verifier, expected)


def for_view(view: Path, files: Mapping[str, Expected], *, full: bool) -> Verifier:
    """A verifier for the files of ``view``, given by their paths inside it."""
    return Verifier({str(view / rel): e for rel, e in files.items()}, full=full)
