"""Advisory file locks (``flock``) under ``$CACHEMESH_HOME/locks/``.

flock locks belong to an open file description, so they work between threads
of one process (each opens the file itself) as well as between processes, and
the kernel drops them when a process dies: a crashed pull or server never leaves
a lock behind. Used for:

    locks/blobs.lock            shared while a blob is committed and linked;
                                exclusive while unreferenced blobs are deleted
    locks/pull/<cache>.lock     exclusive while a pull of that cache runs
    locks/use/<cache>.lock      shared while a process uses a cache (a loaded
                                model); eviction and removal need it exclusive
    locks/fetch/<key>.lock      exclusive while one process fetches one object
                                (single-flight across processes)

``locks/`` and its folders are 0700 from the moment they are made (their file
names name caches, protected ones included); lock files are 0600.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

PRIVATE_DIR_MODE = 0o700


def private_dirs(path: Path) -> Path:
    """Make ``path`` and its missing parents with mode 0700, each created with that mode
    (never made open and narrowed later). Existing folders are left as they are."""
    missing = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_DIR_MODE)
        except FileExistsError:
            pass  # made by another process meanwhile
    return path


class FileLock:
    """``with FileLock(path): ...`` or ``lock.acquire(blocking=False)``."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock. Non-blocking (or on timeout) returns False when busy."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        private_dirs(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    if blocking and deadline is None:
                        fcntl.flock(fd, mode)
                    else:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if not blocking or (deadline is not None and time.monotonic() >= deadline):
                        os.close(fd)
                        return False
                    time.sleep(0.02)
        except BaseException:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def is_locked(path: Path) -> bool:
    """Whether any process holds a lock (shared or exclusive) on ``path`` now."""
    if not path.exists():
        return False
    probe = FileLock(path)
    if probe.acquire(blocking=False):
        probe.release()
        return False
    return True
