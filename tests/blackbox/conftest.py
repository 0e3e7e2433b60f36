"""Black-box fixtures: cachemesh as its users meet it.

The command line runs through its entry point, ``cachemesh.cli:main`` (click's
runner, in this process; the installed ``cachemesh`` script in a process of its
own for commands that import torch), the server as ``cachemesh serve`` in a
process of its own, reached over HTTP (httpx) and gRPC (tritonclient) on
loopback; a custom model is a folder that ships a subclass of the public
``cachemesh.runtimes.Runtime``. Nothing here imports cachemesh's internals, so
these tests need no change while the code behind them is reorganised (issue
16): they are what shows that the reorganisation changed no behaviour.

Session fixtures: an origin folder holding the demo's two models (built by
``cachemesh demo``) and the toy models, and one server that the modules share
(two workers, tokens on, local sources allowed from the origin folder, bucket
``secure`` protected). Each test uses models of its own names.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

PREFIXES = ("CACHEMESH_", "HF_", "HUGGINGFACE_", "AWS_", "MODELSCOPE_", "TRANSFORMERS_")
CONTROL_TOKEN = "blackbox-control-token-5f2a9c31"
INFERENCE_TOKEN = "blackbox-inference-token-8d41e7b0"
TOY = Path(__file__).with_name("toy_runtime.py")


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("cachemesh")  # the entry point users run
    return [str(script)] if script.exists() else [sys.executable, "-m", "cachemesh"]


CLI = _cli()


def environ(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a command: this one without cachemesh's and the hubs'
    variables (no developer store, no token), the store at ``home``, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    env["CACHEMESH_HOME"] = str(home)
    env["HF_HOME"] = str(home.parent / "hf-home")  # no token file of the developer's
    env.update(extra)
    return env


def cm(env: dict[str, str], *args: str, check: bool = True, stdin: str | None = None,
       own_process: bool = False) -> subprocess.CompletedProcess:
    """Run ``cachemesh ARGS`` in the environment ``env``; with ``check``, fail the test on a
    non-zero exit. The entry point runs in this process (click's runner: a command costs
    milliseconds, not the 0.2 s of CPU a new interpreter takes), or with ``own_process``
    as the installed script in a process of its own (for commands that import torch)."""
    if own_process:
        proc = subprocess.run([*CLI, *args], env=env, input=stdin, capture_output=True,
                              text=True, timeout=300)
    else:
        proc = _invoke(env, args, stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"cachemesh {' '.join(args)} exited {proc.returncode}:"
                             f" {proc.stderr}")
    return proc


def _invoke(env: dict[str, str], args: tuple[str, ...], stdin: str | None
            ) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    from cachemesh.cli import main

    changes: dict[str, str | None] = {k: None for k in os.environ
                                      if k.startswith(PREFIXES) and k not in env}
    changes.update({k: v for k, v in env.items() if os.environ.get(k) != v})
    result = CliRunner().invoke(main, list(args), input=stdin, env=changes,
                                prog_name="cachemesh")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"cachemesh {' '.join(args)} raised") from result.exception
    return subprocess.CompletedProcess(["cachemesh", *args], result.exit_code, result.stdout,
                                       result.stderr)


def cm_json(env: dict[str, str], *args: str, own_process: bool = False) -> Any:
    return json.loads(cm(env, *args, own_process=own_process).stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_model(root: Path, name: str, disk_bytes: int = 1024) -> Path:
    """A model folder: the toy runtime as ``toy.py`` and a weights file of ``disk_bytes``."""
    folder = root / "toys" / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOY, folder / "toy.py")
    with open(folder / "weights.bin", "wb") as f:
        f.write(os.urandom(min(disk_bytes, 4096)))
        f.write(b"\0" * max(disk_bytes - 4096, 0))
    return folder


def toy_spec(root: Path, name: str, disk_bytes: int = 1024, **params: Any) -> dict[str, Any]:
    """The body of ``POST /api/v1/models`` for a toy model named ``name``."""
    return {"name": name, "source": str(toy_model(root, name, disk_bytes)), "runtime": "custom",
            "parameters": {"class": "toy:Toy", **{k: str(v) for k, v in params.items()}}}


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


class Server:
    """``cachemesh serve`` in a process of its own; its output goes to a log file."""

    def __init__(self, home: Path, *args: str, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = home.parent / f"serve-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*CLI, "--home", str(home), "serve", "--port", str(self.port),
                 "--grpc-port", str(self.grpc_port), *args],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        wait_until(self._live, 60, "the server to listen")

    # Headers with the server's tokens: a new dict each time (tritonclient adds to the one
    # it is given), with lower-case names (gRPC metadata takes no others).
    @property
    def control(self) -> dict[str, str]:
        return {"authorization": f"Bearer {CONTROL_TOKEN}"}

    @property
    def infer(self) -> dict[str, str]:
        return {"authorization": f"Bearer {INFERENCE_TOKEN}"}

    def _live(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited {self.proc.returncode}: {self.log()}")
        try:
            return self.http.get("/v2/health/live").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(lambda: self.http.get("/v2/health/ready").status_code == 200, timeout,
                   "the server to be ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def model(self, name: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/models/{name}", headers=self.control)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_state(self, name: str, state: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(lambda: (m := self.model(name))["state"] == state and m, timeout,
                          f"model {name} to be {state}")

    def deploy(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post("/api/v1/models", json=spec, headers=self.control)
        assert r.status_code == 201, r.text
        return r.json()

    def workers(self) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/models", headers=self.control)
        return r.json()["memory"]["workers"]

    def grpc(self) -> Any:
        import tritonclient.grpc as tg

        return tg.InferenceServerClient(self.grpc_url)

    def stop(self) -> None:
        pids = [w["pid"] for w in self.workers()] if self.proc.poll() is None else []
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:  # workers die with the server; make sure of it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


_BUILD_ORIGINS = """
import sys
from pathlib import Path
from cachemesh.demo import make_demo_model
import json, os, pathlib
from cachemesh.demo_llm import tiny_llama, train_tokenizer
root = Path(sys.argv[1])
make_demo_model(root)
corpus = [line.strip() for m in (json, os, pathlib) for line in (m.__doc__ or "").splitlines()
          if line.strip()] * 4
tiny_llama(root / "tiny-chat", train_tokenizer(corpus, vocab_size=1000), hidden_size=128,
           intermediate_size=256, layers=4, context=2048, max_new_tokens=32, template_file=False)
"""


@pytest.fixture(scope="session")
def origins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local origin: the demo's ``digits-svm``, a random ``tiny-chat``, and toy models.

    Built in a child process (torch stays out of the test process), with the
    package's own model builders: the demo's digits SVM, and the tiny Llama the
    demo served before it served SmolLM2.
    """
    root = tmp_path_factory.mktemp("origins")
    subprocess.run([sys.executable, "-c", _BUILD_ORIGINS, str(root)], check=True, timeout=300)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # as an origin usually is; a private file is its own case
    return root


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, origins: Path, hf_hub: Any
           ) -> Iterator[Server]:
    """The shared server: digits (sklearn) and echo (toy) loaded at start; two workers,
    control and inference tokens, bucket ``secure`` protected, --max-body 1 MiB."""
    home = tmp_path_factory.mktemp("serve") / "home"
    env = environ(home, CACHEMESH_API_TOKEN=CONTROL_TOKEN,
                  CACHEMESH_INFERENCE_TOKEN=INFERENCE_TOKEN,
                  CACHEMESH_SERVE_SOURCE_ROOTS=str(origins),
                  CACHEMESH_SERVE_FAILED_TTL="600", CACHEMESH_SERVE_LOAD_ATTEMPTS="2",
                  CACHEMESH_FETCH_RETRIES="1", CACHEMESH_RETRY_BACKOFF="0.01",
                  HF_ENDPOINT=hf_hub.url)
    secure_token = cm(env, "bucket", "protect", "secure").stdout.strip()
    config = home.parent / "models.yaml"
    config.write_text(json.dumps({"models": [
        {"name": "digits", "source": str(origins / "digits-svm"), "eager": True},
        {"name": "echo", "source": str(toy_model(origins, "echo")), "runtime": "custom",
         "eager": True, "parameters": {"class": "toy:Toy"}},
    ]}))
    srv = Server(home, "--workers", "2", "--memory", "2GiB", "--copy-rate", "0",
                 "--max-body", "1MiB", "--config", str(config), env=env)
    srv.secure_token = secure_token  # type: ignore[attr-defined]
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
