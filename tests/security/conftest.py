"""Fixtures of the security tests: a server with every token set and a protected bucket.

``secured`` is one real server (uvicorn on a free loopback port, one worker
process) shared by the session: the fuzzing, the authentication checks and the
protected-bucket checks all talk to it. Its models:

    echo     bucket models (open)     a plain echo
    faulty   bucket models (open)     raises inside predict: a fault of the model
    secret   bucket team-a (protected) a plain echo; seen only with team-a's token
    digits   bucket models (open)     the demo's sklearn SVM
    parrot   bucket models (open)     generates (the OpenAI endpoints' payloads)

Tokens are long and distinctive, so that a grep for them cannot miss a leak.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh.caches import Caches
from cachemesh.serve.core.registry import MemoryModelRegistry, ModelSpec
from tests.serve.conftest import RunningServer, digits_data, digits_dir, serve_settings

__all__ = ["digits_data", "digits_dir"]  # the session fixtures of tests/serve, shared here

TOYS = Path(__file__).with_name("toys.py")

CONTROL_TOKEN = "cmtest-CONTROL-7d1f3a9e5b2c4d8f0a6e1b3c5d7f9a2e"
INFERENCE_TOKEN = "cmtest-INFERENCE-2b4d6f8a0c1e3a5c7e9b1d3f5a7c9e0b"
METRICS_TOKEN = "cmtest-METRICS-9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
BUCKET_TOKEN = "cmtest-BUCKET-a1b2c3d4e5f60718293a4b5c6d7e8f90"
SECRETS = (CONTROL_TOKEN, INFERENCE_TOKEN, METRICS_TOKEN, BUCKET_TOKEN)

# Headers that carry each token.
AS_CONTROL = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
AS_INFERENCE = {"Authorization": f"Bearer {INFERENCE_TOKEN}"}
AS_METRICS = {"Authorization": f"Bearer {METRICS_TOKEN}"}
WITH_BUCKET = {"X-Cachemesh-Bucket-Token": BUCKET_TOKEN}
PROTECTED = "team-a"


def toy(root: Path, name: str, cls: str = "Echo", bucket: str = "models", **kw) -> ModelSpec:
    """A model folder with toys.py in it, and the spec that serves it."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOYS, folder / "toy.py")
    (folder / "weights.bin").write_bytes(b"\0" * 256)
    return ModelSpec(name=name, source=str(folder), runtime="custom", bucket=bucket,
                     parameters={"class": f"toy:{cls}"}, **kw)


def secured_settings(home: Path, roots: tuple[Path, ...] = (), **serve):
    settings = serve_settings(home, source_roots=roots, **serve)
    # Hubs on a closed port: a fuzzed hf:// or ms:// source fails at once, offline.
    environ = {**settings.environ, "HF_ENDPOINT": "http://127.0.0.1:9",
               "MODELSCOPE_DOMAIN": "127.0.0.1:9"}
    return dataclasses.replace(settings, api_token=CONTROL_TOKEN, inference_token=INFERENCE_TOKEN,
                               metrics_token=METRICS_TOKEN, environ=environ)


@dataclasses.dataclass
class Secured:
    server: RunningServer
    home: Path
    models_root: Path  # the deployable root (CACHEMESH_SERVE_SOURCE_ROOTS)
    caches: Caches

    @property
    def client(self):
        return self.server.client

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secured-models")
    home = tmp_path_factory.mktemp("secured-home")
    settings = secured_settings(home, roots=(root,), workers=1, max_body=4 * 1024**2,
                                max_control_body=64 * 1024)
    caches = Caches(settings)
    caches.protect_bucket(PROTECTED, BUCKET_TOKEN)
    specs = [toy(root, "echo", eager=True), toy(root, "faulty", cls="Faulty"),
             toy(root, "parrot", cls="Parrot", eager=True),
             toy(root, "secret", bucket=PROTECTED, eager=True),
             ModelSpec(name="digits", source=str(digits_dir), eager=True)]
    with RunningServer(settings, specs, registry=MemoryModelRegistry()) as server:
        server.wait_ready()
        yield Secured(server, home, root, caches)
