"""Server fixtures: settings -> models on disk -> a real server on a free loopback port -> clients.

``RunningServer`` runs the real thing (uvicorn, worker processes) in a thread
of the test process, so a test can talk HTTP to it and also look at its
service. The expensive one (``v2``) is shared by the session; tests that kill
workers or fill memory start their own.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cachemesh.config import Settings
from cachemesh.demo import make_demo_model
from cachemesh.serve.adapters.server import make_server
from cachemesh.serve.core.registry import MemoryModelRegistry, ModelRegistry, ModelSpec
from cachemesh.serve.core.service import ModelService

TOY = Path(__file__).with_name("toy_models.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_settings(home: Path, **serve: Any) -> Settings:
    base = Settings.from_env({"CACHEMESH_HOME": str(home)})
    serve.setdefault("port", free_port())
    serve.setdefault("workers", 1)
    serve.setdefault("memory", 4 * 1024**3)
    # The tests deploy toy models from their own folders over the API: an operator who
    # allows any local path. The default (none) is tested in tests/security.
    serve.setdefault("source_roots", (Path("/"),))
    return dataclasses.replace(base, serve=dataclasses.replace(base.serve, **serve))


def toy_model(root: Path, name: str, cls: str = "Echo", **params: Any) -> ModelSpec:
    """A model directory with toy.py in it, and the spec that serves it."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOY, d / "toy.py")
    (d / "weights.bin").write_bytes(b"\0" * int(params.pop("disk_bytes", 1024)))
    eager = bool(params.pop("eager", False))
    return ModelSpec(name=name, source=str(d), runtime="custom", eager=eager,
                     parameters={"class": f"toy:{cls}", **{k: str(v) for k, v in params.items()}})


class RunningServer:
    """``grpc=False`` (the default) turns gRPC off whatever the settings say: the
    default port 8033 is one port, shared by every server of a test run."""

    def __init__(self, settings: Settings, specs: list[ModelSpec],
                 registry: ModelRegistry | None = None, *, grpc: bool = False) -> None:
        if not grpc:
            settings = dataclasses.replace(
                settings, serve=dataclasses.replace(settings.serve, grpc_port=0))
        self.settings = settings
        self.service = ModelService(settings, registry=registry or MemoryModelRegistry())
        self.server = make_server(settings, specs, service=self.service)
        self.url = f"http://127.0.0.1:{settings.serve.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died during start-up")
            try:
                if self.client.get("/v2/health/live").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not start")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's digits SVM (joblib + MLServer model-settings.json), trained once."""
    return make_demo_model(tmp_path_factory.mktemp("origin"))


@pytest.fixture(scope="session")
def digits_data() -> tuple[Any, Any]:
    from sklearn import datasets

    d = datasets.load_digits()
    return (d.images.reshape(len(d.images), -1) / 16.0).astype("float32"), d.target


@pytest.fixture(scope="session")
def v2(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Iterator[RunningServer]:
    """One server for the protocol tests: the digits SVM (eager) and an echo model."""
    root = tmp_path_factory.mktemp("models")
    specs = [
        ModelSpec(name="digits", source=str(digits_dir), eager=True),
        ModelSpec(name="digits-v", source=str(digits_dir), version="7"),
        toy_model(root, "echo", eager=True),
        toy_model(root, "chatty", cls="Chatty"),
    ]
    settings = serve_settings(tmp_path_factory.mktemp("home"), workers=2)
    with RunningServer(settings, specs) as server:
        server.wait_ready()
        yield server
