"""``cachemesh serve`` start-up failures a user meets: one line, no traceback, non-zero exit.

The command runs as a user runs it (a subprocess), against a port that another
socket holds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.conftest import free_port


@pytest.fixture
def held() -> Iterator[int]:
    """A port another process would hold: bound and listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def serve(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CACHEMESH_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "cachemesh", "serve", "--workers", "1", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "Application startup failed" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert done.stdout == ""
    return lines[0]


def test_a_taken_http_port_names_itself_and_the_flag(tmp_path: Path, held: int):
    line = one_line(serve(tmp_path, "--port", str(held), "--grpc-port", str(free_port())))
    assert line == (f"error: HTTP port {held} on 127.0.0.1 is taken (another server listens"
                    " on it): choose another with --port")


def test_a_taken_grpc_port_is_found_before_anything_starts(tmp_path: Path, held: int):
    done = serve(tmp_path, "--port", str(free_port()), "--grpc-port", str(held))
    line = one_line(done)
    assert line == (f"error: gRPC port {held} on 127.0.0.1 is taken (another server listens"
                    " on it): choose another with --grpc-port (0 turns gRPC off)")
    assert "serving" not in done.stderr


def test_a_grpc_port_lost_after_the_check_is_one_line_too(tmp_path: Path):
    """The window between the check and grpcio's bind: the server stops with the
    one-line error, without Starlette's traceback."""
    script = textwrap.dedent(f"""
        import dataclasses, socket, sys
        from cachemesh.config import Settings
        from cachemesh.errors import CachemeshError
        from cachemesh.serve.adapters.ports import take_ports
        from cachemesh.serve.adapters.server import run
        s = Settings.from_env({{"CACHEMESH_HOME": {str(tmp_path)!r}}})
        s = dataclasses.replace(s, serve=dataclasses.replace(
            s.serve, host="127.0.0.1", port=0, grpc_port={free_port()}, workers=1))
        ports = take_ports(s.serve)
        thief = socket.socket()
        thief.bind(("127.0.0.1", s.serve.grpc_port))
        thief.listen()
        try:
            run(s, ports=ports)
        except CachemeshError as exc:
            print("error:", exc, file=sys.stderr)
            sys.exit(4)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr and "Application startup failed" not in done.stderr
    assert "cannot serve gRPC on 127.0.0.1" in done.stderr
