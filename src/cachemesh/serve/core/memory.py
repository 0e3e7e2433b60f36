"""The memory budget of the server, when ``--memory`` does not set it.

The container's limit (cgroup v2 ``memory.max``, cgroup v1
``memory.limit_in_bytes``) or else the physical memory, less a buffer for the
server process itself and the page cache it needs: 10%, at least 256 MiB and at
most 4 GiB.
"""

from __future__ import annotations

from pathlib import Path

BUFFER_SHARE = 0.10
BUFFER_MIN = 256 * 1024**2
BUFFER_MAX = 4 * 1024**3
_UNLIMITED = 1 << 60  # cgroup v1 writes a huge number for "no limit"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _UNLIMITED else None


def container_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup, if it has one."""
    own = ""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hier, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hier == "0" and controllers == "":
                own = path  # cgroup v2
    except OSError:
        pass
    for candidate in (root / own.lstrip("/") / "memory.max", root / "memory.max"):
        value = _read_int(candidate)
        if value is not None:
            return value
    return _read_int(root / "memory" / "memory.limit_in_bytes")


def physical_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> int:
    total = container_limit() or physical_memory()
    total = min(total, physical_memory())
    buffer = min(max(int(total * BUFFER_SHARE), BUFFER_MIN), BUFFER_MAX)
    return max(total - buffer, total // 2)
