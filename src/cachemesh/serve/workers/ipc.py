"""The framing of the messages between the server and its worker processes.

One Unix stream socket per worker (a socketpair made at spawn). A message is one
of the dataclasses of ``messages.py``; on the wire it is the tuple ``(tag,
values)`` (its class's tag, its fields in order), framed as::

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

from .messages import Message, from_wire

OUT_OF_BAND_MIN = 64 * 1024
_HEAD = struct.Struct("<IH")


def encode(message: Message) -> list[bytes | memoryview]:
    """Frame ``message``: a list of buffers to write in order."""
    bufs: list[memoryview] = []

    def out_of_band(pb: pickle.PickleBuffer) -> bool | None:
        raw = pb.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # in band
        bufs.append(raw)
        return None

    cls = type(message)
    payload = pickle.dumps((cls.TAG, cls.values(message)), protocol=5,
                           buffer_callback=out_of_band)
    head = _HEAD.pack(len(payload), len(bufs))
    if bufs:
        head += struct.pack(f"<{len(bufs)}Q", *(b.nbytes for b in bufs))
        return [head, payload, *bufs]
    return [head + payload]


class Decoder:
    """Incremental reader: ``feed`` bytes as they come, iterate whole messages.

    Small frames collect in one buffer. A frame larger than :data:`BIG_FRAME`
    gets a buffer of its exact size, filled in place as the bytes arrive, and its
    out-of-band buffers are handed to pickle as views of it: each byte is copied
    once, and never moved again.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._big: bytearray | None = None
        self._big_fill = 0

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Message]:
        data = memoryview(data).cast("B")
        while len(data):
            if self._big is not None:
                take = min(len(data), len(self._big) - self._big_fill)
                self._big[self._big_fill:self._big_fill + take] = data[:take]
                self._big_fill += take
                data = data[take:]
                if self._big_fill == len(self._big):
                    big, self._big = self._big, None
                    yield _decode(big, 0, own=False)[0]
                continue
            self._buf += data
            data = data[:0]
            yield from self._drain()

    def _drain(self) -> Iterator[Message]:
        buf = self._buf
        pos = 0
        while len(buf) - pos >= _HEAD.size:
            plen, nbufs = _HEAD.unpack_from(buf, pos)
            start = pos + _HEAD.size + 8 * nbufs
            if len(buf) < start:
                break
            lens = struct.unpack_from(f"<{nbufs}Q", buf, pos + _HEAD.size) if nbufs else ()
            end = start + plen + sum(lens)
            if len(buf) < end and end - pos > BIG_FRAME:
                # Move this frame into a buffer of its own size and fill it there.
                self._big = bytearray(end - pos)
                have = len(buf) - pos
                self._big[:have] = memoryview(buf)[pos:]
                self._big_fill = have
                pos = len(buf)
                break
            if len(buf) < end:
                break
            obj, pos = _decode(buf, pos, own=True)
            yield obj
        if pos:
            del buf[:pos]


BIG_FRAME = 1 << 20


def _decode(buf: bytearray, pos: int, *, own: bool) -> tuple[Message, int]:
    """The message framed at ``buf[pos:]``, and where the next one starts. With
    ``own``, buffers are copied out (``buf`` is reused); else they are views of it."""
    plen, nbufs = _HEAD.unpack_from(buf, pos)
    start = pos + _HEAD.size + 8 * nbufs
    lens = struct.unpack_from(f"<{nbufs}Q", buf, pos + _HEAD.size) if nbufs else ()
    view = memoryview(buf)
    payload = view[start:start + plen]
    off = start + plen
    buffers = []
    for length in lens:
        part = view[off:off + length]
        buffers.append(bytearray(part) if own else part)  # writable either way
        off += length
    tag, values = pickle.loads(payload, buffers=buffers) if nbufs else pickle.loads(payload)
    payload.release()
    if own:
        view.release()
    return from_wire(tag, values), off
