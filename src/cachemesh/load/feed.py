"""Where the bytes of a file being pulled can be read, as soon as they land.

The parts of an origin stream (``origin.py``) that know where bytes are: :class:`Pull`
runs ``Caches.ensure`` in a thread; a :class:`Feed` says, for one file, which path holds
bytes ``[start, end)`` now (this process's fetch through its Flight, another process's
through the fetcher's record read with ``fetch.Landing``, a blob verified earlier, or the
view once the pull is over); a :class:`LandingReader` reads them, bound to one inode so
that bytes of a discarded attempt are never mixed with the next one's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoadError
from .format import SafetensorsHeader, check_header_size, parse_header
from .reader import ReadCounts

if TYPE_CHECKING:
    from ..caches import Caches, CacheSpec
    from ..fetch import Flight, LandingSpot
    from ..sources import RemoteFile

# How often a reader waiting for bytes looks beyond this process's fetch: the
# pull's outcome, a blob that was already there, another process's record.
POLL_S = 0.05

class Replaced(Exception):
    """Internal: the partial being read was discarded or rewritten (or its fetch failed)."""


class Pull:
    """``Caches.ensure`` in a thread; its outcome for whoever waits."""

    def __init__(self, caches: Caches, spec: CacheSpec, first: list[str]) -> None:
        self.error: BaseException | None = None
        self.view: Path | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(caches, spec, first), name="cachemesh-stream-pull",
            daemon=True,  # a closed stream leaves the pull to finish; exit may cut it (resumable)
        )
        self._thread.start()

    def _run(self, caches: Caches, spec: CacheSpec, first: list[str]) -> None:
        try:
            self.view = caches.ensure(spec, first=first).view
        except BaseException as exc:  # noqa: BLE001 - handed to the stream
            self.error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> Path:
        """The view once the pull succeeded; raises its error otherwise."""
        self._done.wait()
        if self.error is not None:
            raise self.error
        assert self.view is not None
        return self.view


class Feed:
    """Where the bytes of one file of the source can be read, as soon as they can.

    ``wait(start, end)`` returns a path whose bytes ``[start, end)`` are this
    file's: the fetcher's partial while this process fetches it (its Flight),
    the partial another process fetches (its record), the blob (verified, or
    already there), or the file in the view once the pull is over.
    """

    def __init__(self, file: RemoteFile, final: Path, flight: Flight, spot: LandingSpot,
                 blob_path: Callable[[str], Path], pull: Pull,
                 cancelled: threading.Event) -> None:
        self.file = file
        self.final = final  # the file in the cache's view, once the pull is done
        self.flight = flight
        self.spot = spot  # where another process's fetch of the file lands (fetch/landing.py)
        self.blob_path = blob_path  # sha256 -> where that blob lives
        self.blob = blob_path(file.sha256) if file.sha256 else None  # the published one's
        self.pull = pull
        self.cancelled = cancelled

    def wait_verified(self) -> Path:
        """A path of the file's verified bytes (a blob, or the view): for small files that
        are read whole before anything else (the shard index)."""
        size = self.file.size
        while True:
            if self.cancelled.is_set():
                raise LoadError(f"{self.final}: the stream was closed")
            if self.flight.blob is not None:
                return self.flight.blob
            if self.pull.done:
                self.pull.wait()
                return self.final
            if self.flight.partial is None:
                if self.blob is not None and _size_of(self.blob) == size:
                    return self.blob
                landed = self.spot.read()
                if landed is not None and landed.sha256 is not None and landed.size == size:
                    blob = self.blob_path(landed.sha256)
                    if _size_of(blob) == size:
                        return blob
            time.sleep(POLL_S)

    def wait(self, start: int, end: int) -> Path:
        while True:
            if self.cancelled.is_set():
                raise LoadError(f"{self.final}: the stream was closed")
            try:
                return self.flight.wait(start, end, timeout=POLL_S)
            except TimeoutError:
                pass
            except Exception as exc:
                raise Replaced(str(exc)) from exc  # this attempt failed; the pull decides
            if self.pull.done:
                self.pull.wait()  # raises the pull's error
                return self.final
            if self.flight.partial is None:  # not fetched by this process (yet)
                found = self._elsewhere(start, end)
                if found is not None:
                    return found

    def _elsewhere(self, start: int, end: int) -> Path | None:
        size = self.file.size
        if self.blob is not None and _size_of(self.blob) == size:
            return self.blob  # verified earlier, by anyone
        landed = self.spot.read()
        if landed is None or landed.size != size:
            return None
        if landed.sha256 is not None:
            return None  # committed: the blob path above, or the view once the pull links it
        if landed.covers(start, end):
            return self.spot.partial
        return None


class LandingReader:
    """Reads chunks of one file from wherever its feed says they landed.

    The first read binds the reader to one inode (the partial's, which the
    commit links into the blob store unchanged). Every later read checks that
    the path it is given is still that inode, so bytes of a discarded attempt
    are never mixed with those of the next; :meth:`check_verified` compares it
    with the file in the cache's view once the pull is over.
    """

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self._lock = threading.Lock()
        self._fd = -1
        self._inode: tuple[int, int] | None = None
        self._generation = 0

    def _fd_for(self, path: Path) -> int | None:
        """Our descriptor, if ``path`` is the inode we read; None if it vanished meanwhile."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # a partial renamed into a blob between the wait and now: wait again
        except OSError as exc:
            raise LoadError(f"{self.feed.final}: cannot read {path}: {exc}") from exc
        inode = (st.st_dev, st.st_ino)
        with self._lock:
            if self._inode is None:
                try:
                    self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
                except OSError as exc:
                    raise LoadError(f"{self.feed.final}: cannot read {path}: {exc}") from exc
                opened = os.fstat(self._fd)
                if (opened.st_dev, opened.st_ino) != inode:  # replaced between stat and open
                    os.close(self._fd)
                    self._fd = -1
                    return None
                self._inode = inode
                self._generation = self.feed.flight.generation
            elif inode != self._inode or self._rewritten():
                raise Replaced(f"{self.feed.final}: the bytes being read were replaced")
            return self._fd

    def read_into(self, start: int, end: int, dst: memoryview) -> None:
        """Fill ``dst[:end - start]`` with the file's bytes ``[start, end)`` once they landed."""
        while True:
            path = self.feed.wait(start, end)
            fd = self._fd_for(path)
            if fd is not None:
                break
            time.sleep(POLL_S)
        pos = start
        while pos < end:
            try:
                n = os.preadv(fd, [dst[pos - start:end - start]], pos)
            except OSError as exc:
                raise LoadError(f"{self.feed.final}: read failed at byte {pos}: {exc}") from exc
            if n <= 0:
                raise LoadError(f"{self.feed.final}: the file ended at byte {pos}")
            pos += n

    # -- the ChunkReader of TensorStream -------------------------------------------

    def read(self, start: int, end: int, dst: memoryview) -> ReadCounts:
        self.read_into(start, end, dst)
        # Just written by the fetcher: copied out of the page cache.
        return ReadCounts(page_cache=end - start)

    def close(self) -> None:
        pass  # the descriptor outlives the file's TensorStream: check_verified needs it

    def release(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _rewritten(self) -> bool:
        """Whether this process's fetch started the file over since we bound to it.

        Only counted when we bound while this process fetched (generation > 0):
        a fetch that starts later on the same inode resumes another process's
        partial and does not rewrite the bytes its record named.
        """
        return self._generation > 0 and self.feed.flight.generation != self._generation

    def check_verified(self) -> None:
        """After a successful pull: the bytes read are those of the verified file."""
        if self._inode is None:
            return
        st = os.stat(self.feed.final)
        if (st.st_dev, st.st_ino) != self._inode or self._rewritten():
            raise Replaced(f"{self.feed.final}: the bytes read are not the verified file's")


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def read_landed_header(reader: LandingReader, where: Path, size: int) -> SafetensorsHeader:
    """Parse a file's header as soon as its bytes landed (the 8-byte length, then the JSON)."""
    if size < 8:
        raise LoadError(f"{where}: not a safetensors file: {size} bytes, "
                        "too short for the 8-byte header length")
    prefix = bytearray(8)
    reader.read_into(0, 8, memoryview(prefix))
    header_size = int.from_bytes(prefix, "little")
    check_header_size(where, header_size, size)  # never wait for bytes past the end
    raw = bytearray(header_size)
    reader.read_into(8, 8 + header_size, memoryview(raw))
    return parse_header(where, bytes(raw), size)
