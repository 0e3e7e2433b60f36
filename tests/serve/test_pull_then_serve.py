"""The README's order, pull then serve: `cachemesh pull ./model --name smol`, then
`cachemesh serve --model smol=./model` serves what the pull fetched (its cache is in
bucket `default`; the server's own caches go to `models`, which a user never needs
to know)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachemesh.caches import Caches
from cachemesh.cli import main
from cachemesh.serve.core.registry import parse_model_option
from tests.serve.conftest import RunningServer, serve_settings


def test_pull_then_serve_the_same_source_under_the_same_name(
        tmp_path: Path, digits_dir: Path, digits_data, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(digits_dir, tmp_path / "model")
    home = tmp_path / "home"
    pulled = CliRunner().invoke(main, ["pull", "./model", "--name", "smol"],
                                env={"CACHEMESH_HOME": str(home)})
    assert pulled.exit_code == 0, pulled.output
    view = Path(pulled.stdout.strip().splitlines()[-1])
    assert view.is_dir()

    settings = serve_settings(home)
    with RunningServer(settings, [parse_model_option("smol=./model")]) as server:
        x, y = digits_data
        body = {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32",
                            "data": x[0].tolist()}]}
        r = server.client.post("/v2/models/smol/infer", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [int(y[0])]
        status = server.client.get("/api/v1/models/smol").json()
        assert status["state"] == "Ready" and status["view"] == str(view)
    # one cache: the pulled one, still where the pull put it
    assert [(c.name, c.bucket) for c in Caches(settings).list()] == [("smol", "default")]
