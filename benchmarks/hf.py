"""Hugging Face pulls: ``cachemesh pull hf://`` against ``snapshot_download`` and parallel curl.

    .venv/bin/python benchmarks/hf.py                          # ~2 GB model, 5 rounds
    .venv/bin/python benchmarks/hf.py --size 200MB --rounds 3  # a smoke run

The same emulated hub serves every tool: tests/emulators/hf_hub.py, in its own
process, answers the API (repo info, tree) and serves the small files itself;
its LFS downloads are 302 redirects to a separate blob origin, here nginx on
loopback serving the blobs named by sha256 (sendfile, Range), as the real Hub
redirects to its CDN. The model (``bench/base``): a config, a 7 MB tokenizer
(a regular, non-LFS file, as on the Hub) and safetensors-sized shards of random
bytes; generated under ``.bench/hf/`` and reused. Each round runs, in a
rotating order, in a fresh process and a fresh cache directory each:

- ``cachemesh pull -q hf://bench/base``: the command a user types (listing,
  files and ranges in parallel, every byte's sha256 checked, fsync, the view and
  the ``hub/`` layout);
- ``huggingface_hub.snapshot_download("bench/base")``: the Hub's own client
  with its defaults (8 files at once, one stream per file);
- ``curl, N ranges in parallel``: the raw ceiling: the same bytes as 16 MiB
  ranges, N curl processes at once (xargs -P N), straight from the URLs the
  redirects lead to (no API calls, no hashing, no fsync, ranges left as files);
- ``dd`` writing the same amount with ``conv=fdatasync`` (the disk, reference).

Page cache: the blobs are read before every run, so every tool gets them from
the page cache (nginx sendfile); downloads are deleted and synced between runs,
untimed. Times are wall-clock from process start to exit.

Then, once, deduplication: into one fresh store, ``bench/base``, a fine-tune
``bench/base-ft`` (the same config and tokenizer bytes, weights of its own) and
a second cache of ``bench/base`` (another name and bucket). ``cachemesh du``
reports logical bytes (what the views show) against physical bytes (blobs),
cross-checked with GNU ``du`` over the whole store (which counts a hardlinked
inode once); each pull's own event says how many bytes it downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report
import fetch
from fetch import Nginx, Run

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench" / "hf"
MIB = 1024 * 1024
BASE, FINETUNE = "bench/base", "bench/base-ft"
CACHEMESH = str(Path(sys.executable).with_name("cachemesh"))
SNAPSHOT = ("import sys; from huggingface_hub import snapshot_download;"
            " snapshot_download(sys.argv[1], cache_dir=sys.argv[2],"
            " allow_patterns=sys.argv[3:] or None)")
FIXED = "config.json"  # a pull of this file alone: a tool's cost besides the bytes


# -- the repos ------------------------------------------------------------------------------

def layout(total: int, shards: int) -> dict[str, int]:
    files = {"config.json": 2_000, "generation_config.json": 200, "tokenizer.json": 7 * MIB}
    rest = total - sum(files.values())
    for i in range(shards):
        files[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = rest // shards + (
            rest % shards if i == shards - 1 else 0)
    return files


def _random_file(path: Path, size: int, seed: bytes | None = None) -> str:
    """Random bytes (or bytes derived from ``seed``, identical wherever the seed is); sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * (MIB // 32) if seed is not None else b""
    with open(path, "wb") as f:
        left = size
        while left:
            data = block[:min(left, MIB)] if seed is not None else os.urandom(min(left, 16 * MIB))
            f.write(data)
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def make_repos(total: int, shards: int) -> dict[str, list[dict]]:
    """Write base and fine-tune under .bench/hf/repos (reused when the layout matches).

    The fine-tune's config and tokenizer are the base's bytes; its shards are its own."""
    index_path = BENCH / "repos" / "index.json"
    wanted = layout(total, shards)
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if all({f["path"]: f["size"] for f in index.get(repo, [])} == wanted
               and all((BENCH / "repos" / repo / f["path"]).stat().st_size == f["size"]
                       for f in index[repo]) for repo in (BASE, FINETUNE)):
            return index
    shutil.rmtree(BENCH / "repos", ignore_errors=True)
    index: dict[str, list[dict]] = {}
    for repo in (BASE, FINETUNE):
        folder = BENCH / "repos" / repo
        folder.mkdir(parents=True)
        index[repo] = []
        for name, size in wanted.items():
            shared = name.endswith(".json")  # config, generation config, tokenizer
            sha = _random_file(folder / name, size, seed=name.encode() if shared else None)
            index[repo].append({"path": name, "size": size, "sha256": sha})
            print(f"  generated {repo}/{name} ({size / 1e6:.0f} MB)", flush=True)
    index_path.write_text(json.dumps(index))
    return index


# -- the emulated hub ---------------------------------------------------------------------

class Hub:
    """tests/emulators/hf_hub.py in its own process, its LFS redirects pointing at ``blobs``."""

    def __init__(self, blob_origin: str, blobs: Path) -> None:
        self.blob_origin, self.blobs = blob_origin, blobs
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> Self:
        argv = [sys.executable, "-m", "tests.emulators.hf_hub", "--blob-origin-url",
                self.blob_origin, "--export-blobs", str(self.blobs)]
        for repo in (BASE, FINETUNE):
            argv += ["--repo", f"{repo}={BENCH / 'repos' / repo}"]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # after the blobs are exported
        if not line:
            raise RuntimeError("the hub emulator did not start")
        self.url = json.loads(line)["endpoint"]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def env_for(hub: Hub, out: Path) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(out / "hf-home"),
           "CACHEMESH_HOME": str(out / "home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for name in ("PYTHONPATH", "HF_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_OFFLINE"):
        env.pop(name, None)
    return env


# -- the tools -------------------------------------------------------------------------------

def bytes_under(folder: Path) -> int:
    """Bytes of the regular files under ``folder``, each inode once."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        st = path.lstat()
        if path.is_file() and not path.is_symlink() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_size
    return total


def cachemesh_pull(nginx: Nginx, hub: Hub, out: Path, total: int, only: str | None = None
                   ) -> Run:
    """``cachemesh pull``; with ``only``, just that file (what a pull costs besides bytes)."""
    argv = [CACHEMESH, "pull", "-q", f"hf://{BASE}", *(["--include", only] if only else [])]
    run, _ = fetch.timed(nginx, argv, env=env_for(hub, out))
    assert bytes_under(out / "home" / "blobs") == total, "cachemesh: wrong number of bytes"
    return run


def snapshot_download(nginx: Nginx, hub: Hub, out: Path, total: int, only: str | None = None
                      ) -> Run:
    argv = [sys.executable, "-c", SNAPSHOT, BASE, str(out / "hf"), *([only] if only else [])]
    run, _ = fetch.timed(nginx, argv, env=env_for(hub, out))
    blobs = out / "hf" / f"models--{BASE.replace('/', '--')}" / "blobs"
    assert bytes_under(blobs) == total, "snapshot_download: wrong number of bytes"
    return run


def curl_ranges(nginx: Nginx, hub: Hub, out: Path, index: list[dict], parallel: int,
                total: int) -> Run:
    from tests.emulators._common import default_lfs_rule

    files = []
    for f in index:
        lfs = default_lfs_rule(f["path"], SimpleNamespace(size=f["size"]))  # what the hub does
        url = nginx.url(f["sha256"]) if lfs else f"{hub.url}/{BASE}/resolve/main/{f['path']}"
        files.append((url, f["size"], out / f["path"]))
    run = fetch.curl_ranges(nginx, files, parallel)
    assert bytes_under(out) == total, "curl: wrong number of bytes"
    return run


def warm(blobs: Path) -> None:
    for path in blobs.iterdir():
        with open(path, "rb", buffering=0) as fh:
            while fh.read(16 * MIB):
                pass


# -- deduplication -----------------------------------------------------------------------------

def dedup(hub: Hub, index: dict[str, list[dict]]) -> dict:
    out = BENCH / "dedup"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = env_for(hub, out)
    pulls = [[f"hf://{BASE}"], [f"hf://{FINETUNE}"],
             [f"hf://{BASE}", "--name", "base-again", "--bucket", "team-b"]]
    fetched: dict[str, int] = {}  # bytes each pull downloaded (its "available" event)
    for argv in pulls:
        status = json.loads(subprocess.run([CACHEMESH, "pull", "-q", "--json", *argv], env=env,
                                           check=True, capture_output=True, text=True).stdout)
        events = json.loads(subprocess.run(
            [CACHEMESH, "cache", "status", status["name"], "--json"], env=env, check=True,
            capture_output=True, text=True).stdout)["events"]
        found = [re.search(r"fetched \((\d+) bytes\)", e["message"]) for e in events
                 if e["kind"] == "available"]
        fetched[status["name"]] = int(found[-1].group(1)) if found and found[-1] else -1
    du = json.loads(subprocess.run([CACHEMESH, "du", "--json"], env=env, check=True,
                                   capture_output=True, text=True).stdout)
    gnu = int(subprocess.run(["du", "-sb", str(out / "home")], check=True, capture_output=True,
                             text=True).stdout.split()[0])
    unique = {f["sha256"]: f["size"] for repo in index.values() for f in repo}
    shared = sum(f["size"] for f in index[BASE] if f["path"].endswith(".json"))
    shutil.rmtree(out, ignore_errors=True)
    return {"du": du, "gnu_du": gnu, "unique": sum(unique.values()), "shared": shared,
            "fetched": fetched}


# -- the benchmark -----------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2GB", help="model size (default 2GB)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=8, help="curl processes at once")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # tests.emulators

    from cachemesh.config import parse_size

    print(f"repos: {BASE} and {FINETUNE}, {args.size} each, under {BENCH / 'repos'}", flush=True)
    index = make_repos(parse_size(args.size), args.shards)
    total = sum(f["size"] for f in index[BASE])
    config_size = next(f["size"] for f in index[BASE] if f["path"] == FIXED)
    blobs = BENCH / "blobs"
    shutil.rmtree(blobs, ignore_errors=True)
    nginx = Nginx(root=blobs)
    tools = {
        "cachemesh pull": lambda out: cachemesh_pull(nginx, hub, out, total),
        "huggingface_hub snapshot_download": lambda out: snapshot_download(nginx, hub, out,
                                                                           total),
        f"curl, {args.parallel} ranges in parallel": lambda out: curl_ranges(
            nginx, hub, out, index[BASE], args.parallel, total),
        "dd write + fdatasync (reference)": lambda out: fetch.dd_reference(nginx, total, out),
        f"cachemesh pull, {FIXED} only (reference)": lambda out: cachemesh_pull(
            nginx, hub, out, config_size, only=FIXED),
        f"snapshot_download, {FIXED} only (reference)": lambda out: snapshot_download(
            nginx, hub, out, config_size, only=FIXED),
    }
    results: dict[str, list[Run]] = {name: [] for name in tools}
    loads: list[float] = []
    out = BENCH / "out"
    with Hub(nginx.base, blobs) as hub, nginx:
        for r, name in _report.rotating(list(tools), args.rounds):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            subprocess.run(["sync"], check=True)
            warm(blobs)
            loads.append(os.getloadavg()[0])
            run = tools[name](out)
            results[name].append(run)
            print(f"round {r + 1}/{args.rounds}  {name:48s} {run.seconds:6.2f} s"
                  f"  cpu {run.cpu:5.2f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        print("deduplication: base, fine-tune, base again", flush=True)
        deduped = dedup(hub, index)
    shutil.rmtree(blobs, ignore_errors=True)
    report(args, total, index, results, loads, deduped)


def report(args: argparse.Namespace, total: int, index: dict[str, list[dict]],
           results: dict[str, list[Run]], loads: list[float], deduped: dict) -> None:
    med = _report.median
    gb = total / 1e9
    snap = results["huggingface_hub snapshot_download"]
    raw = results[f"curl, {args.parallel} ranges in parallel"]
    cm = results["cachemesh pull"]

    def paired(runs: list[Run], base: list[Run]) -> float:
        """Median over rounds of (base's time / this one's) in the same round."""
        return med([b.seconds / r.seconds for r, b in zip(runs, base, strict=True)])

    rows = []
    for name, runs in results.items():
        reference = "(reference)" in name
        seconds = f"{med([r.seconds for r in runs]):.2f}"
        if f"{FIXED} only" in name:  # a few kB: only its time and CPU mean something
            rows.append([name, "", "", seconds, "", "", f"{med([r.cpu for r in runs]):.2f} s"])
            continue
        rates = [total / r.seconds / 1e6 for r in runs]
        rows.append([name, f"{med(rates):.0f}", f"{min(rates):.0f}–{max(rates):.0f}", seconds,
                     "" if reference else f"{paired(runs, snap):.2f}",
                     "" if reference else f"{paired(runs, raw):.2f}",
                     f"{med([r.cpu for r in runs]) / gb:.2f}"])
    vs_snap, vs_raw = paired(cm, snap), paired(cm, raw)
    fixed = {name: med([r.seconds for r in results[f"{name}, {FIXED} only (reference)"]])
             for name in ("cachemesh pull", "snapshot_download")}
    net = {name: total / max(1e-3, med([r.seconds for r in runs]) - fixed[key]) / 1e6
           for name, runs, key in (("cachemesh pull", cm, "cachemesh pull"),
                                   ("snapshot_download", snap, "snapshot_download"))}
    fixed_text = (
        f"Fixed cost of a pull (the {FIXED}-only rows: the interpreter and imports, the"
        f" hub's API calls, the cache's bookkeeping): {fixed['cachemesh pull']:.2f} s for"
        f" cachemesh, {fixed['snapshot_download']:.2f} s for snapshot_download. Less that,"
        f" cachemesh moved the model at {net['cachemesh pull']:.0f} MB/s and snapshot_download"
        f" at {net['snapshot_download']:.0f} MB/s; at small sizes the fixed cost dominates"
        " the ratios above.")
    goals = (f"Goals: at least 4x snapshot_download ({vs_snap:.2f}x:"
             f" {'met' if vs_snap >= 4 else 'not met'}), at least 0.8x the parallel raw download"
             f" ({vs_raw:.2f}x: {'met' if vs_raw >= 0.8 else 'not met'}).")
    setup = (
        f"{gb:.2f} GB in {len(index[BASE])} files ({args.shards} safetensors shards of random"
        " bytes behind LFS redirects, a 7 MB tokenizer and two configs served by the hub"
        " itself), the hub emulator (tests/emulators/hf_hub.py) in its own process, nginx on"
        f" loopback as the LFS blob origin (plain http), {args.rounds} rounds, tools in a"
        " rotating order, medians; a fresh process and cache directory per run, the blobs in"
        " the page cache before every run. `cachemesh pull` runs with its defaults (8 files,"
        " 8 ranges of 16 MiB in flight), hashes every byte against the published sha256,"
        " fsyncs and writes the view and the hub/ layout; snapshot_download runs with its"
        " defaults (8 files at once, one stream each; no hf_transfer); curl fetches the same"
        " bytes straight from the redirect targets (no API calls, no hash, no fsync).")
    load = (f"Measured on a loaded machine: {os.cpu_count()} cores shared with other sessions'"
            f" tests and benchmarks; median load average during the runs {med(loads):.1f}."
            " Ratios are paired (same round), which cancels part of the noise; absolute MB/s"
            " are not what an idle machine gives.")
    du = deduped["du"]
    logical, physical = du["logical_bytes"], du["physical_bytes"]
    fetched = deduped["fetched"]
    dedup_rows = [[c["name"], f"{c['logical_bytes'] / 1e6:.1f}", c["files"],
                   f"{c['exclusive_bytes'] / 1e6:.1f}",
                   f"{fetched.get(c['name'], -1) / 1e6:.1f}"]
                  for c in sorted(du["caches"], key=lambda c: list(fetched).index(c["name"]))]
    dedup_text = (
        f"Deduplication (`cachemesh du --json` after pulling `{BASE}`, the fine-tune"
        f" `{FINETUNE}` whose configs and tokenizer ({deduped['shared'] / 1e6:.1f} MB) are the"
        f" base's bytes, and `{BASE}` again as a second cache in another bucket): logical"
        f" {logical / 1e6:.1f} MB, physical {physical / 1e6:.1f} MB (saved"
        f" {du['saved_bytes'] / 1e6:.1f} MB, {du['blobs']} blobs); the distinct file contents"
        f" add up to {deduped['unique'] / 1e6:.1f} MB, and GNU `du -sb` of the whole store"
        f" (blobs, views, hub/ layout, database) says {deduped['gnu_du'] / 1e6:.1f} MB.")
    table = _report.table(["tool", "MB/s", "min–max", "seconds", "x snapshot_download (paired)",
                           "x parallel curl (paired)", "own CPU s/GB"], rows)
    dedup_table = _report.table(["cache (in pull order: base, fine-tune, base again)",
                                 "logical MB", "files", "exclusive MB", "downloaded MB"],
                                dedup_rows)
    text = "\n".join([setup, "", load, "", table, "", goals, "", fixed_text, "", dedup_text, "",
                      dedup_table])
    print("\n" + text)
    if not args.no_write:
        _report.write_section("hf", "Hugging Face pulls (hf://)", text)


if __name__ == "__main__":
    main()
