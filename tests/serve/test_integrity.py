"""A model whose cached bytes were changed is not served (issue 22, item 9).

The attack: with write access to the store, overwrite part of a cached blob (a
safetensors file, a joblib file), then make the server load the model again.
Before, the model answered (200) from the changed bytes; dedup spread the one
write to every bucket holding the same file. Now every load checks each file's
size and modification time against its blob's commit, and hashes the files that
fail it (all of them with ``CACHEMESH_SERVE_VERIFY_LOADS``): the load fails
naming the file and blob, is not retried on another worker, and the blob is
reported by ``cache verify --quick`` and in the events of every cache holding it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cachemesh.load.integrity import MTIME_SLACK_S
from cachemesh.serve.core.registry import ModelSpec
from tests.serve.conftest import TOY, RunningServer, free_port, serve_settings

X = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
ONE = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0]}]}


def weights_model(root: Path) -> Path:
    d = root / "weights"
    d.mkdir(parents=True)
    shutil.copy(TOY, d / "toy.py")
    save_file({"w": torch.ones(64 * 1024), "b": torch.arange(16 * 1024, dtype=torch.float32)},
              d / "model.safetensors")
    return d


def overwrite_blob(blob: Path, offset: int, data: bytes, *, hide: bool = False) -> None:
    """Write into a read-only blob as its owner would; ``hide``: put its times back."""
    st = blob.stat()
    blob.chmod(0o644)
    with open(blob, "r+b") as f:
        f.seek(offset)
        f.write(data)
    blob.chmod(0o444)
    if hide:
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))


def blob_of(server: RunningServer, cache: str, name: str) -> tuple[str, Path]:
    caches = server.service.caches
    (row,) = caches.db.query("SELECT sha256 FROM files WHERE cache = ? AND path = ?",
                             (cache, name))
    return row["sha256"], caches.store.blobs.path(row["sha256"])


def reload(server: RunningServer, model: str, body: dict):
    assert server.client.post(f"/v2/repository/models/{model}/unload").status_code == 200
    return server.client.post(f"/v2/models/{model}/infer", json=body)


def test_changed_weights_fail_the_load_in_every_bucket_that_shares_them(tmp_path, digits_dir):
    root = tmp_path / "models"
    weights = weights_model(root)
    specs = [ModelSpec(name="digits", source=str(digits_dir)),
             ModelSpec(name="digits2", source=str(digits_dir), bucket="other"),
             ModelSpec(name="w", source=str(weights), runtime="custom",
                       parameters={"class": "toy:Weights"})]
    with RunningServer(serve_settings(tmp_path / "home"), specs) as server:
        for model, body in (("digits", X), ("digits2", X), ("w", ONE)):
            answer = server.client.post(f"/v2/models/{model}/infer", json=body)
            assert answer.status_code == 200, answer.text
        caches = server.service.caches
        assert caches.verify(rehash=False) == []
        # The cheap check allows the commit's clock 2 s of slack (MTIME_SLACK_S): the
        # attack comes later than that.
        time.sleep(MTIME_SLACK_S + 0.5)

        # 4 KiB zeroed inside the joblib blob (shared by both buckets).
        sha, blob = blob_of(server, "digits", "model.joblib")
        assert blob_of(server, "digits2", "model.joblib")[0] == sha
        overwrite_blob(blob, blob.stat().st_size // 2, b"\0" * 4096)
        for model in ("digits", "digits2"):
            answer = reload(server, model, X)
            assert answer.status_code == 500, answer.text
            error = answer.json()["error"]
            assert "model.joblib" in error and f"sha256:{sha}" in error
            assert "changed after it was cached" in error
        status = server.client.get("/api/v1/models/digits").json()
        assert status["state"] == "Failed" and "1 failed loads" in status["reason"]
        problems = caches.verify(rehash=False)  # --quick: the blob a load reported
        assert [(p.kind, p.subject) for p in problems] == [("corrupt-blob", sha)]
        events = {c: [e.kind for e in caches.events(c)] for c in ("digits", "digits2")}
        assert all("corrupt-blob" in kinds for kinds in events.values()), events

        # 64 KiB overwritten inside a safetensors blob: hashed as the loader reads it.
        sha, blob = blob_of(server, "w", "model.safetensors")
        overwrite_blob(blob, 4096, os.urandom(64 * 1024))
        answer = reload(server, "w", ONE)
        assert answer.status_code == 500 and f"sha256:{sha}" in answer.json()["error"]


def test_a_verified_load_finds_a_change_that_hid_its_traces(tmp_path, digits_dir):
    root = tmp_path / "models"
    weights = weights_model(root)
    specs = [ModelSpec(name="digits", source=str(digits_dir)),
             ModelSpec(name="w", source=str(weights), runtime="custom",
                       parameters={"class": "toy:Weights"})]
    settings = serve_settings(tmp_path / "home")
    with RunningServer(settings, specs) as server:
        for model, body in (("digits", X), ("w", ONE)):
            assert server.client.post(f"/v2/models/{model}/infer", json=body).status_code == 200
        _, joblib_blob = blob_of(server, "digits", "model.joblib")
        _, st_blob = blob_of(server, "w", "model.safetensors")
        overwrite_blob(joblib_blob, joblib_blob.stat().st_size - 8, b"\0" * 4, hide=True)
        overwrite_blob(st_blob, 4096, b"\x7f" * 4096, hide=True)
        # The cheap check cannot see it (same size, old modification time): it loads.
        assert reload(server, "w", ONE).status_code == 200
    verified = dataclasses.replace(settings, serve=dataclasses.replace(
        settings.serve, verify_loads=True, port=free_port()))
    with RunningServer(verified, specs) as server:
        for model, body in (("digits", X), ("w", ONE)):
            answer = server.client.post(f"/v2/models/{model}/infer", json=body)
            assert answer.status_code == 500, answer.text
            assert "was changed after it was cached" in answer.json()["error"]


@pytest.mark.parametrize("touched", [True, False])
def test_right_bytes_load_whatever_their_times(tmp_path, digits_dir, touched):
    settings = serve_settings(tmp_path / "home")
    with RunningServer(settings, [ModelSpec(name="digits", source=str(digits_dir))]) as server:
        assert server.client.post("/v2/models/digits/infer", json=X).status_code == 200
        _, blob = blob_of(server, "digits", "model.joblib")
        if touched:  # a newer mtime without a change: hashed, found right, loaded
            os.utime(blob, (time.time() + 3600, time.time() + 3600))
        assert reload(server, "digits", X).status_code == 200
        assert server.service.caches.verify(rehash=False) == []
