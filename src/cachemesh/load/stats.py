"""What a load did: bytes by source, tensors copied or cast, time taken."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadStats:
    """Counters of one load, filled in as it goes (complete once the last tensor is out).

    ``copied`` is the number of tensors that could not be a view into the read
    buffer because their file offset is not a multiple of their element size (a
    header whose length or offsets are not aligned; the official writer never
    produces one). Each such tensor was copied once into memory of its own, and
    its name is in ``copied_names``. Every other tensor is a view: no byte of it
    was copied after the read.
    """

    files: int = 0
    tensors: int = 0
    # Bytes of tensor data handed out.
    tensor_bytes: int = 0
    # Bytes read from files, by where they came from. Reads are whole chunks,
    # so this also counts gaps between tensors and a little header or padding.
    page_cache_bytes: int = 0
    direct_bytes: int = 0
    buffered_bytes: int = 0
    copied_names: list[str] = field(default_factory=list)
    # Tensors converted by ``dtype=``.
    cast: int = 0
    # Whether the reads were started ahead, by ``prefetch.start``, and adopted.
    prefetched: bool = False
    # Wall time from the start of the load to the last tensor handed out.
    seconds: float = 0.0

    @property
    def copied(self) -> int:
        return len(self.copied_names)

    @property
    def bytes_read(self) -> int:
        return self.page_cache_bytes + self.direct_bytes + self.buffered_bytes

    @property
    def gb_per_s(self) -> float:
        """Tensor bytes per second, in GB/s (10**9 bytes)."""
        return self.tensor_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
