"""Protected buckets: on disk (modes, other users, hub/), over the API, and for inference."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachemesh.access import INTERNAL, Principal, acting_as
from cachemesh.caches import Caches, make_spec
from cachemesh.cli import main
from cachemesh.config import Settings
from cachemesh.errors import CacheNotFoundError, ConflictError, StoreError
from cachemesh.serve.core.registry import MemoryModelRegistry
from cachemesh.serve.datacache.datacache_service import get_visible_cache, visible_caches
from cachemesh.store.buckets import REFRESH_S
from tests.conftest import model_files
from tests.emulators.hf_hub import HfHubEmulator
from tests.security.conftest import (
    AS_CONTROL,
    AS_INFERENCE,
    BUCKET_TOKEN,
    PROTECTED,
    WITH_BUCKET,
    toy,
)
from tests.serve.conftest import RunningServer, serve_settings

NOBODY = 65534
V2 = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder other users can traverse (pytest's own tmp folders are 0700), so that
    a test of what another user can read does not pass for the wrong reason."""
    path = Path(tempfile.mkdtemp(prefix="cachemesh-security-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), user=NOBODY, group=NOBODY, extra_groups=[],
                          capture_output=True, text=True)


def store_in(shared: Path) -> tuple[Settings, Caches, Path]:
    settings = Settings.from_env({"CACHEMESH_HOME": str(shared / "home")})
    origin = shared / "origin"
    for rel, data in model_files(seed=7).items():
        (origin / rel).parent.mkdir(parents=True, exist_ok=True)
        (origin / rel).write_bytes(data)
    os.system(f"chmod -R a+rX {origin}")
    return settings, Caches(settings), origin


# -- on disk --------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_reads_open_views_but_nothing_of_a_protected_bucket(shared: Path):
    settings, caches, origin = store_in(shared)
    caches.ensure(make_spec(name="pub", source=str(origin), bucket="public"))
    caches.ensure(make_spec(name="priv", source=str(origin), bucket=PROTECTED, path="m"))
    pub = Path(caches.get("pub").view) / "config.json"
    priv = Path(caches.get("priv").view) / "config.json"
    # The same bytes in both: one blob, one inode, linked from both views.
    assert os.stat(pub).st_ino == os.stat(priv).st_ino
    assert as_nobody("cat", str(priv)).returncode == 0  # positive control: open before

    r = CliRunner().invoke(main, ["--home", str(settings.home), "bucket", "protect", PROTECTED])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[0]
    assert token.startswith("cmb_") and len(token) >= 40

    home = settings.home
    assert mode(home / "buckets" / PROTECTED) == 0o700
    assert mode(home / "buckets" / "public") == 0o755
    for private in ("blobs", "tmp", "locks"):
        assert mode(home / private) == 0o700, private
    for db in home.glob("meta.db*"):
        assert mode(db) == 0o600, db
    assert mode(priv) == 0o444  # the file keeps its mode: the folders protect it

    assert as_nobody("cat", str(pub)).returncode == 0
    denied = as_nobody("cat", str(priv))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert as_nobody("ls", str(home / "buckets" / PROTECTED)).returncode != 0
    blob = next(p for p in (home / "blobs").rglob("*") if p.is_file())
    assert as_nobody("cat", str(blob)).returncode != 0
    assert as_nobody("cat", str(home / "meta.db")).returncode != 0
    # The owner still reads everything, and the store is consistent.
    assert priv.read_bytes() == model_files(seed=7)["config.json"]
    assert caches.verify() == []

    r = CliRunner().invoke(main, ["--home", str(home), "bucket", "unprotect", PROTECTED])
    assert r.exit_code == 0, r.output
    assert mode(home / "buckets" / PROTECTED) == 0o755
    assert as_nobody("cat", str(priv)).returncode == 0


def test_a_protected_bucket_stays_private_when_its_folder_is_made_again(shared: Path):
    settings, caches, origin = store_in(shared)
    token = caches.protect_bucket(PROTECTED)
    bucket_dir = settings.home / "buckets" / PROTECTED
    assert mode(bucket_dir) == 0o700  # made private before anything is pulled into it
    caches.ensure(make_spec(name="a", source=str(origin), bucket=PROTECTED))
    caches.rm("a")
    assert not bucket_dir.exists()  # the last view went, and its empty folder with it
    caches.ensure(make_spec(name="b", source=str(origin), bucket=PROTECTED))
    assert mode(bucket_dir) == 0o700
    # A folder widened behind cachemesh's back (an older version, a crash, a chmod) is
    # narrowed again when the store is next opened, and on the next file placed in it.
    bucket_dir.chmod(0o755)
    Caches(settings)
    assert mode(bucket_dir) == 0o700
    bucket_dir.chmod(0o755)
    caches.pull("b", refresh=True)
    caches.store.views.place(PROTECTED, "b", "extra.txt",
                             next(p for p in (settings.home / "blobs").rglob("*") if p.is_file()))
    assert mode(bucket_dir) == 0o700
    assert caches.buckets.opens(PROTECTED, [token])


def test_only_a_salted_digest_of_the_token_is_kept(shared: Path):
    settings, caches, _ = store_in(shared)
    token = caches.protect_bucket(PROTECTED)
    caches.db.close()
    stored = b"".join(p.read_bytes() for p in settings.home.glob("meta.db*"))
    assert token.encode() not in stored
    b = caches.buckets
    assert b.opens(PROTECTED, [token]) and b.opens(PROTECTED, ["wrong", token])
    assert not b.opens(PROTECTED, [token[:-1]]) and not b.opens(PROTECTED, [])
    assert not b.opens("public", [token])  # an open bucket needs no token and has none
    new = caches.rotate_bucket_token(PROTECTED)
    assert b.opens(PROTECTED, [new]) and not b.opens(PROTECTED, [token])
    with pytest.raises(ConflictError):
        caches.protect_bucket(PROTECTED)
    # Two buckets with the same token get different digests (salted).
    caches.protect_bucket("team-b", "the-same-token-for-two-buckets")
    caches.protect_bucket("team-c", "the-same-token-for-two-buckets")
    rows = {r["name"]: r["digest"] for r in caches.db.query("SELECT name, digest FROM buckets")}
    assert rows["team-b"] != rows["team-c"]


def test_bucket_cli_errors(shared: Path):
    settings, caches, _ = store_in(shared)
    run = CliRunner().invoke
    home = ["--home", str(settings.home)]
    assert run(main, [*home, "bucket", "unprotect", "team-z"]).exit_code == 3
    assert run(main, [*home, "bucket", "rotate", "team-z"]).exit_code == 3
    short = run(main, [*home, "bucket", "protect", "team-z", "--token-stdin"], input="short\n")
    assert short.exit_code == 2 and "short" not in short.output
    good = "a-token-that-is-long-enough-0123456789"
    r = run(main, [*home, "bucket", "protect", "team-z", "--token-stdin"], input=good + "\n")
    assert r.exit_code == 0 and good not in r.output
    assert run(main, [*home, "bucket", "protect", "team-z"]).exit_code == 4
    r = run(main, [*home, "bucket", "ls", "--json"])
    assert '"team-z"' in r.output and '"protected": true' in r.output
    for bad in ("..", "../x", "a/b", "", "x" * 200, "tëam"):
        assert run(main, [*home, "bucket", "protect", bad]).exit_code == 2, bad
    assert sorted(os.listdir(settings.home / "buckets")) == ["team-z"]


def test_a_crash_before_the_row_leaves_the_disk_narrower_than_the_database(shared: Path):
    settings, caches, _ = store_in(shared)

    def crash() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        caches.buckets.protect(PROTECTED, before_commit=crash)
    assert mode(settings.home / "buckets" / PROTECTED) == 0o700
    assert not caches.buckets.is_protected(PROTECTED)
    caches.protect_bucket(PROTECTED)  # and protecting again completes it
    assert caches.buckets.is_protected(PROTECTED)


def test_protect_refuses_to_work_through_a_file_or_a_symlink(shared: Path):
    settings, caches, _ = store_in(shared)
    outside = shared / "outside"
    outside.mkdir()
    (settings.home / "buckets" / "linked").symlink_to(outside)
    with pytest.raises(StoreError):
        caches.protect_bucket("linked")
    assert mode(outside) == 0o755 and not caches.buckets.is_protected("linked")


def test_hub_shows_no_file_of_a_protected_bucket(hf_env: HfHubEmulator, repo_id: str):
    settings = Settings.from_env(fetch_concurrency=2)
    caches = Caches(settings)
    hf_env.commit(repo_id, {"config.json": b'{"a": 1}', "w.safetensors": b"W" * 2048})
    caches.protect_bucket(PROTECTED)
    caches.ensure(make_spec(name="hidden", source=f"hf://{repo_id}", bucket=PROTECTED))
    folder = settings.home / "hub" / f"models--{repo_id.replace('/', '--')}"
    assert not folder.exists()
    caches.ensure(make_spec(name="shown", source=f"hf://{repo_id}", bucket="public"))
    assert (folder / "refs" / "main").exists()
    caches.rm("shown")
    assert not folder.exists()  # the protected cache does not keep the folder alive
    caches.unprotect_bucket(PROTECTED)
    assert (folder / "refs" / "main").exists()
    caches.protect_bucket(PROTECTED)  # protecting an existing cache takes it out of hub/
    assert not folder.exists()
    assert caches.verify() == []


def test_cache_helpers_for_api_routers_hide_protected_caches(caches: Caches, make_tree):
    origin = make_tree("m", model_files())
    token = caches.protect_bucket(PROTECTED)
    caches.ensure(make_spec(name="pub", source=str(origin)))
    caches.ensure(make_spec(name="priv", source=str(origin), bucket=PROTECTED))
    assert [c.name for c in visible_caches(caches)] == ["pub"]  # anonymous by default
    with pytest.raises(CacheNotFoundError) as hidden:
        get_visible_cache(caches, "priv")
    with pytest.raises(CacheNotFoundError) as missing:
        get_visible_cache(caches, "none")
    assert str(hidden.value) == str(missing.value).replace("'none'", "'priv'")
    with acting_as(Principal(tokens=(token,))):
        assert [c.name for c in visible_caches(caches)] == ["priv", "pub"]
        assert get_visible_cache(caches, "priv").bucket == PROTECTED
    with acting_as(INTERNAL):
        assert len(visible_caches(caches)) == 2


# -- over the API (the shared secured server: control and inference tokens set) -------

def test_the_control_api_does_not_show_a_protected_bucket_without_its_token(secured):
    c = secured.client
    names = [m["name"] for m in c.get("/api/v1/models", headers=AS_CONTROL).json()["models"]]
    assert "secret" not in names and "echo" in names
    body = c.get("/api/v1/models", headers=AS_CONTROL).json()
    assert all("secret" not in w["models"] for w in body["memory"]["workers"])
    both = {**AS_CONTROL, **WITH_BUCKET}
    listed = c.get("/api/v1/models", headers=both).json()
    assert "secret" in [m["name"] for m in listed["models"]]
    assert next(m for m in listed["models"] if m["name"] == "secret")["bucket"] == PROTECTED
    # The nodes listing names the copies a node holds: not this one either.
    (node,) = c.get("/api/v1/nodes", headers=AS_CONTROL).json()["nodes"]
    held = [copy["model"] for copy in node["copies"]]
    assert "secret" not in held and "echo" in held
    assert "secret" not in node["prepared"] and "echo" in node["prepared"]  # files on disk
    (node,) = c.get("/api/v1/nodes", headers=both).json()["nodes"]
    assert "secret" in [copy["model"] for copy in node["copies"]]
    assert "secret" in node["prepared"]

    # Describe and delete answer exactly as for a model that does not exist.
    hidden = c.get("/api/v1/models/secret", headers=AS_CONTROL)
    absent = c.get("/api/v1/models/nosuch", headers=AS_CONTROL)
    assert hidden.status_code == absent.status_code == 404
    assert hidden.json()["error"] == absent.json()["error"].replace("nosuch", "secret")
    assert sorted(hidden.headers) == sorted(absent.headers)
    assert c.delete("/api/v1/models/secret", headers=AS_CONTROL).status_code == 404
    assert c.get("/api/v1/models/secret", headers=both).json()["state"] == "Ready"

    # The repository extension hides it too.
    index = c.post("/v2/repository/index", headers=AS_CONTROL).json()
    assert "secret" not in [m["name"] for m in index]
    assert "secret" in [m["name"] for m in c.post("/v2/repository/index", headers=both).json()]
    for op in ("load", "unload"):
        r = c.post(f"/v2/repository/models/secret/{op}", headers=AS_CONTROL, json={})
        assert r.status_code == 404, r.text


def test_inference_on_a_protected_model_needs_the_bucket_token(secured):
    c = secured.client
    for method, path, body in (("POST", "/v2/models/secret/infer", V2),
                               ("GET", "/v2/models/secret", None),
                               ("GET", "/v2/models/secret/ready", None)):
        r = c.request(method, path, json=body, headers=AS_INFERENCE)
        assert r.status_code == 404 and r.json() == {"error": "no model named 'secret'"}
        # The control token does not open another team's bucket either.
        assert c.request(method, path, json=body, headers=AS_CONTROL).status_code == 404
        r = c.request(method, path, json=body, headers={**AS_INFERENCE, **WITH_BUCKET})
        assert r.status_code == 200, r.text
    r = c.post("/v2/models/secret/infer", json=V2,
               headers={**AS_INFERENCE, "X-Cachemesh-Bucket-Token": "cmb_wrong" + "x" * 30})
    assert r.status_code == 404


def test_deploying_into_a_protected_bucket_needs_its_token(secured):
    c = secured.client
    spec = toy(secured.models_root, "deployed", bucket=PROTECTED).model_dump()
    r = c.post("/api/v1/models", json=spec, headers=AS_CONTROL)
    assert r.status_code == 403 and "protected" in r.json()["error"]
    assert "deployed" not in [m["name"] for m in c.get(
        "/api/v1/models", headers={**AS_CONTROL, **WITH_BUCKET}).json()["models"]]
    both = {**AS_CONTROL, **WITH_BUCKET}
    r = c.post("/api/v1/models", json=spec, headers=both)
    assert r.status_code == 201, r.text
    assert c.get("/api/v1/models/deployed", headers=AS_CONTROL).status_code == 404
    # Its cache is in the protected bucket's private folder.
    r = c.post("/v2/models/deployed/infer", json=V2, headers={**AS_INFERENCE, **WITH_BUCKET})
    assert r.status_code == 200, r.text
    view = Path(c.get("/api/v1/models/deployed", headers=both).json()["view"])
    assert view.is_relative_to(secured.home / "buckets" / PROTECTED)
    assert mode(secured.home / "buckets" / PROTECTED) == 0o700
    # A name taken in a hidden bucket: 409, without saying where.
    r = c.post("/api/v1/models", json={**spec, "bucket": "models"}, headers=AS_CONTROL)
    assert r.status_code == 409 and PROTECTED not in r.json()["error"]
    assert c.delete("/api/v1/models/deployed", headers=both).status_code == 204


@pytest.fixture(scope="module")
def bearer_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with no inference token, deploying from one root: a client sends the
    bucket token as its bearer token, as an OpenAI client sends its api_key."""
    root = tmp_path_factory.mktemp("bearer-models")
    settings = serve_settings(tmp_path_factory.mktemp("bearer-home"), workers=1,
                              source_roots=(root,))
    caches = Caches(settings)
    caches.protect_bucket(PROTECTED, BUCKET_TOKEN)
    specs = [toy(root, "secret", bucket=PROTECTED), toy(root, "open")]
    with RunningServer(settings, specs, registry=MemoryModelRegistry()) as server:
        server.caches = caches
        server.root = root
        yield server


def test_the_bucket_token_works_as_a_bearer_token(bearer_only: RunningServer):
    c = bearer_only.client
    assert c.post("/v2/models/secret/infer", json=V2).status_code == 404
    r = c.post("/v2/models/secret/infer", json=V2,
               headers={"Authorization": f"Bearer {BUCKET_TOKEN}"})
    assert r.status_code == 200, r.text
    assert c.post("/v2/models/open/infer", json=V2).status_code == 200
    # With no control token the control API is open, but still hides the bucket.
    assert "secret" not in [m["name"] for m in c.get("/api/v1/models").json()["models"]]
    assert c.get("/api/v1/models/secret", headers=WITH_BUCKET).status_code == 200


def test_a_bucket_protected_while_the_server_runs_is_hidden_within_a_second(
        bearer_only: RunningServer):
    c = bearer_only.client
    spec = toy(bearer_only.root, "late", bucket="team-late").model_dump()
    assert c.post("/api/v1/models", json=spec).status_code == 201
    assert c.post("/v2/models/late/infer", json=V2).status_code == 200
    token = bearer_only.caches.protect_bucket("team-late")  # as `cachemesh bucket protect` does
    deadline = time.monotonic() + REFRESH_S + 5
    while c.post("/v2/models/late/infer", json=V2).status_code == 200:
        assert time.monotonic() < deadline, "the server never noticed the protection"
        time.sleep(0.05)
    r = c.post("/v2/models/late/infer", json=V2, headers={"X-Cachemesh-Bucket-Token": token})
    assert r.status_code == 200
    bearer_only.caches.unprotect_bucket("team-late")


def test_a_model_cannot_copy_a_protected_view_into_another_bucket(bearer_only: RunningServer):
    c = bearer_only.client
    caches = bearer_only.caches
    secret_view = c.get("/api/v1/models/secret", headers=WITH_BUCKET).json()["view"]
    assert secret_view
    spec = {"name": "copycat", "source": secret_view, "runtime": "custom",
            "parameters": {"class": "toy:Echo"}}
    r = c.post("/api/v1/models", json=spec, headers=WITH_BUCKET)
    assert r.status_code == 400 and "protected bucket" in r.json()["error"]
    # Nor through a symlink that leads there.
    link = bearer_only.root / "innocent"
    link.symlink_to(secret_view)
    r = c.post("/api/v1/models", json={**spec, "source": str(link)}, headers=WITH_BUCKET)
    assert r.status_code == 400
    # Into the same bucket, with its token, it may.
    r = c.post("/api/v1/models", json={**spec, "bucket": PROTECTED}, headers=WITH_BUCKET)
    assert r.status_code == 201, r.text
    assert c.delete("/api/v1/models/copycat", headers=WITH_BUCKET).status_code == 204
    assert caches.verify() == []


def test_a_model_never_reuses_a_cache_of_another_bucket(bearer_only: RunningServer):
    """A cache named like the model, with the same source, but in a protected bucket:
    the deploy is refused (before anything is kept) rather than serve that bucket's
    files from an open one; so is a rollout that adds a version with such a cache."""
    c = bearer_only.client
    folder = toy(bearer_only.root, "twin").source
    bearer_only.caches.ensure(make_spec(name="twin", source=folder, bucket=PROTECTED))
    bearer_only.caches.ensure(make_spec(name="other.v2", source=folder, bucket=PROTECTED))
    spec = {"name": "twin", "source": folder, "runtime": "custom",
            "parameters": {"class": "toy:Echo"}}
    r = c.post("/api/v1/models", json=spec)
    assert r.status_code == 409 and "another bucket" in r.json()["error"]
    assert c.get("/api/v1/models/twin").status_code == 404
    assert c.post("/v2/models/twin/infer", json=V2).status_code == 404
    v1 = {"source": folder, "runtime": "custom", "parameters": {"class": "toy:Echo"}}
    assert c.put("/api/v1/models/other", json={"versions": {"v1": v1}}).status_code == 201
    r = c.put("/api/v1/models/other", json={"versions": {"v1": v1, "v2": v1},
                                            "traffic": {"v1": 50, "v2": 50}})
    assert r.status_code == 409 and "another bucket" in r.json()["error"]
    assert list(c.get("/api/v1/models/other").json()["versions"]) == ["v1"]
    assert c.delete("/api/v1/models/other").status_code == 204
    bearer_only.caches.rm("twin")
    bearer_only.caches.rm("other.v2")


def test_a_model_document_in_a_protected_bucket_needs_its_token_everywhere(secured):
    """Versions, routes and rollouts of a model whose bucket is protected: without the
    bucket's token it is not listed, not callable, not changeable (and its copies are
    not named in the memory summary); with it, routing answers as for any model."""
    c = secured.client
    both, infer = {**AS_CONTROL, **WITH_BUCKET}, {**AS_INFERENCE, **WITH_BUCKET}
    entry = {k: v for k, v in toy(secured.models_root, "meshed").model_dump().items()
             if k in ("source", "runtime", "parameters")}
    doc = {"bucket": PROTECTED, "versions": {"v1": entry, "v2": entry},
           "traffic": {"v1": 100},
           "routes": [{"header": "x-model-version", "value": "v2", "version": "v2"}]}
    r = c.put("/api/v1/models/meshed", json=doc, headers=AS_CONTROL)
    assert r.status_code == 403 and "protected" in r.json()["error"]
    r = c.put("/api/v1/models/meshed", json=doc, headers=both)
    assert r.status_code == 201, r.text
    assert r.json()["bucket"] == PROTECTED
    try:
        for headers, want in (({}, "v1"), ({"x-model-version": "v2"}, "v2")):
            r = c.post("/v2/models/meshed/infer", json=V2, headers={**infer, **headers})
            assert r.status_code == 200 and r.headers["x-model-version"] == want, r.text
            r = c.post("/v2/models/meshed/infer", json=V2, headers={**AS_INFERENCE, **headers})
            assert r.status_code == 404 and r.json() == {"error": "no model named 'meshed'"}
        assert c.post("/v2/models/meshed/versions/v2/infer", json=V2,
                      headers=AS_INFERENCE).status_code == 404
        listed = c.get("/api/v1/models", headers=AS_CONTROL).json()
        assert "meshed" not in [m["name"] for m in listed["models"]]
        assert not [n for w in listed["memory"]["workers"] for n in w["models"]
                    if n.startswith("meshed")]
        listed = c.get("/api/v1/models", headers=both).json()
        assert "meshed@v2" in [n for w in listed["memory"]["workers"] for n in w["models"]]
        views = [v["status"]["view"] for v in c.get("/api/v1/models/meshed",
                                                    headers=both).json()["versions"].values()]
        assert all(Path(v).is_relative_to(secured.home / "buckets" / PROTECTED) for v in views)
        # A rollout without the token: 403 naming the bucket, 409 when it names an open one.
        roll = {**doc, "traffic": {"v2": 100}, "routes": []}
        r = c.put("/api/v1/models/meshed", json=roll, headers=AS_CONTROL)
        assert r.status_code == 403
        r = c.put("/api/v1/models/meshed", json={**roll, "bucket": "models"}, headers=AS_CONTROL)
        assert r.status_code == 409 and PROTECTED not in r.json()["error"]
        # With it: the bucket does not change, the rollout goes through.
        r = c.put("/api/v1/models/meshed", json={**roll, "bucket": "models"}, headers=both)
        assert r.status_code == 409 and "bucket does not change" in r.json()["error"]
        r = c.put("/api/v1/models/meshed", json=roll, headers=both)
        assert r.status_code == 200 and r.json()["traffic"] == {"v2": 100}, r.text
        r = c.post("/v2/models/meshed/infer", json=V2, headers=infer)
        assert r.status_code == 200 and r.headers["x-model-version"] == "v2"
    finally:
        assert c.delete("/api/v1/models/meshed", headers=both).status_code == 204


def test_a_rollout_checks_the_deploy_roots_for_new_versions_only(secured, digits_dir: Path):
    """digits was declared on the command line, outside the deployable roots: a PUT
    that keeps it and adds a version from inside them goes through; a new version
    from outside them is refused (400) and nothing changes."""
    c = secured.client
    both = {**AS_CONTROL, **WITH_BUCKET}
    before = c.get("/api/v1/models/digits", headers=both).json()
    doc = {"versions": {label: {k: v[k] for k in ("source", "runtime", "parameters")}
                        for label, v in before["versions"].items()},
           "traffic": before["traffic"]}
    inside = {k: v for k, v in toy(secured.models_root, "rooted").model_dump().items()
              if k in ("source", "runtime", "parameters")}
    try:
        r = c.put("/api/v1/models/digits", headers=both,
                  json={**doc, "versions": {**doc["versions"], "v2": inside}})
        assert r.status_code == 200 and list(r.json()["versions"]) == ["default", "v2"], r.text
        outside = {"source": str(digits_dir), "runtime": "sklearn"}
        r = c.put("/api/v1/models/digits", headers=both,
                  json={**doc, "versions": {**doc["versions"], "v3": outside}})
        assert r.status_code == 400 and "outside the directories" in r.json()["error"], r.text
        got = c.get("/api/v1/models/digits", headers=both).json()
        assert list(got["versions"]) == ["default", "v2"]
    finally:
        assert c.put("/api/v1/models/digits", headers=both, json=doc).status_code == 200


# -- the datacache API (serve/adapters/datacaches.py) on the shared secured server -------------

def _datacache_events(c, name: str, headers: dict) -> list[tuple[str, dict]]:
    from tests.serve.test_datacaches import sse

    with c.stream("GET", f"/api/v1/datacaches/{name}/events", headers=headers,
                  timeout=60) as r:
        assert r.status_code == 200, r.read()
        return list(sse(r))


def test_datacaches_of_a_protected_bucket_need_its_token(secured):
    c = secured.client
    both = {**AS_CONTROL, **WITH_BUCKET}
    folder = Path(toy(secured.models_root, "dc-files").source)
    body = {"name": "dc-secret", "source": str(folder), "bucket": PROTECTED}

    # Creating one there needs the bucket's token; refused, nothing is kept.
    r = c.post("/api/v1/datacaches", json=body, headers=AS_CONTROL)
    assert r.status_code == 403 and "protected" in r.json()["error"]
    assert "dc-secret" not in [i.name for i in secured.caches.list()]
    r = c.post("/api/v1/datacaches", json=body, headers=both)
    assert r.status_code == 202, r.text
    assert _datacache_events(c, "dc-secret", both)[-1][1]["status"] == "Available"

    # Not listed without the token, not even when its bucket is named.
    def listed(headers: dict, **params) -> list[str]:
        r = c.get("/api/v1/datacaches", headers=headers, params=params)
        assert r.status_code == 200, r.text
        return [d["name"] for d in r.json()["datacaches"]]

    assert "dc-secret" not in listed(AS_CONTROL)
    assert listed(AS_CONTROL, bucket=PROTECTED) == []
    # Nor counted in the usage figures (the /ui page shows them).
    seen, hidden = (c.get("/api/v1/datacaches", headers=h, params={"usage": "true"}).json()
                    for h in (both, AS_CONTROL))
    shown = {d["name"] for d in hidden["datacaches"]}
    only_seen = [d["usage"] for d in seen["datacaches"] if d["name"] not in shown]
    assert "dc-secret" not in shown and only_seen and all(u["logical_bytes"] for u in only_seen)
    assert seen["usage"]["logical_bytes"] - hidden["usage"]["logical_bytes"] == \
        sum(u["logical_bytes"] for u in only_seen)
    assert "dc-secret" in listed(both) and "dc-secret" in listed(both, bucket=PROTECTED)

    # Described, watched and deleted exactly as a cache that does not exist.
    for method, suffix in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
        hidden = c.request(method, f"/api/v1/datacaches/dc-secret{suffix}", headers=AS_CONTROL)
        absent = c.request(method, f"/api/v1/datacaches/dc-nosuch{suffix}", headers=AS_CONTROL)
        assert hidden.status_code == absent.status_code == 404, (method, suffix, hidden.text)
        assert hidden.json()["error"] == absent.json()["error"].replace("dc-nosuch", "dc-secret")
    wrong = {**AS_CONTROL, "X-Cachemesh-Bucket-Token": "cmb_wrong" + "x" * 30}
    assert c.get("/api/v1/datacaches/dc-secret", headers=wrong).status_code == 404
    described = c.get("/api/v1/datacaches/dc-secret", headers=both).json()
    assert described["Status"] == "Available" and described["Bucket"] == PROTECTED

    # Its name, taken in the hidden bucket: 409, saying neither where nor from what.
    r = c.post("/api/v1/datacaches", json={**body, "bucket": "public"}, headers=AS_CONTROL)
    assert r.status_code == 409
    assert PROTECTED not in r.json()["error"] and str(folder) not in r.json()["error"]

    assert c.delete("/api/v1/datacaches/dc-secret", headers=both).status_code == 204
    assert "dc-secret" not in [i.name for i in secured.caches.list()]


def test_datacache_local_sources_stay_inside_the_deployable_roots(secured, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the API")
    c = secured.client
    for body in ({"name": "dc-out", "source": str(outside)},
                 {"name": "dc-out", "source": f"file://{outside}"},
                 {"Name": "dc-out", "DataSource": {"Type": "NAS", "Options": {
                     "server": "localhost", "path": str(outside)}}}):
        r = c.post("/api/v1/datacaches", json=body, headers=AS_CONTROL)
        assert r.status_code == 400 and "SOURCE_ROOTS" in r.json()["error"], r.text
    assert "dc-out" not in [i.name for i in secured.caches.list()]
