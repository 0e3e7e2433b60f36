"""``cachemesh demo``: the main job on an embedded default, end to end.

It generates a small model in a local origin folder (never committed: it is
trained here, on first run), pulls it through the cache, and shows where it
lives and what the store holds. Later stages of the demo (serving it) build on
the same pulled view.
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
