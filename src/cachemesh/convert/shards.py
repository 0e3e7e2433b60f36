"""Writing a checkpoint as safetensors shards, the way ``save_pretrained`` lays them out.

One file ``model.safetensors`` when everything fits in ``limit`` bytes; otherwise
``model-00001-of-0000N.safetensors``, … and ``model.safetensors.index.json``
(``{"metadata": {"total_size": …}, "weight_map": {tensor: file}}``). Tensors are
written as they come, a shard at a time, so a converter never holds more than
one shard in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHARD_BYTES = 2 * 1024**3


class ShardWriter:
    """Collects tensors and writes them in shards of at most ``limit`` bytes.

    ``metadata`` goes into every shard's header (safetensors keeps strings only);
    ``index_metadata`` into the index, beside ``total_size``.
    """

    def __init__(self, directory: Path, *, metadata: dict[str, str] | None = None,
                 index_metadata: dict[str, Any] | None = None,
                 limit: int = SHARD_BYTES) -> None:
        self.dir = directory
        self.metadata = {"format": "pt", **(metadata or {})}
        self.index_metadata = dict(index_metadata or {})
        self.limit = limit
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, Any] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str], int]] = []  # (tmp name, tensors, bytes)

    def add(self, name: str, tensor: Any) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"shard-{len(self.shards)}.tmp"
        save_file(self.pending, str(self.dir / tmp), metadata=self.metadata)
        self.shards.append((tmp, sorted(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending; name the shards; return the files written."""
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            (self.dir / self.shards[0][0]).rename(self.dir / "model.safetensors")
            return ["model.safetensors"]
        count = len(self.shards)
        weight_map, names = {}, []
        for i, (tmp, tensors, _) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.dir / tmp).rename(self.dir / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": sum(s[2] for s in self.shards),
                              **self.index_metadata},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [*names, "model.safetensors.index.json"]
