"""What a node keeps of its cluster identity in its own store.

::

    $CACHEMESH_HOME/cluster/
        node-id     the node's id: 32 hex digits and a newline, written once (temp file,
                    fsync, rename), never changed. The same store restarted is the same node:
                    it takes its place back in the cluster (membership.py).
        node.lock   locked (flock) by the one process that runs this store as a cluster
                    node, for as long as it runs; holds that process's pid, for messages.
                    The kernel drops the lock when the process dies, even by SIGKILL.
        models.json the declarations this node last saw in etcd, deletions included: what
                    it restores when etcd loses its data (serve/cluster/registry_etcd.py draws it)

The id is not a secret: it tells a node's restart (same store) from another node that
took the same name (another store), which must be refused.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

from ..errors import NodeNameTakenError, StoreError

_ID_CHARS = set("0123456789abcdef")


def cluster_dir(home: Path) -> Path:
    return Path(home) / "cluster"


def node_id(home: Path) -> str:
    """The store's node id, created on first use."""
    path = cluster_dir(home) / "node-id"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise StoreError(f"cannot read the node id {path}: {exc}") from exc
    if text:
        if len(text) != 32 or set(text) - _ID_CHARS:
            raise StoreError(f"{path} does not hold a node id (32 hex digits): {text[:40]!r}")
        return text
    new = uuid.uuid4().hex
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".node-id.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(new + "\n")
        f.flush()
        os.fsync(f.fileno())
    # link, not rename: of two processes creating it at once, the first one wins for both.
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return node_id(home)


class StoreLock:
    """The lock that makes one process at a time the cluster node of a store."""

    def __init__(self, home: Path) -> None:
        self.path = cluster_dir(home) / "node.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise NodeNameTakenError(
                f"another cachemesh node (pid {holder}) already runs on the store"
                f" {self.path.parent.parent}: one store, one node") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
