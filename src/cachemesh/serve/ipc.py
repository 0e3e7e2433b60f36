"""Messages between the server and its worker processes.

One Unix stream socket per worker (a socketpair made at spawn). A message is
any picklable object, framed as::

    uint32 payload_len | uint16 nbufs | nbufs x uint64 buffer_len | payload | buffers

The payload is pickle protocol 5. Contiguous buffers of at least
:data:`OUT_OF_BAND_MIN` bytes (numpy arrays) travel out of band: they are sent
as they lie in memory (``sendmsg`` with a list of buffers, no copy into the
pickle) and the reader hands them to ``pickle.loads(buffers=...)``. Smaller
ones stay in band, where one small pickle beats several buffers.

Rejected: multiprocessing queues (a feeder thread and a lock per message, and
no asyncio reader); shared memory rings (faster for megabyte tensors, but a
crashed worker can leave a ring half-written, and tabular requests are small).
The measured cost is in docs/benchmarks.md (section "serve").
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from typing import Any

OUT_OF_BAND_MIN = 64 * 1024
_HEAD = struct.Struct("<IH")

# Requests, server -> worker: (op, request_id, model_key, payload)
LOAD, UNLOAD, INFER, GENERATE, STREAM, STATS = 1, 2, 3, 4, 5, 6
# Replies, worker -> server: (request_id, status, payload)
OK, ERROR, CHUNK, END, READY = 0, 1, 2, 3, 4
# ERROR payloads are (kind, message); kinds:
E_INPUT, E_MODEL, E_LOAD, E_MISSING = "input", "model", "load", "missing"


def encode(obj: Any) -> list[bytes | memoryview]:
    """Frame ``obj``: a list of buffers to write in order."""
    bufs: list[memoryview] = []

    def out_of_band(pb: pickle.PickleBuffer) -> bool | None:
        raw = pb.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # in band
        bufs.append(raw)
        return None

    payload = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    head = _HEAD.pack(len(payload), len(bufs))
    if bufs:
        head += struct.pack(f"<{len(bufs)}Q", *(b.nbytes for b in bufs))
        return [head, payload, *bufs]
    return [head + payload]


class Decoder:
    """Incremental reader: ``feed`` bytes as they come, iterate whole messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Any]:
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= _HEAD.size:
            plen, nbufs = _HEAD.unpack_from(buf, pos)
            start = pos + _HEAD.size + 8 * nbufs
            if n < start:
                break
            lens = struct.unpack_from(f"<{nbufs}Q", buf, pos + _HEAD.size) if nbufs else ()
            end = start + plen + sum(lens)
            if n < end:
                break
            payload = memoryview(buf)[start:start + plen]
            if nbufs:
                buffers = []
                off = start + plen
                for length in lens:
                    buffers.append(bytearray(buf[off:off + length]))  # owned, writable
                    off += length
                obj = pickle.loads(payload, buffers=buffers)
            else:
                obj = pickle.loads(payload)
            payload.release()
            pos = end
            yield obj
        if pos:
            del buf[:pos]
