"""The server's ports, taken before anything else starts.

``cachemesh serve`` calls :func:`take_ports` first: before workers are spawned,
before the web stack is imported, so that a port another process holds is one
line (which port, which flag changes it) and no traceback. The HTTP socket is
bound here and handed to uvicorn, so nothing can take it in between; the gRPC
port is only tried (grpcio binds its own socket when the app starts), which
leaves a window of a few hundred milliseconds, where a loss is still reported
in one line (``server.run``), after grpcio's own native log line.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from ...config import ServeSettings
from ...errors import ConflictError


@dataclass
class Ports:
    http: socket.socket  # bound, not listening yet: uvicorn listens on it
    http_port: int  # the port it got (--port 0: one the system chose)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn and grpcio bind: a port left in TIME_WAIT by a server that just
    # stopped is free; one that a live server listens on is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _taken(what: str, host: str, port: int, flag: str, exc: OSError) -> ConflictError:
    why = ("is taken (another server listens on it)" if exc.errno == errno.EADDRINUSE
           else f"cannot be used ({exc.strerror})")
    return ConflictError(f"{what} port {port} on {host} {why}: choose another with {flag}")


def take_ports(cfg: ServeSettings) -> Ports:
    """Bind the HTTP port and try the gRPC port (unless it is 0: gRPC off); a port that
    is taken raises :class:`ConflictError` naming it and the flag that changes it."""
    try:
        http = _bind(cfg.host, cfg.port)
    except OSError as exc:
        raise _taken("HTTP", cfg.host, cfg.port, "--port", exc) from None
    try:
        if cfg.grpc_port:
            try:
                _bind(cfg.host, cfg.grpc_port).close()
            except OSError as exc:
                raise _taken("gRPC", cfg.host, cfg.grpc_port,
                             "--grpc-port (0 turns gRPC off)", exc) from None
    except BaseException:
        http.close()
        raise
    http.set_inheritable(True)
    return Ports(http, http.getsockname()[1])
