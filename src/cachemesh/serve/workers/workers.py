"""Worker processes, seen from the server: spawn, call, notice death, replace.

Each :class:`WorkerHandle` owns one child process and the server's end of its
socketpair, read by an asyncio protocol in the server's event loop; it speaks
the messages of ``messages.py``. Calls are futures keyed by a request id;
streams are queues. When the socket closes, the worker is dead: every call in
flight fails with :class:`~cachemesh.errors.WorkerCrashedError` (or
``ModelLoadError`` for a load), naming how the process ended (its exit code, or
the signal: SIGSEGV, SIGKILL from the OOM killer), and the ``on_death`` callback
tells the pool (``pool.py``), which forgets the copies it held and starts a
replacement. A handle is a :class:`~.slot.Slot`: what placement and routing see.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import (
    InferenceError,
    InferenceInputError,
    ModelLoadError,
    UnavailableError,
    WorkerCrashedError,
)
from . import ipc
from .messages import Cancel, Chunk, End, Failure, Load, Ready, Request, Result, Stream
from .worker import rss_bytes

if TYPE_CHECKING:
    from ...config import Settings

START_TIMEOUT_S = 60.0


def describe_exit(code: int | None) -> str:
    if code is None:
        return "ended (exit status unknown)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {"SIGSEGV": " (segmentation fault)", "SIGKILL": " (killed; out of memory?)",
                "SIGABRT": " (aborted)", "SIGBUS": " (bus error)"}.get(name, "")
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


class _Protocol(asyncio.Protocol):
    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle
        self.decoder = ipc.Decoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handle._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            self.handle._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.handle._on_lost()


@dataclass
class Launched:
    """A worker process and the server's end of its socket, not yet attached to a loop."""

    proc: subprocess.Popen
    sock: socket.socket


def launch(*, memory_limit: int | None, threads: int, environ: dict[str, str] | None = None,
           warm: list[dict[str, str]] | None = None) -> Launched:
    """Start a worker process (no event loop needed: ``cachemesh serve`` starts its
    workers before it imports the web stack, so both start-ups overlap).

    ``warm``: models the server will declare (``{"path": ..., "runtime": ...}``, the
    runtime optional); the worker imports their runtimes' frameworks at once when
    they ask for it (``Runtime.preload_at_start``), ahead of the server's Preload.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (parent, child):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    env = {**os.environ, **(environ or {})}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, "-m", "cachemesh.serve.workers.worker", "--fd", str(child.fileno())]
    if memory_limit:
        cmd += ["--memory-limit", str(memory_limit)]
    if warm:
        cmd += ["--warm", json.dumps(warm)]
    try:
        proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], env=env,
                                stdin=subprocess.DEVNULL)
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return Launched(proc, parent)


def local_models(specs: Iterable[Any]) -> list[dict[str, str]]:
    """The models among ``specs`` (``ModelSpec`` or ``ModelDoc``) whose source is a
    local directory, as :func:`launch` takes them for ``warm``."""
    out: list[dict[str, str]] = []
    for spec in specs:
        versions = getattr(spec, "versions", None)
        for v in versions.values() if isinstance(versions, dict) else [spec]:
            source = str(v.source)
            path = source.removeprefix("file://") if source.startswith("file://") else source
            if "://" in path or not os.path.isdir(path):
                continue
            out.append({"path": os.path.abspath(path), "runtime": v.runtime or ""})
    return out


def launch_workers(settings: Settings, specs: Iterable[Any] = ()) -> list[Launched]:
    """The server's workers, started ahead of the server itself (``cachemesh serve``):
    they import the frameworks of the local models in ``specs`` meanwhile."""
    cfg = settings.serve
    warm = local_models(specs)
    return [launch(memory_limit=cfg.worker_memory_limit, threads=cfg.worker_threads,
                   environ=worker_environ(settings), warm=warm)
            for _ in range(cfg.worker_count())]


def worker_environ(settings: Settings) -> dict[str, str]:
    """What a worker sees over the server's environment: the store's home (a runtime
    that pulls, such as an adapter's base, pulls into this store)."""
    return {**settings.environ, "CACHEMESH_HOME": str(settings.home)}


class WorkerHandle:
    """One worker process and the calls in flight to it."""

    def __init__(self, wid: int, on_death: Callable[[WorkerHandle], None]) -> None:
        self.id = wid
        self.on_death = on_death
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self.alive = False
        self.exit_reason = ""
        self.started = time.monotonic()
        self.base_rss = 0  # RSS with no model loaded (frameworks imported so far included)
        self._transport: asyncio.Transport | None = None
        self._ids = itertools.count(1)
        # request id -> (whether it is a load, where its answer goes)
        self._calls: dict[int, tuple[bool, asyncio.Future | asyncio.Queue]] = {}
        self._ready: asyncio.Future | None = None
        self._reaper: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"<worker {self.id} pid {self.pid}{'' if self.alive else ' dead'}>"

    async def start(self, *, memory_limit: int | None, threads: int,
                    environ: dict[str, str] | None = None,
                    launched: Launched | None = None) -> None:
        """``environ``: variables the worker sees over the server's own (the store's
        home: a runtime that pulls, such as an adapter's base, pulls into this store).
        ``launched``: a process :func:`launch` started earlier, to adopt instead."""
        loop = asyncio.get_running_loop()
        if launched is None:
            launched = launch(memory_limit=memory_limit, threads=threads, environ=environ)
        self.proc, parent = launched.proc, launched.sock
        self.pid = self.proc.pid
        self._ready = loop.create_future()
        await loop.create_unix_connection(lambda: _Protocol(self), sock=parent)
        try:
            info = await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT_S)
        except (TimeoutError, WorkerCrashedError) as exc:
            self.kill()
            raise UnavailableError(f"worker {self.id} did not start: {exc}") from exc
        self.base_rss = info.rss
        self.alive = True

    def _on_message(self, message: Ready | Result | Chunk | End | Failure) -> None:
        kind = type(message)
        if kind is Ready:
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(message)
            return
        rid = message.rid  # type: ignore[union-attr]
        entry = self._calls.get(rid)
        if entry is None:
            return  # the caller gave up (timeout); drop the late reply
        load, sink = entry
        if isinstance(sink, asyncio.Queue):
            sink.put_nowait(message)
            if kind is not Chunk:
                del self._calls[rid]
            return
        del self._calls[rid]
        if sink.done():
            return
        if kind is Result:
            sink.set_result(message.value)  # type: ignore[union-attr]
        else:
            sink.set_exception(_error(message, load))  # type: ignore[arg-type]

    def _on_lost(self) -> None:
        was_alive = self.alive or (self._ready is not None and not self._ready.done())
        self.alive = False
        self._transport = None
        # Reap without blocking the event loop: the exit status names the crash.
        self._reaper = asyncio.get_running_loop().create_task(self._reap(was_alive))

    async def _reap(self, was_alive: bool) -> None:
        code = None
        if self.proc is not None:
            deadline = time.monotonic() + 2.0
            while (code := self.proc.poll()) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if code is None:
                self.proc.kill()
                code = await asyncio.to_thread(self.proc.wait)
        self.exit_reason = f"worker {self.id} (pid {self.pid}) {describe_exit(code)}"
        calls, self._calls = self._calls, {}
        for load, sink in calls.values():
            exc = (ModelLoadError if load else WorkerCrashedError)(
                f"{self.exit_reason} while {'loading' if load else 'handling'} the request"
                + ("" if load else "; it is not replayed"))
            if isinstance(sink, asyncio.Queue):
                sink.put_nowait(exc)
            elif not sink.done():
                sink.set_exception(exc)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerCrashedError(self.exit_reason))
        if was_alive:
            self.on_death(self)

    def _send(self, message: Request, sink: asyncio.Future | asyncio.Queue) -> int:
        if self._transport is None or not self.alive:
            raise WorkerCrashedError(f"worker {self.id} is not running ({self.exit_reason})")
        message.rid = rid = next(self._ids)
        self._calls[rid] = (type(message) is Load, sink)
        frames = ipc.encode(message)
        if len(frames) == 1:
            self._transport.write(frames[0])
        else:
            self._transport.writelines(frames)
        return rid

    def call(self, message: Request) -> asyncio.Future:
        """Send one request; the future gets the answer's value (or the translated error)."""
        fut = asyncio.get_running_loop().create_future()
        rid = self._send(message, fut)
        fut.add_done_callback(lambda f: self._calls.pop(rid, None) if f.cancelled() else None)
        return fut

    async def stream(self, message: Stream) -> AsyncIterator[Any]:
        """The chunks of a stream, as the worker sends them."""
        queue: asyncio.Queue = asyncio.Queue()
        rid = self._send(message, queue)
        ended = False
        try:
            while True:
                item = await queue.get()
                kind = type(item)
                if kind is Chunk:
                    yield item.value
                elif kind is End:
                    ended = True
                    return
                else:
                    ended = True
                    raise item if isinstance(item, BaseException) else _error(item, False)
        finally:
            self._calls.pop(rid, None)
            if not ended and self._transport is not None and self.alive:
                # The consumer went away (a client disconnected): stop the generation.
                self._transport.write(ipc.encode(Cancel(rid))[0])

    @property
    def busy(self) -> bool:
        """A call to it (a load, a request, a preload) has not been answered yet."""
        return bool(self._calls)

    def rss(self) -> int:
        return rss_bytes(self.pid) if self.alive else 0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the socket (the worker exits on EOF); kill it if it lingers."""
        self.alive = False
        if self._transport is not None:
            self._transport.close()
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.proc.poll() is None:
            self.kill()
            self.proc.wait()


def _error(failure: Failure, load: bool) -> Exception:
    """The error a failed request raises in the server (``load``: it was a Load)."""
    kind, message = failure.kind, failure.message
    if kind == "input":
        return InferenceInputError(message)
    if kind == "corrupt":
        return ModelLoadError(message, corrupt_blob=failure.corrupt_blob)
    if kind == "load" or load:
        return ModelLoadError(message)
    if kind == "missing":
        return WorkerCrashedError(message)
    return InferenceError(message)
