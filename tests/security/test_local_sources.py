"""Local and NAS paths (issue 22, item 1): over the API only from the deployable roots,
and never a file that only some local users may read made readable by all."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh.caches import Caches, make_spec
from cachemesh.config import Settings
from cachemesh.errors import ForbiddenError
from cachemesh.serve.core.registry import MemoryModelRegistry
from tests.security.conftest import toy
from tests.serve.conftest import RunningServer, serve_settings

NOBODY = 65534
V2 = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every local user can traverse (pytest's tmp folders are 0700: a store
    there is private whatever cachemesh does, and would hide what is tested here)."""
    path = Path(tempfile.mkdtemp(prefix="cachemesh-local-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody_reads(path: Path) -> bool:
    return subprocess.run(["cat", str(path)], user=NOBODY, group=NOBODY, extra_groups=[],
                          capture_output=True).returncode == 0


# -- over the API -------------------------------------------------------------------------

@pytest.fixture
def no_roots(tmp_path: Path) -> Iterator[RunningServer]:
    """A server with the defaults: no CACHEMESH_SERVE_SOURCE_ROOTS. Its one model was
    given on the command line (the operator typed it), from a local folder."""
    settings = serve_settings(tmp_path / "home", source_roots=())
    with RunningServer(settings, [toy(tmp_path / "models", "typed")],
                       registry=MemoryModelRegistry()) as server:
        server.wait_ready()
        yield server


def test_without_source_roots_the_api_takes_no_local_path(no_roots: RunningServer,
                                                          tmp_path: Path):
    c = no_roots.client
    private = tmp_path / "rootonly"
    private.mkdir(mode=0o700)
    (private / "secret.txt").write_text("not for the API")
    (private / "secret.txt").chmod(0o600)
    for body in ({"name": "grab", "source": str(private)},
                 {"name": "grab", "source": f"file://{private}"},
                 {"name": "grab", "source": "/etc"},
                 {"Name": "grab", "DataSource": {"Type": "NAS", "Options": {
                     "server": "localhost", "path": str(private)}}}):
        r = c.post("/api/v1/datacaches", json=body)
        assert r.status_code == 400, r.text
        assert "CACHEMESH_SERVE_SOURCE_ROOTS" in r.json()["error"], r.text
    folder = toy(tmp_path / "models", "late")
    for r in (c.post("/api/v1/models", json=folder.model_dump()),
              c.put("/api/v1/models/late", json={"versions": {"v1": {
                  "source": folder.source, "runtime": "custom",
                  "parameters": {"class": "toy:Echo"}}}}),
              c.post("/v2/repository/models/late/load", json={"parameters": {
                  "source": folder.source, "runtime": "custom", "class": "toy:Echo"}})):
        assert r.status_code == 400 and "CACHEMESH_SERVE_SOURCE_ROOTS" in r.text, r.text
    assert c.get("/api/v1/models/late").status_code == 404
    caches = Caches(no_roots.settings)
    assert not caches.exists("grab") and not caches.exists("late")
    assert not (no_roots.settings.home / "buckets" / "default").exists()

    # What the operator typed serves; a view of the store is no local path of the node's.
    assert c.post("/v2/models/typed/infer", json=V2).status_code == 200
    view = c.get("/api/v1/models/typed").json()["view"]
    r = c.post("/api/v1/models", json={"name": "again", "source": view, "runtime": "custom",
                                       "parameters": {"class": "toy:Echo"}})
    assert r.status_code == 201, r.text
    assert c.post("/v2/models/again/infer", json=V2).status_code == 200


# -- files only their owner may read ----------------------------------------------------------

def _origin(root: Path) -> Path:
    origin = root / "origin"
    (origin / "closed").mkdir(parents=True)
    (origin / "public.txt").write_text("anyone")
    (origin / "owner-only.txt").write_text("mine")
    (origin / "owner-only.txt").chmod(0o600)
    (origin / "closed" / "readable.txt").write_text("readable, in a closed folder")
    (origin / "closed").chmod(0o700)
    return origin


def test_a_file_others_cannot_read_is_never_put_in_an_open_bucket(open_folder: Path):
    origin = _origin(open_folder)
    home = open_folder / "home"
    caches = Caches(Settings.from_env({"CACHEMESH_HOME": str(home)}))
    with pytest.raises(ForbiddenError) as refused:
        caches.ensure(make_spec(name="grab", source=str(origin)))
    message = str(refused.value)
    assert "owner-only.txt" in message and "closed/readable.txt" in message, message
    assert "protected bucket" in message and "public.txt" not in message, message
    assert not caches.exists("grab")
    assert not [p for p in (home / "blobs").rglob("*") if p.is_file()]
    assert not (home / "buckets" / "default" / "grab").exists()
    # Where the folder itself is open and the file 0640 (as /etc/shadow is), the same.
    single = origin / "group.txt"
    single.write_text("group only")
    single.chmod(0o640)
    with pytest.raises(ForbiddenError):
        caches.ensure(make_spec(name="one", source=str(single)))

    # A protected bucket keeps the restriction: its folder is 0700.
    caches.protect_bucket("team-a")
    view = caches.ensure(make_spec(name="grab", source=str(origin), bucket="team-a")).view
    assert (view / "owner-only.txt").read_text() == "mine"
    assert stat.S_IMODE(os.stat(home / "buckets" / "team-a").st_mode) == 0o700
    if os.geteuid() == 0:
        assert not _as_nobody_reads(view / "owner-only.txt")
        assert not _as_nobody_reads(view / "public.txt")
    # Files every local user reads go anywhere.
    (origin / "owner-only.txt").unlink()
    single.unlink()
    shutil.rmtree(origin / "closed")
    open_view = caches.ensure(make_spec(name="fine", source=str(origin))).view
    if os.geteuid() == 0:
        assert _as_nobody_reads(open_view / "public.txt")
    assert caches.verify() == []


def test_a_store_that_others_cannot_reach_widens_nothing(tmp_path: Path):
    """Under a folder closed to others (here pytest's own, 0700) an open bucket is
    no more readable than the owner-only file: the pull goes on."""
    origin = _origin(tmp_path)
    caches = Caches(Settings.from_env({"CACHEMESH_HOME": str(tmp_path / "home")}))
    view = caches.ensure(make_spec(name="mine", source=str(origin))).view
    assert (view / "owner-only.txt").read_text() == "mine"
