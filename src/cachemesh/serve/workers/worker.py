"""The worker process: holds models and runs them (``python -m cachemesh.serve.workers.worker``).

The server spawns workers with one end of a socketpair (``--fd``) and talks to
them in the messages of ``messages.py`` (framed by ``ipc.py``). A worker:

- answers predictions inline on its reading thread, in arrival order, and sends
  the replies to everything it read in one go in a single ``sendmsg`` (requests
  that arrive together leave together, as long as that takes under 2 ms);
  requests for one ``batchable`` model that arrive together are predicted in
  one call (``runtimes/batching.py``);
- loads and unloads on a separate thread, so that a long load does not stall
  the models it already serves; loads run one at a time, which keeps the RSS
  measured around each load the load's own;
- ``generate`` and ``stream`` on a small pool of their own, so a long
  generation holds up neither loads nor other generations; a CANCEL for a
  stream closes the runtime's generator before its next chunk (the HTTP
  client went away: generation stops);
- measures a model's size as its RSS after ``load`` less its RSS before (after
  the runtime's ``preload`` imported its framework), unless the runtime says;
  every thread allocates from one malloc arena (``_one_arena``; glibc's
  ``MALLOC_ARENA_MAX`` in the environment overrides it), so that an unload
  gives the model's memory back and the RSS falls;
- reads a model's weight files, and the files of the runtime's framework, into
  the page cache on a thread of their own while the framework is imported (a
  first load of that runtime, or a Preload the server sends ahead of the first
  request), so the disk and the imports overlap instead of adding up; a
  Preload's safetensors checkpoint is read, once the framework is imported, into
  the loader's own buffers (``load/prefetch.py``), which its load adopts, and
  counted in its size;
- when started with ``--warm`` (``cachemesh serve`` starts its workers before it
  imports its own web stack, naming the local models it will declare), imports
  those models' frameworks at once;
- dies with the server (``PR_SET_PDEATHSIG``), and exits when its socket closes.

A crash here (segfault, kill, out of memory) is seen by the server as the
socket closing; the server fails what was in flight and starts another worker.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...runtimes import batching
from . import ipc
from .messages import (
    Cancel,
    Chunk,
    End,
    Failure,
    FailureKind,
    Generate,
    Infer,
    Load,
    Loaded,
    Message,
    Preload,
    Preloaded,
    Ready,
    Result,
    Stats,
    Stream,
    Unload,
    Unloaded,
    WorkerStats,
)
from .readahead import package_files, read_ahead, read_weights_ahead, weight_files

_PAGE = os.sysconf("SC_PAGE_SIZE")
# Replies to requests read together leave together, unless predicting them takes longer.
FLUSH_AFTER_S = 0.002


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _trim() -> None:
    # Give freed heap pages back to the kernel, so RSS falls after an unload.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Threads other than the main one allocate from arenas of their own, and glibc gives a
# thread arena's freed memory back to the kernel only in part: loads run on a thread,
# so after an unload (even with malloc_trim) the RSS stayed where it was. Measured,
# 20 MiB numpy arrays loaded and freed on a thread pool: RSS 45.7 MiB after each unload
# from the second on, 25.6 MiB with one arena. The server's accounting reads that RSS.
# One arena also keeps glibc's adaptive mmap threshold, which reuses heap memory for
# a large block that is freed and allocated again (a 4 MiB IPC round trip: 2.0 ms;
# 6.6 ms with every block of 1 MiB or more mapped on its own, the other cure tried).
# MALLOC_ARENA_MAX in the environment (glibc's own knob) wins.
_M_ARENA_MAX = -8


def _one_arena() -> None:
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc
        pass


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self, sock: socket.socket, warm: list[dict[str, str]] | None = None) -> None:
        self.sock = sock
        self.warm = list(warm or [])
        self.models: dict[str, Any] = {}
        self._preloaded: set[type] = set()
        self._send_lock = threading.Lock()
        self._slow = ThreadPoolExecutor(1, thread_name_prefix="cachemesh-load")
        self._streams = ThreadPoolExecutor(4, thread_name_prefix="cachemesh-stream")
        # Streams under way: request id -> set when the server cancels it. Touched only
        # on the reading thread (add, set) and by the stream's own thread (pop).
        self._active: dict[int, threading.Event] = {}

    def send(self, *messages: Message) -> None:
        frames: list[bytes | memoryview] = []
        for m in messages:
            frames.extend(ipc.encode(m))
        with self._send_lock:
            while frames:
                sent = self.sock.sendmsg(frames[:512])
                # Drop what went out; sendmsg may write part of the list.
                while frames and sent >= len(frames[0]):
                    sent -= len(frames[0])
                    frames.pop(0)
                if sent:
                    frames[0] = memoryview(frames[0])[sent:]

    def serve(self) -> None:
        from ...runtimes import Runtime  # noqa: F401  (imports numpy once, before READY)

        gc.collect()
        gc.freeze()
        self.send(Ready(os.getpid(), rss_bytes()))
        if self.warm:
            self._slow.submit(self._warm_early, self.warm)
        decoder = ipc.Decoder()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            n = self.sock.recv_into(view)
            if n == 0:
                return  # the server closed the socket or died
            replies: list[Message] = []
            infers: list[Infer] = []
            for message in decoder.feed(view[:n]):
                kind = type(message)
                if kind is Infer:
                    infers.append(message)  # type: ignore[arg-type]
                elif kind is Stream:
                    self._active[message.rid] = threading.Event()  # type: ignore[attr-defined]
                    self._streams.submit(self.stream, message)
                elif kind is Cancel:
                    cancel = self._active.get(message.rid)  # type: ignore[attr-defined]
                    if cancel is not None:
                        cancel.set()
                elif kind is Generate:
                    self._streams.submit(self.slow, message)
                else:
                    self._slow.submit(self.slow, message)
            since = time.perf_counter()
            i = 0
            while i < len(infers):
                key = infers[i].key
                j = i + 1
                if getattr(self.models.get(key), "batchable", False):
                    while (j < len(infers) and infers[j].key == key
                           and j - i < batching.MAX_REQUESTS):
                        j += 1
                replies.extend(self.infer_group(infers[i:j]))
                i = j
                # Hold replies back only while predictions are quick: a slow one
                # must not delay the answers that are ready before it.
                now = time.perf_counter()
                if now - since > FLUSH_AFTER_S:
                    self.send(*replies)
                    replies, since = [], now
            if replies:
                self.send(*replies)

    def infer_group(self, group: list[Infer]) -> list[Message]:
        """Requests for one model read together: one merged call when the runtime
        allows it (see runtimes/batching.py), else one call each."""
        if len(group) > 1:
            merged = batching.merge([m.request for m in group])
            if merged is not None:
                request, sizes = merged
                try:
                    parts = batching.split(self.models[group[0].key].predict(request), sizes)
                except Exception:
                    parts = None  # one by one, so each request gets its own error
                if parts is not None:
                    return [Result(m.rid, part) for m, part in zip(group, parts, strict=True)]
        return [self.infer(m) for m in group]

    def infer(self, message: Infer) -> Message:
        from ...errors import InvalidInputError

        rid, key = message.rid, message.key
        model = self.models.get(key)
        if model is None:
            return Failure(rid, "missing", f"model {key!r} is not loaded on this worker")
        if not model.capabilities().get("predict", True):
            # A generative model that only has the generate/stream hooks: the request
            # asked for what the model does not do (found by the fuzzer).
            return Failure(rid, "input", "this model takes no KServe V2 inference"
                                         " requests; it generates (OpenAI API, /v1)")
        try:
            return Result(rid, model.predict(message.request))
        except InvalidInputError as exc:
            return Failure(rid, "input", str(exc))
        except Exception as exc:
            return Failure(rid, "model", f"{type(exc).__name__}: {exc}")

    def slow(self, message: Message) -> None:
        """A request answered off the reading thread: a load, an unload, a generation,
        a preload, the counters."""
        try:
            if isinstance(message, Load):
                reply: Any = self.load(message)
            elif isinstance(message, Unload):
                reply = self.unload(message.key)
            elif isinstance(message, Generate):
                model = self.models.get(message.key)
                if model is None:
                    raise LookupError(f"model {message.key!r} is not loaded on this worker")
                reply = model.generate(message.payload)
            elif isinstance(message, Preload):
                reply = self.preload(message)
            elif isinstance(message, Stats):
                reply = WorkerStats(rss_bytes(), sorted(self.models),
                                    {k: _stats(m) for k, m in list(self.models.items())})
            else:
                raise ValueError(f"unknown message {type(message).__name__}")
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the server
            self.send(self._failure(message, exc))
            return
        self.send(Result(message.rid, reply))  # type: ignore[attr-defined]

    def _failure(self, message: Message, exc: BaseException) -> Failure:
        from ...errors import IntegrityError, InvalidInputError

        load = isinstance(message, Load)
        kind: FailureKind = "load" if load else (
            "input" if isinstance(exc, InvalidInputError) else "model")
        detail = f"{type(exc).__name__}: {exc}"
        blob = ""
        if isinstance(exc, IntegrityError) and exc.sha256:  # a cached file changed
            kind, detail, blob = "corrupt", str(exc), exc.sha256
        elif load and not isinstance(exc, (MemoryError, InvalidInputError)):
            tb = traceback.extract_tb(exc.__traceback__)
            if tb:
                detail += f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})"
        if load:
            self.models.pop(message.key, None)  # type: ignore[attr-defined]
        gc.collect()
        return Failure(message.rid, kind, detail, blob)  # type: ignore[attr-defined]

    def load(self, message: Load) -> Loaded:
        from ...runtimes import runtime_class

        key, settings = message.key, message.settings
        if key in self.models:
            self.unload(key)
        cls = runtime_class(message.runtime)
        if cls not in self._preloaded:
            read_ahead(weight_files([settings.path]))
            self._preload(cls)
        gc.collect()
        from ...load import prefetch

        # Weights read ahead (Preload) are in the RSS already: those the load takes
        # over are the model's, so they count as its size.
        ahead = {id(p): p.resident_bytes() for p in prefetch.waiting()}
        held = sorted(self.models)  # in ``before``: the server subtracts their sizes
        before = rss_bytes()
        model = cls(settings)
        check = message.integrity
        if check is not None:  # the files' digests, sizes and commit times (load/integrity.py)
            from ...load import integrity

            files = {rel: integrity.Expected(*e) for rel, e in check.files.items()}
            integrity.for_view(Path(settings.path), files, full=check.full).run(model.load)
        else:
            model.load()
        gc.collect()
        left = {id(p) for p in prefetch.waiting()}
        before -= sum(n for pid, n in ahead.items() if pid not in left)
        after = rss_bytes()
        size = model.memory_bytes()
        measured = max(after - before, 0) if size is None else int(size)
        self.models[key] = model
        try:
            metadata = model.metadata()
        except Exception as exc:  # metadata is a courtesy; a model without it still serves
            metadata = {"error": f"{type(exc).__name__}: {exc}"}
        hooks = model.capabilities()
        return Loaded(size=measured, reported=size is not None, rss_before=before, held=held,
                      rss=after, metadata=metadata, generate=hooks.get("generate", False),
                      stream=hooks.get("stream", False))

    def _preload(self, cls: Any) -> None:
        if cls not in self._preloaded:
            # (Finding the files walks thousands of directories: on the thread too.)
            read_ahead(lambda: package_files(cls.preload_packages))
            cls.preload()
            # What the framework allocated stays for the life of the worker: freeze it,
            # so the collections below (and any later) no longer walk it.
            gc.collect()
            gc.freeze()
            self._preloaded.add(cls)

    def preload(self, message: Preload) -> Preloaded:
        from ...runtimes import runtime_class

        # The weights are read once the framework is imported, not while. Measured on
        # the benchmark VM (benchmarks/coldstart.py, 2 GB, 3 rounds each, 2026-11-23):
        # reading them during the import of torch and transformers, the import took
        # 8.2 s (one reading thread, 16 MiB reads) or 6.0 s (1 MiB reads) instead of
        # 4.1 s, and the cold start 9.3 s or 8.8 s instead of 7.5-7.8 s: each small
        # read of the imports waits behind the queued weight reads.
        self._preload(runtime_class(message.runtime))
        # A Load that came first (a request raced the Preload) has read them already.
        loaded = {str(getattr(getattr(m, "settings", None), "path", "")) for m in self.models.values()}
        read_weights_ahead([p for p in message.paths if str(p) not in loaded])
        return Preloaded(rss_bytes())

    def _warm_early(self, models: list[dict[str, str]]) -> None:
        """Import the frameworks of the models the server is about to declare (the
        server's ``launch(warm=...)``), before it asks: best effort, a model this
        cannot place is left to the server's Preload and Load."""
        from ...runtimes import resolve, runtime_class

        for model in models:
            try:
                name = model.get("runtime") or resolve(Path(model["path"])).runtime
                cls = runtime_class(name)
                if cls.preload_at_start:
                    self._preload(cls)
            except Exception:  # noqa: BLE001 - the real load reports what is wrong
                continue

    def unload(self, key: str) -> Unloaded:
        model = self.models.pop(key, None)
        if model is not None:
            try:
                model.unload()
            finally:
                del model
                gc.collect()
                _trim()
        return Unloaded(rss_bytes())

    def stream(self, message: Stream) -> None:
        rid, key = message.rid, message.key
        model = self.models.get(key)
        cancel = self._active.get(rid) or threading.Event()
        chunks = None
        try:
            if model is None:
                raise LookupError(f"model {key!r} is not loaded on this worker")
            chunks = model.stream(message.payload)
            for chunk in chunks:
                if cancel.is_set():
                    return  # nobody reads the rest; closing the generator stops it
                self.send(Chunk(rid, chunk))
        except Exception as exc:
            from ...errors import InvalidInputError

            kind: FailureKind = "input" if isinstance(exc, InvalidInputError) else "model"
            self.send(Failure(rid, kind, f"{type(exc).__name__}: {exc}"))
            return
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            self._active.pop(rid, None)
        self.send(End(rid))


def _stats(model: Any) -> dict[str, float]:
    try:
        return dict(model.stats())
    except Exception:  # a courtesy, like metadata
        return {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cachemesh.serve.workers.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--memory-limit", type=int, default=0)
    parser.add_argument("--warm", default="", help="JSON list of {path, runtime}: the models"
                        " whose frameworks to import at once")
    args = parser.parse_args(argv)
    _one_arena()
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    # SIGTERM to the whole process group (a container runtime, a shell) is the server's:
    # it drains, then closes our socket, and we exit on EOF.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    try:
        Worker(sock, json.loads(args.warm) if args.warm else None).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
