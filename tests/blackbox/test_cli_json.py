"""Every `cachemesh` command that takes --json: the exact shape of its output, on a real store.

The store (one per module) holds what a user's would: two caches from a local
origin that share a file, one from the Hugging Face emulator, a protected
bucket, a conversion and a failed conversion (jobs). The shared server answers
the `cachemesh models` commands. Each test also checks the essentials of the
human form. Commands and subcommands with --json: pull, cache create|ls|status|
verify, gc, du, convert, jobs ls|logs, bucket ls, models ls|deploy|apply.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.blackbox.conftest import Server, cm, cm_json, environ, toy_model

CACHE_KEYS = {"name", "bucket", "path", "source", "status", "view", "pinned", "in_use", "error",
              "revision", "progress", "size_limit_gib", "retention_days", "created_at",
              "updated_at", "last_access", "spec"}
SPEC_KEYS = {"name", "source", "bucket", "path", "include", "exclude", "size_limit_gib",
             "retention_days", "options"}
JOB_KEYS = {"id", "kind", "key", "status", "spec", "result", "error", "progress", "step", "pid",
            "host", "created_at", "started_at", "finished_at", "updated_at", "duration"}
MODEL_KEYS = {"name", "version", "source", "runtime", "state", "reason", "eager", "origin",
              "bucket", "worker", "workers", "size_bytes", "predicted_bytes", "inflight", "loads",
              "evictions", "last_used", "view", "rollout", "versions", "traffic", "routes",
              "aliases", "scaling", "revision"}
SHARED = random.Random(16).randbytes(64 * 1024)  # in both local caches: stored once


class Store:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env = home, env
        self.results: dict[str, Any] = {}


def write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def one_dim_checkpoint(folder: Path) -> Path:
    """A llama-like checkpoint whose o_proj weight has one dimension: no tensor-parallel
    split of it exists, which the splitter finds only while it runs (a Failed job)."""
    header = json.dumps({"model.layers.0.self_attn.o_proj.weight": {
        "dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    return write(folder, {
        "model.safetensors": struct.pack("<Q", len(header)) + header + b"\0" * 16,
        "config.json": json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                   "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "intermediate_size": 4}).encode()})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, origins: Path, hf_hub: Any) -> Store:
    tmp = tmp_path_factory.mktemp("cli")
    s = Store(tmp / "home", environ(tmp / "home", HF_ENDPOINT=hf_hub.url))
    alpha = write(tmp / "src/alpha", {"config.json": b'{"a": 1}', "shared.bin": SHARED,
                                      "sub/alpha.bin": b"alpha" * 1000})
    beta = write(tmp / "src/beta", {"shared.bin": SHARED, "beta.bin": b"beta" * 500,
                                    "notes.txt": b"not included"})
    s.results["commit"] = hf_hub.commit("org/blackbox-cli", {
        "config.json": b'{"model_type": "none"}', "model.safetensors": b"\1" * 3000})
    s.results["alpha"] = cm_json(s.env, "pull", str(alpha), "--name", "alpha", "--json")
    s.results["beta"] = cm_json(s.env, "cache", "create", "beta", str(beta), "--bucket", "team",
                                "--include", "*.bin", "--retention-days", "30", "--json")
    s.results["hf"] = cm_json(s.env, "pull", "hf://org/blackbox-cli", "--json")
    s.results["token"] = cm(s.env, "bucket", "protect", "team")
    s.results["convert"] = cm_json(s.env, "convert", str(origins / "tiny-chat"), "--tp", "2",
                                   "--json", own_process=True)
    s.results["failed"] = cm(s.env, "convert", str(one_dim_checkpoint(tmp / "src/flat")),
                             "--tp", "2", "--json", check=False)
    return s


def check_cache(data: dict[str, Any], store: Store, **expected: Any) -> None:
    assert set(data) == CACHE_KEYS
    assert set(data["spec"]) == SPEC_KEYS
    assert data["view"] == str(store.home / "buckets" / data["bucket"] / data["path"])
    assert (data["status"], data["error"], data["in_use"]) == ("Available", None, False)
    p = data["progress"]
    assert set(p) == {"bytes_done", "bytes_total", "files_done", "files_total", "rate"}
    assert p["bytes_done"] == p["bytes_total"] and p["files_done"] == p["files_total"]
    assert isinstance(p["rate"], float)
    assert all(isinstance(data[k], float) for k in ("created_at", "updated_at", "last_access"))
    for key, value in expected.items():
        assert data[key] == value, key


def test_pull_and_cache_create_print_the_caches_status(store: Store):
    src = store.home.parent / "src"
    alpha = store.results["alpha"]
    check_cache(alpha, store, name="alpha", bucket="default", path="alpha", pinned=False,
                source=f"file://{src}/alpha", revision=None, size_limit_gib=None,
                retention_days=None)
    assert alpha["progress"]["files_total"] == 3
    assert alpha["progress"]["bytes_total"] == 8 + len(SHARED) + 5000
    assert alpha["spec"] == {"name": "alpha", "source": f"file://{src}/alpha",
                             "bucket": "default", "path": "alpha", "include": [], "exclude": [],
                             "size_limit_gib": None, "retention_days": None, "options": {}}
    beta = store.results["beta"]
    check_cache(beta, store, name="beta", bucket="team", path="beta", retention_days=30.0)
    assert beta["progress"]["files_total"] == 2  # notes.txt is not *.bin
    assert beta["spec"]["include"] == ["*.bin"] and beta["spec"]["retention_days"] == 30.0

    # The human form: the view on stdout (last line), what was fetched on stderr.
    again = cm(store.env, "pull", str(src / "alpha"), "--name", "alpha")
    assert again.stdout.splitlines()[-1] == alpha["view"]
    assert "alpha: 0 file(s) fetched" in again.stderr
    assert cm(store.env, "pull", str(src / "alpha"), "--name", "alpha", "-q").stdout == (
        alpha["view"] + "\n")


def test_a_hub_pull_names_its_commit(store: Store):
    hf, commit = store.results["hf"], store.results["commit"]
    check_cache(hf, store, name="blackbox-cli", bucket="default", path="blackbox-cli",
                source="hf://org/blackbox-cli@main", revision=commit)
    snapshot = store.home / "hub/models--org--blackbox-cli/snapshots" / commit
    assert (snapshot / "config.json").read_bytes() == b'{"model_type": "none"}'


def test_cache_ls(store: Store):
    listed = cm_json(store.env, "cache", "ls", "--json")
    names = [c["name"] for c in listed]
    convert = store.results["convert"]["cache"]
    assert names == sorted(names)
    assert set(names) == {"alpha", "beta", "blackbox-cli", "tiny-chat", "flat", convert}
    for c in listed:
        check_cache(c, store)
    by_name = {c["name"]: c for c in listed}
    assert by_name["alpha"]["spec"] == store.results["alpha"]["spec"]
    assert cm_json(store.env, "cache", "ls", "--bucket", "team", "--json") == [by_name["beta"]]
    assert cm_json(store.env, "cache", "ls", "--bucket", "nobody", "--json") == []

    text = cm(store.env, "cache", "ls").stdout.splitlines()
    assert text[0].split() == ["NAME", "BUCKET", "PATH", "STATUS", "SIZE", "FILES", "PINNED",
                               "LAST", "ACCESS", "SOURCE"]
    rows = {line.split()[0]: line.split() for line in text[1:]}
    assert set(rows) == set(names)
    assert rows["beta"][1:4] == ["team", "beta", "Available"] and "2/2" in rows["beta"]


def test_cache_status(store: Store):
    status = cm_json(store.env, "cache", "status", "alpha", "--json")
    events = status.pop("events")
    check_cache(status, store, name="alpha")
    assert [e["kind"] for e in events][:3] == ["created", "pull-started", "available"]
    for e in events:
        assert set(e) == {"id", "ts", "level", "kind", "message"}
        assert e["level"] == "info" and isinstance(e["id"], int) and isinstance(e["ts"], float)
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    quiet = cm_json(store.env, "cache", "status", "alpha", "--no-events", "--json")
    assert quiet["events"] == []

    text = cm(store.env, "cache", "status", "beta").stdout
    assert "name:        beta\n" in text and "status:      Available\n" in text
    assert "bucket/path: team/beta\n" in text
    assert re.search(r"progress: .* 2/2 files", text)
    assert "events:" in text and "created" in text


def view_contents(store: Store) -> dict[str, dict[str, int]]:
    """Each cache's files as the views show them: sha256 -> size."""
    out = {}
    for c in cm_json(store.env, "cache", "ls", "--json"):
        files = [p for p in Path(c["view"]).rglob("*") if p.is_file()]
        out[c["name"]] = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size
                          for p in files}
        assert len(out[c["name"]]) <= len(files)
    return out


def test_du_counts_what_dedup_saves(store: Store):
    du = cm_json(store.env, "du", "--json")
    assert set(du) == {"caches", "logical_bytes", "physical_bytes", "saved_bytes", "blobs", "home"}
    assert du["home"] == str(store.home)
    listed = {c["name"]: c for c in cm_json(store.env, "cache", "ls", "--json")}
    contents = view_contents(store)
    holders: dict[str, set[str]] = defaultdict(set)
    sizes = {}
    for name, files in contents.items():
        for sha, size in files.items():
            holders[sha].add(name)
            sizes[sha] = size
    assert [c["name"] for c in du["caches"]] == sorted(listed)
    for c in du["caches"]:
        assert set(c) == {"name", "bucket", "files", "logical_bytes", "exclusive_bytes"}
        assert c["bucket"] == listed[c["name"]]["bucket"]
        assert c["files"] == listed[c["name"]]["progress"]["files_total"]
        assert c["logical_bytes"] == listed[c["name"]]["progress"]["bytes_total"]
        assert c["exclusive_bytes"] == sum(size for sha, size in contents[c["name"]].items()
                                           if holders[sha] == {c["name"]})
    assert du["logical_bytes"] == sum(c["logical_bytes"] for c in du["caches"])
    assert du["physical_bytes"] == sum(sizes.values())
    assert du["blobs"] == len(sizes)
    assert du["saved_bytes"] == du["logical_bytes"] - du["physical_bytes"] >= len(SHARED)

    text = cm(store.env, "du").stdout.splitlines()
    assert text[0].split() == ["NAME", "BUCKET", "FILES", "LOGICAL", "EXCLUSIVE"]
    assert [line.split()[0] for line in text[1:-1]] == [c["name"] for c in du["caches"]]
    last = text[-1]
    assert re.fullmatch(r"logical .+, physical .+, saved by dedup .+ \(\d+ blobs\)", last)
    assert last.endswith(f"({du['blobs']} blobs)")


def test_verify_and_gc_on_a_healthy_store(store: Store):
    proc = cm(store.env, "cache", "verify", "--json")
    assert json.loads(proc.stdout) == {"ok": True, "problems": []}
    assert cm(store.env, "cache", "verify", "--quick").stderr.strip() == "ok"
    assert cm_json(store.env, "gc", "--json") == {"removed_caches": [], "blobs_removed": 0,
                                                  "bytes_freed": 0, "tmp_bytes_freed": 0}
    assert cm(store.env, "gc").stdout == (
        "removed 0 cache(s), 0 blob(s), freed 0 B (+0 B of partial downloads)\n")


def test_verify_reports_a_corrupt_blob(tmp_path: Path):
    env = environ(tmp_path / "home")
    view = Path(cm(env, "pull", str(write(tmp_path / "src", {"w.bin": b"w" * 4096})),
                   "--name", "w", "-q").stdout.strip())
    (view / "w.bin").chmod(0o644)
    (view / "w.bin").write_bytes(b"x" * 4096)  # through the hardlink: the blob itself
    proc = cm(env, "cache", "verify", "--json", check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {"ok": False, "problems": [{
        "kind": "corrupt-blob", "subject": hashlib.sha256(b"w" * 4096).hexdigest(),
        "detail": "bytes do not match their sha256", "cache": None}]}
    text = cm(env, "cache", "verify", check=False)
    assert (text.returncode, text.stdout.split(":")[0]) == (1, "corrupt-blob")


def test_gc_evicts_least_recently_used_unpinned_caches(tmp_path: Path):
    env = environ(tmp_path / "home")
    for name in ("old", "kept", "new"):
        cm(env, "pull", str(write(tmp_path / name, {f"{name}.bin": name.encode() * 1000})),
           "--name", name, "-q")
    cm(env, "cache", "pin", "kept")
    assert cm_json(env, "cache", "status", "kept", "--json")["pinned"] is True
    report = cm_json(env, "gc", "--max-size", "1", "--json")
    assert report == {"removed_caches": ["old", "new"], "blobs_removed": 2,
                      "bytes_freed": 6000, "tmp_bytes_freed": 0}
    assert [c["name"] for c in cm_json(env, "cache", "ls", "--json")] == ["kept"]
    cm(env, "cache", "unpin", "kept")
    text = cm(env, "gc", "--max-size", "1").stdout
    assert text.startswith("removed 1 cache(s) (kept), 1 blob(s), freed 3.9 KiB")


def test_cache_rm_keeps_what_another_cache_shares(tmp_path: Path):
    env = environ(tmp_path / "home")
    one = cm_json(env, "pull", str(write(tmp_path / "one", {"s.bin": SHARED, "a.bin": b"a"})),
                  "--name", "one", "--json")
    cm(env, "pull", str(write(tmp_path / "two", {"s.bin": SHARED})), "--name", "two", "-q")
    removed = cm(env, "cache", "rm", "one")
    assert (removed.stdout, removed.stderr) == ("", "removed one\n")
    assert not Path(one["view"]).exists()
    assert [c["name"] for c in cm_json(env, "cache", "ls", "--json")] == ["two"]
    du = cm_json(env, "du", "--json")
    assert (du["physical_bytes"], du["blobs"]) == (len(SHARED), 1)
    assert cm_json(env, "cache", "verify", "--json")["ok"] is True


def test_bucket_ls_and_the_token_commands(store: Store, tmp_path: Path):
    token = store.results["token"]
    assert re.fullmatch(r"\S{24,}\n", token.stdout) and "team is protected" in token.stderr
    listed = cm_json(store.env, "bucket", "ls", "--json")
    assert listed == [{"name": "converted", "protected": False, "caches": 1},
                      {"name": "default", "protected": False, "caches": 4},
                      {"name": "team", "protected": True, "caches": 1}]
    assert (store.home / "buckets/team").stat().st_mode & 0o777 == 0o700
    text = cm(store.env, "bucket", "ls").stdout.splitlines()
    assert text[0].split() == ["BUCKET", "PROTECTED", "CACHES"]
    assert text[3].split() == ["team", "yes", "1"]

    env = environ(tmp_path / "home")
    cm(env, "pull", str(write(tmp_path / "src", {"a.bin": b"a"})), "--bucket", "mine", "-q")
    given = cm(env, "bucket", "protect", "mine", "--token-stdin",
               stdin="my-own-bucket-token-0123456789\n")
    assert given.stdout == ""  # a token the user gave is not printed back
    rotated = cm(env, "bucket", "rotate", "mine").stdout.strip()
    assert len(rotated) >= 24 and rotated != "my-own-bucket-token-0123456789"
    cm(env, "bucket", "unprotect", "mine")
    assert cm_json(env, "bucket", "ls", "--json") == [
        {"name": "mine", "protected": False, "caches": 1}]


def test_convert(store: Store, origins: Path):
    result = store.results["convert"]
    assert set(result) == {"view", "identity", "cache", "cached", "job", "input_cache",
                           "manifest"}
    identity = result["identity"]
    assert re.fullmatch(r"[0-9a-f]{64}", identity)
    assert result["cache"] == f"safetensors-tp2-{identity[:16]}"
    assert result["view"] == str(store.home / "buckets/converted" / result["cache"])
    assert (result["cached"], result["input_cache"]) == (False, "tiny-chat")
    manifest = result["manifest"]
    assert (manifest["identity"], manifest["target"], manifest["options"]) == (
        identity, "safetensors", {"tp": 2})
    assert manifest["runtime"]["tp_size"] == 2
    assert sorted(manifest["runtime"]["ranks"]) == ["rank-0", "rank-1"]
    on_disk = json.loads((Path(result["view"]) / "cachemesh-convert.json").read_text())
    assert on_disk["identity"] == identity

    again = cm_json(store.env, "convert", str(origins / "tiny-chat"), "--tp", "2", "--json")
    assert again == {**result, "cached": True, "job": None}
    text = cm(store.env, "convert", str(origins / "tiny-chat"), "--tp", "2")
    assert text.stdout == result["view"] + "\n"
    assert "already converted" in text.stderr and identity in text.stderr


def test_jobs_ls_and_logs(store: Store):
    failed = store.results["failed"]
    assert failed.returncode == 2 and failed.stdout == ""
    assert "no dim 1 to split" in failed.stderr
    jobs = cm_json(store.env, "jobs", "ls", "--json")
    assert [j["status"] for j in jobs] == ["Failed", "Succeeded"]  # newest first
    for j in jobs:
        assert set(j) == JOB_KEYS
        assert j["kind"] == "convert" and j["spec"]["tp"] == 2
    bad, good = jobs
    assert good["id"] == store.results["convert"]["job"]
    assert good["key"] == store.results["convert"]["identity"]
    assert (good["progress"], good["step"], good["error"]) == (1.0, "finished", None)
    assert good["result"]["cache"] == store.results["convert"]["cache"]
    assert bad["result"] is None and "no dim 1 to split" in bad["error"]
    assert cm_json(store.env, "jobs", "ls", "--status", "Failed", "--json") == [bad]
    assert cm_json(store.env, "jobs", "ls", "--limit", "1", "--json") == [bad]
    assert cm_json(store.env, "jobs", "ls", "--kind", "other", "--json") == []
    header = cm(store.env, "jobs", "ls").stdout.splitlines()[0].split()
    assert header == ["ID", "KIND", "STATUS", "PROGRESS", "STEP", "CREATED", "DURATION", "DETAIL"]

    logs = cm_json(store.env, "jobs", "logs", good["id"], "--json")
    assert set(logs) == {"job", "logs"} and logs["job"] == good
    for line in logs["logs"]:
        assert set(line) == {"id", "ts", "level", "message"}
    messages = [line["message"] for line in logs["logs"]]
    assert messages[0].startswith(f"job {good['id']} started")
    assert messages[-1] == f"job {good['id']} succeeded"
    text = cm(store.env, "jobs", "logs", bad["id"])
    assert text.stderr.strip() == f"job {bad['id']} failed: {bad['error']}"
    assert len(text.stdout.splitlines()) >= 1


def test_models_deploy_apply_ls_and_rm(server: Server, origins: Path):
    env = {**server.env, "CACHEMESH_URL": server.url}
    source = str(toy_model(origins, "cli-toy"))
    deployed = cm_json(env, "models", "deploy", "cli-toy", source, "--runtime", "custom",
                       "--param", "class=toy:Toy", "--version", "3", "--json")
    assert set(deployed) == MODEL_KEYS
    assert {k: deployed[k] for k in ("name", "version", "source", "runtime", "eager", "origin",
                                     "bucket", "traffic", "routes", "aliases")} == {
        "name": "cli-toy", "version": "3", "source": source, "runtime": "custom", "eager": False,
        "origin": "api", "bucket": "models", "traffic": {"3": 100}, "routes": [], "aliases": {}}
    assert deployed["versions"]["3"]["parameters"] == {"class": "toy:Toy"}
    text = cm(env, "models", "deploy", "cli-toy2", source, "--runtime", "custom",
              "--param", "class=toy:Toy").stdout
    assert re.fullmatch(r"deployed cli-toy2 \((Pulling|Unloaded)\)\n", text)

    doc = origins.parent / "cli-doc.json"
    version = {"source": source, "runtime": "custom", "parameters": {"class": "toy:Toy"}}
    doc.write_text(json.dumps({"name": "cli-doc", "versions": {"a": version, "b": version},
                               "traffic": {"a": 70, "b": 30}}))
    applied = cm_json(env, "models", "apply", str(doc), "--json")
    assert set(applied) == MODEL_KEYS
    assert (applied["name"], applied["traffic"]) == ("cli-doc", {"a": 70, "b": 30})
    assert sorted(applied["versions"]) == ["a", "b"]
    assert cm(env, "models", "apply", str(doc)).stdout.startswith("cli-doc: ")

    listed = cm_json(env, "models", "ls", "--json")
    assert set(listed) == {"models", "memory"}
    mine = {m["name"]: m for m in listed["models"] if m["name"].startswith("cli-")}
    assert sorted(mine) == ["cli-doc", "cli-toy", "cli-toy2"]
    assert all(set(m) == MODEL_KEYS for m in listed["models"])
    memory = listed["memory"]
    assert set(memory) == {"budget_bytes", "held_bytes", "workers"}
    assert memory["budget_bytes"] == 2 * 1024**3
    for w in memory["workers"]:
        assert set(w) == {"id", "pid", "alive", "rss_bytes", "base_bytes", "held_bytes",
                          "inflight", "models"}
    text = cm(env, "models", "ls").stdout.splitlines()
    assert text[0].split() == ["NAME", "VERSION", "TRAFFIC", "STATE", "WORKERS", "MEMORY",
                               "INFLIGHT", "RATE", "LAST", "USED", "SOURCE"]
    assert re.fullmatch(r"memory: .+ held of 2\.0 GiB by 2 worker\(s\)", text[-1])
    rows = [line.split() for line in text]
    assert ["cli-doc", "a", "70%"] in [r[:3] for r in rows]

    removed = cm(env, "models", "rm", "cli-toy", "cli-toy2", "cli-doc")
    assert removed.stderr.splitlines() == ["removed cli-toy", "removed cli-toy2",
                                           "removed cli-doc"]
    after = cm_json(env, "models", "ls", "--json")["models"]
    assert not [m for m in after if m["name"].startswith("cli-")]
