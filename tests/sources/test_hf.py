"""hf:// against the Hugging Face Hub emulator: revisions, checksums, access, dedup."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

import cachemesh
from cachemesh.caches import AVAILABLE, Caches, make_spec
from cachemesh.config import Settings
from cachemesh.errors import (
    AccessDeniedError,
    IntegrityError,
    InvalidInputError,
    SourceNotFoundError,
)
from cachemesh.sources import RemoteFile, parse_source
from cachemesh.sources.hf import HfSource, parse_hf_uri
from tests.emulators.fixtures import HF_OTHER_TOKEN, HF_TOKEN
from tests.emulators.hf_hub import HfHubEmulator


def model_files(seed: int, weights: int = 200 * 1024) -> dict[str, bytes]:
    rng = __import__("random").Random(seed)
    return {
        "config.json": b'{"model_type": "llama", "seed": %d}' % seed,
        "tokenizer.json": b'{"vocab": {"a": 0, "b": 1}, "seed": %d}' % seed,
        "model.safetensors": rng.randbytes(weights),
        "nested/notes.md": b"# notes %d\n" % seed,
    }


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pull_pins_the_commit_verifies_and_shows_the_hub_layout(hub_caches: Caches,
                                                                 hf_env: HfHubEmulator, repo_id):
    files = model_files(1)
    commit = hf_env.commit(repo_id, files)
    view = cachemesh.pull(f"hf://{repo_id}", settings=hub_caches.settings)

    assert tree_of(view) == files
    info = hub_caches.get(repo_id.split("/")[1])
    assert info.status == AVAILABLE and info.revision == commit
    assert info.source == f"hf://{repo_id}@main"
    # The LFS file came from the blob origin (through the redirect), once; the others from the hub.
    weights = files["model.safetensors"]
    assert hf_env.blob_origin.served[sha(weights)] == len(weights)
    assert hf_env.served[(repo_id, "config.json")] == len(files["config.json"])
    # Hugging Face layout: hardlinks to the same blobs, the ref, the tree listing.
    folder = hub_caches.settings.home / "hub" / ("models--" + repo_id.replace("/", "--"))
    assert (folder / "refs/main").read_text() == commit
    snapshot = folder / "snapshots" / commit
    assert tree_of(snapshot) == files
    for rel in files:
        assert os.path.samefile(snapshot / rel, view / rel)
        assert not (snapshot / rel).is_symlink()
    assert os.path.samefile(folder / "blobs" / sha(files["model.safetensors"]),
                            view / "model.safetensors")
    assert (folder / "trees" / f"{commit}.json").is_file()
    kinds = [e.kind for e in hub_caches.events(info.name)]
    assert kinds == ["created", "pull-started", "available"]  # every file verified: no warning


def test_branches_tags_and_commits_resolve_and_a_refresh_moves_the_ref(
        hub_caches: Caches, hf_env: HfHubEmulator, repo_id):
    first = hf_env.commit(repo_id, {"a.txt": b"one", "w.bin": b"\x01" * 5000})
    hf_env.repos[("model", repo_id)].tag("v1")
    second = hf_env.commit(repo_id, {"a.txt": b"two"}, delete=["w.bin"])
    s = hub_caches.settings

    tagged = cachemesh.pull(f"hf://{repo_id}@v1", settings=s)
    pinned = cachemesh.pull(f"hf://{repo_id}@{first}", settings=s)
    latest = cachemesh.pull(f"hf://{repo_id}", settings=s)
    assert tree_of(tagged) == tree_of(pinned) == {"a.txt": b"one", "w.bin": b"\x01" * 5000}
    assert tree_of(latest) == {"a.txt": b"two"}
    assert tagged.name.endswith("v1") and pinned.name.endswith(first[:12])
    folder = s.home / "hub" / ("models--" + repo_id.replace("/", "--"))
    assert (folder / "refs/v1").read_text() == first
    assert (folder / "refs/main").read_text() == second
    assert not (folder / "refs" / first).exists()  # a commit pin writes no ref
    assert sorted(os.listdir(folder / "snapshots")) == sorted([first, second])

    third = hf_env.commit(repo_id, {"a.txt": b"three"})
    name = latest.name
    hub_caches.pull(name, refresh=True)
    assert hub_caches.get(name).revision == third
    assert (folder / "refs/main").read_text() == third
    assert (folder / "snapshots" / third / "a.txt").read_bytes() == b"three"
    assert not (folder / "snapshots" / second).exists()  # nobody shows it any more


def test_datasets_use_their_own_api_and_layout(hub_caches: Caches, hf_env: HfHubEmulator, repo_id):
    commit = hf_env.commit(repo_id, {"data/train.parquet": b"P" * 3000, "README.md": b"# d"},
                           repo_type="dataset")
    view = cachemesh.pull(f"hf://datasets/{repo_id}", settings=hub_caches.settings)
    assert tree_of(view) == {"data/train.parquet": b"P" * 3000, "README.md": b"# d"}
    folder = hub_caches.settings.home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    assert (folder / "snapshots" / commit / "data/train.parquet").is_file()
    with pytest.raises(AccessDeniedError, match="not found"):
        cachemesh.pull(f"hf://{repo_id}", name="as-a-model", settings=hub_caches.settings)


@pytest.mark.parametrize("which", ["model.safetensors", "config.json"])
def test_corrupted_bytes_are_caught_and_never_visible(hub_caches: Caches, hf_env: HfHubEmulator,
                                                      repo_id, which: str):
    files = model_files(2)
    hf_env.commit(repo_id, files)
    hf_env.corrupt(sha(files[which]))
    name = repo_id.split("/")[1]
    with pytest.raises(IntegrityError, match="sha256|git blob id"):
        cachemesh.pull(f"hf://{repo_id}", settings=hub_caches.settings)
    home = hub_caches.settings.home
    view = home / "buckets/default" / name
    assert not (view / which).exists()
    assert not hub_caches.store.blobs.has(sha(files[which]))
    assert not list((home / "tmp").glob("*.part"))
    # Files that did verify are in the view, and the hub view shows no cache that failed.
    assert not (home / "hub" / ("models--" + repo_id.replace("/", "--"))).exists()
    for other, data in files.items():
        if (view / other).exists():
            assert (view / other).read_bytes() == data
    hf_env.corrupted.discard(sha(files[which]))
    hf_env.blob_origin.corrupted.discard(sha(files[which]))
    hub_caches.pull(name)
    assert tree_of(view) == files


def test_private_repo_needs_the_token_which_never_reaches_disk_or_the_cdn(
        hub_caches: Caches, hf_env: HfHubEmulator, repo_id, monkeypatch: pytest.MonkeyPatch):
    hf_env.add_repo(repo_id, private=True, readers=[HF_TOKEN])
    files = model_files(3)
    hf_env.commit(repo_id, files)
    with pytest.raises(AccessDeniedError, match="private or gated.*HF_TOKEN") as denied:
        cachemesh.pull(f"hf://{repo_id}", settings=Settings.from_env())
    assert repo_id in str(denied.value)

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    settings = Settings.from_env()
    hf_env.reset_counters()
    view = cachemesh.pull(f"hf://{repo_id}", settings=settings)
    assert tree_of(view) == files
    caches = Caches(settings)
    assert caches.verify() == []
    # The token went to the hub, never to the CDN the hub redirects to.
    assert f"Bearer {HF_TOKEN}" in hf_env.auth_seen
    assert hf_env.blob_origin.requests
    for _, _, headers in hf_env.blob_origin.requests:
        assert "authorization" not in headers and HF_TOKEN not in str(headers)
    # Nowhere in the store: database, events, specs, file names.
    grep = subprocess.run(["grep", "-rl", "--binary-files=text", HF_TOKEN, str(settings.home)],
                          capture_output=True, text=True)
    assert grep.stdout == "", grep.stdout
    for info in caches.list():
        assert HF_TOKEN not in repr(info) and HF_TOKEN not in str(info.spec)
        assert all(HF_TOKEN not in e.message for e in caches.events(info.name))
    source = parse_source(f"hf://{repo_id}", {}, settings)
    assert HF_TOKEN not in repr(source) and HF_TOKEN not in source.uri
    f = source.list_files().files[0]
    request = source.request_for(f)
    assert HF_TOKEN not in repr(request)
    assert "Authorization" not in request.headers_for("http://cdn.example/blob?sig=1")
    assert request.headers_for(request.url)["Authorization"] == f"Bearer {HF_TOKEN}"


def test_a_wrong_token_and_a_token_without_access_are_refused(hf_env: HfHubEmulator, repo_id,
                                                               monkeypatch: pytest.MonkeyPatch):
    hf_env.add_repo(repo_id, private=True, readers=[HF_TOKEN])
    hf_env.commit(repo_id, {"a.txt": b"a"})
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token_anyone_issued")
    with pytest.raises(AccessDeniedError, match="refused HF_TOKEN") as bad:
        cachemesh.pull(f"hf://{repo_id}", settings=Settings.from_env())
    assert "hf_not_a_token" not in str(bad.value)
    monkeypatch.setenv("HF_TOKEN", HF_OTHER_TOKEN)
    with pytest.raises(SourceNotFoundError, match=f"{repo_id} was not found"):
        cachemesh.pull(f"hf://{repo_id}", settings=Settings.from_env())
    caches = Caches(Settings.from_env())
    assert caches.list() == []  # a one-shot pull that fails leaves nothing behind


def test_gated_repo_lists_but_does_not_download_without_access(hf_env: HfHubEmulator, repo_id,
                                                               monkeypatch: pytest.MonkeyPatch):
    hf_env.add_repo(repo_id, gated=True, readers=[HF_TOKEN])
    files = model_files(4)
    hf_env.commit(repo_id, files)
    with pytest.raises(AccessDeniedError, match="gated.*no HF_TOKEN is set"):
        cachemesh.pull(f"hf://{repo_id}", settings=Settings.from_env())
    monkeypatch.setenv("HF_TOKEN", HF_OTHER_TOKEN)
    settings = Settings.from_env()
    caches = Caches(settings)
    caches.create(make_spec(name="gated", source=f"hf://{repo_id}"))
    with pytest.raises(AccessDeniedError, match="gated.*has not been granted"):
        caches.pull("gated")
    # The failure is recorded (status, error, events) without the token in it.
    info = caches.get("gated")
    assert info.status == "Failed" and "gated" in (info.error or "")
    grep = subprocess.run(["grep", "-rl", "--binary-files=text", HF_OTHER_TOKEN,
                           str(settings.home)], capture_output=True, text=True)
    assert grep.stdout == ""
    caches.rm("gated")
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    view = cachemesh.pull(f"hf://{repo_id}", settings=Settings.from_env())
    assert tree_of(view) == files


def test_missing_repo_revision_and_file_name_what_is_missing(hf_env: HfHubEmulator, repo_id,
                                                             monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(AccessDeniedError, match=f"{repo_id} was not found.*set HF_TOKEN"):
        cachemesh.pull(f"hf://{repo_id}", settings=Settings.from_env())
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    with pytest.raises(SourceNotFoundError, match=f"{repo_id} was not found"):
        cachemesh.pull(f"hf://{repo_id}", settings=Settings.from_env())
    commit = hf_env.commit(repo_id, {"a.txt": b"a"})
    with pytest.raises(SourceNotFoundError, match=f"{repo_id} has no revision 'nope'"):
        cachemesh.pull(f"hf://{repo_id}@nope", settings=Settings.from_env())
    source = parse_source(f"hf://{repo_id}", {}, Settings.from_env())
    assert isinstance(source, HfSource)
    ghost = RemoteFile("ghost.bin", 1, locator=source._resolve_url(commit, "ghost.bin"))
    with pytest.raises(SourceNotFoundError, match="ghost.bin"):
        b"".join(source.read_range(ghost, 0, 1))


def test_two_caches_of_one_repo_are_fetched_and_stored_once(hub_caches: Caches,
                                                            hf_env: HfHubEmulator, repo_id):
    files = model_files(5)
    commit = hf_env.commit(repo_id, files)
    s = hub_caches.settings
    cachemesh.pull(f"hf://{repo_id}", name="one", settings=s)
    cachemesh.pull(f"hf://{repo_id}@{commit}", name="two", bucket="other", settings=s)
    for rel, data in files.items():
        assert hf_env.bytes_served(repo_id, rel, data) == len(data), rel
    du = hub_caches.du()
    assert du["physical_bytes"] == sum(map(len, files.values()))
    assert du["logical_bytes"] == 2 * du["physical_bytes"]
    # Removing one keeps the hub view whole for the other, which shows the same commit.
    hub_caches.rm("one")
    folder = s.home / "hub" / ("models--" + repo_id.replace("/", "--"))
    assert tree_of(folder / "snapshots" / commit) == files
    assert not (folder / "refs/main").exists()  # "two" is pinned by commit: no branch left
    assert hub_caches.verify() == []
    hub_caches.rm("two")
    assert not folder.exists()


def test_a_base_model_and_its_fine_tune_share_tokenizer_and_config(hub_caches: Caches,
                                                                   hf_env: HfHubEmulator, repo_id):
    base = model_files(6)
    tuned = {**base, "model.safetensors": os.urandom(150 * 1024), "README.md": b"fine-tuned"}
    hf_env.commit(repo_id, base)
    hf_env.commit(repo_id + "-ft", tuned)
    s = hub_caches.settings
    cachemesh.pull(f"hf://{repo_id}", settings=s)
    cachemesh.pull(f"hf://{repo_id}-ft", settings=s)
    for shared in ("config.json", "tokenizer.json", "nested/notes.md"):
        # Fetched from the base only: the fine-tune's copy has the same git blob id.
        assert hf_env.served[(repo_id, shared)] == len(base[shared])
        assert hf_env.served[(repo_id + "-ft", shared)] == 0
    blobs = hub_caches.store.blobs.files_on_disk()
    assert len(blobs) == len(base) + 2  # the shared files once, plus the new weights and README
    new_bytes = len(tuned["model.safetensors"]) + len(tuned["README.md"])
    assert sum(blobs.values()) == sum(map(len, base.values())) + new_bytes


def test_include_exclude_and_the_tree_listing_of_the_whole_commit(hub_caches: Caches,
                                                                  hf_env: HfHubEmulator, repo_id):
    files = model_files(7)
    commit = hf_env.commit(repo_id, files)
    view = cachemesh.pull(f"hf://{repo_id}", include=["*.json"], settings=hub_caches.settings)
    assert sorted(tree_of(view)) == ["config.json", "tokenizer.json"]
    folder = hub_caches.settings.home / "hub" / ("models--" + repo_id.replace("/", "--"))
    assert sorted(tree_of(folder / "snapshots" / commit)) == ["config.json", "tokenizer.json"]
    import json

    tree = json.loads((folder / "trees" / f"{commit}.json").read_text())
    assert tree["format_version"] == 1 and sorted(tree["files"]) == sorted(files)
    lfs = tree["files"]["model.safetensors"]
    assert lfs["lfs_sha256"] == sha(files["model.safetensors"])
    assert lfs["lfs_size"] == lfs["size"] == len(files["model.safetensors"])
    regular = tree["files"]["config.json"]
    assert set(regular) == {"size", "blob_id"}
    assert regular["blob_id"] == hashlib.sha1(
        b"blob %d\0" % len(files["config.json"]) + files["config.json"]).hexdigest()


def test_the_emulator_answers_ranges_and_signs_its_redirects(hf_env: HfHubEmulator, repo_id):
    """What the shared fetcher relies on: HEAD for sizes, ranged GETs at the hub and the CDN."""
    import httpx

    weights = os.urandom(5000)
    commit = hf_env.commit(repo_id, {"w.safetensors": weights, "c.json": b"0123456789"})
    with httpx.Client() as http:
        head = http.head(f"{hf_env.url}/{repo_id}/resolve/main/w.safetensors")
        assert head.status_code == 302 and head.headers["X-Repo-Commit"] == commit
        assert head.headers["X-Linked-Size"] == "5000"
        assert head.headers["X-Linked-Etag"] == f'"{sha(weights)}"'
        cdn = head.headers["Location"]
        part = http.get(cdn, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == weights[100:200]
        assert part.headers["Content-Range"] == "bytes 100-199/5000"
        assert http.get(cdn, headers={"Range": "bytes=6000-"}).status_code == 416
        assert http.get(cdn.replace("Signature=", "Signature=x")).status_code == 403
        tail = http.get(f"{hf_env.url}/{repo_id}/resolve/{commit}/c.json",
                        headers={"Range": "bytes=-3"})
        assert tail.status_code == 206 and tail.content == b"789"
        git_id = hashlib.sha1(b"blob 10\0" + b"0123456789").hexdigest()
        assert tail.headers["ETag"] == f'"{git_id}"'


def test_lfs_redirects_can_point_at_an_external_blob_origin(clean_env: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """The benchmark setup: the hub redirects LFS files to another server (nginx in a
    benchmark, the stdlib file server here) that serves a directory of blobs named by sha256."""
    import functools
    import http.server
    import threading

    blobs = tmp_path / "blobs"
    blobs.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(blobs))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    files = model_files(8)
    try:
        with HfHubEmulator(blob_origin_url=f"http://127.0.0.1:{server.server_port}") as hub:
            hub.commit("org/external", files)
            hub.blob_origin.export(blobs)
            assert sorted(os.listdir(blobs)) == [sha(files["model.safetensors"])]
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            view = cachemesh.pull("hf://org/external", settings=Settings.from_env())
            assert tree_of(view) == files
            assert hub.blob_origin.served == {}  # every LFS byte came from the external origin
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("uri,parsed", [
    ("hf://org/name", ("model", "org/name", "main")),
    ("hf://org/name@v1.0", ("model", "org/name", "v1.0")),
    ("hf://gpt2", ("model", "gpt2", "main")),
    ("hf://datasets/org/d@refs/convert/parquet", ("dataset", "org/d", "refs/convert/parquet")),
    ("hf://org/name@refs%2Fpr%2F3", ("model", "org/name", "refs/pr/3")),
])
def test_uri_forms(uri: str, parsed: tuple[str, str, str]):
    assert parse_hf_uri(uri) == parsed


@pytest.mark.parametrize("bad", ["hf://", "hf://a/b/c", "hf://org/na--me", "hf://org/../x",
                                 "hf://org/name@", "hf://spaces/org/app", "hf://org/name@../x"])
def test_bad_uris_are_refused(bad: str):
    with pytest.raises(InvalidInputError):
        parse_source(bad, {}, Settings.from_env())


def test_endpoint_and_token_come_from_the_settings_environment(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("hf_from_file\n")
    env = {"CACHEMESH_HOME": str(tmp_path), "HF_ENDPOINT": "https://mirror.example/",
           "HF_TOKEN_PATH": str(token_file)}
    source = parse_source("hf://org/name", {}, Settings.from_env(env))
    assert isinstance(source, HfSource)
    assert source.endpoint == "https://mirror.example"
    assert source._headers()["Authorization"] == "Bearer hf_from_file"
    env["HF_TOKEN"] = "hf_from_env"
    source = parse_source("hf://org/name", {}, Settings.from_env(env))
    assert source._headers()["Authorization"] == "Bearer hf_from_env"
    with pytest.raises(InvalidInputError, match="do not take option"):
        parse_source("hf://org/name", {"token": "x"}, Settings.from_env(env))
