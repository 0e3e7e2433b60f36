"""``cachemesh demo``: the main job on an embedded default, end to end.

It generates a small model in a local origin folder (never committed: it is
trained here, on first run), pulls it through the cache, shows where it lives
and what the store holds, then serves it over KServe V2 REST (in a worker
process, loaded before the server reports ready) and prints requests that work
against it, until Ctrl-C.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .config import Settings, format_size

DEMO_NAME = "digits-svm"


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


def run_demo(settings: Settings, origin: Path | None = None) -> Path:
    from .caches import Caches, make_spec
    from .progress import PullBar

    origin = origin or default_origin(settings)
    model_dir = make_demo_model(origin)
    click.echo(f"origin:  {model_dir}  (a local folder standing in for a NAS or bucket)")
    caches = Caches(settings)
    spec = make_spec(name=DEMO_NAME, source=str(model_dir), bucket="demo")
    with PullBar(DEMO_NAME) as bar:
        result = caches.ensure(spec, on_progress=bar.update)
    click.echo(f"pulled:  {result.files_fetched} file(s) fetched, {result.files_reused} reused")
    click.echo(f"store:   {settings.home}")
    click.echo(f"view:    {result.view}")
    for path in sorted(result.view.rglob("*")):
        if path.is_file():
            click.echo(f"           {path.relative_to(result.view)}  ({format_size(path.stat().st_size)})")
    report = caches.du()
    click.echo(f"du:      logical {format_size(report['logical_bytes'])},"
               f" physical {format_size(report['physical_bytes'])}")
    problems = caches.verify(DEMO_NAME)
    click.echo(f"verify:  {'ok' if not problems else problems}")
    click.echo("mount it read-only into a container, e.g.:")
    click.echo(f"  docker run -v {result.view}:/models/{DEMO_NAME}:ro ...")
    return result.view


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
    body = {"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": pixels}]}
    path = origin / "request.json"
    path.write_text(json.dumps(body) + "\n")
    return path, int(digits.target[index])


def serve_demo(settings: Settings, origin: Path | None = None, port: int | None = None) -> None:
    """Serve the demo model until Ctrl-C, after printing example requests."""
    import dataclasses

    from .serve.registry import ModelSpec
    from .serve.server import run

    origin = origin or default_origin(settings)
    model_dir = make_demo_model(origin)
    request, label = write_demo_request(origin)
    port = _free_port(8008) if port is None else port
    settings = dataclasses.replace(settings, serve=dataclasses.replace(
        settings.serve, host="127.0.0.1", port=port, workers=settings.serve.workers or 1,
        grpc_port=_free_port(settings.serve.grpc_port) if settings.serve.grpc_port else 0))
    url = f"http://127.0.0.1:{port}"
    spec = ModelSpec(name=DEMO_NAME, source=str(model_dir), eager=True)

    def started() -> None:
        click.echo(f"""
serving: {url}  (model {DEMO_NAME!r}: loads in a worker process; ready when /v2/health/ready says so)

Try it from another terminal (the request holds a handwritten {label}; the answer says {label}):

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

  import numpy as np, tritonclient.http as th
  c = th.InferenceServerClient("127.0.0.1:{port}")
  x = th.InferInput("predict", [1, 64], "FP32")
  x.set_data_from_numpy(np.array([body["inputs"][0]["data"]], dtype=np.float32))
  print(c.infer("{DEMO_NAME}", [x]).as_numpy("predict"))

Ctrl-C to stop.""")

    run(settings, [spec], on_started=started)
