"""Fetch throughput: cachemesh to verified blobs against curl, over loopback nginx.

    .venv/bin/python benchmarks/fetch.py                  # ~2 GB model, 5 rounds
    .venv/bin/python benchmarks/fetch.py --rounds 3 --s3  # also through boto3 (s3://)
    .venv/bin/python benchmarks/fetch.py --cold           # drop the page cache before each run

A multi-file model (a config, a tokenizer and safetensors-sized shards of
random bytes, ~2 GB in all) is generated under ``.bench/fetch/`` and served by
nginx on loopback (config written to a temporary directory; sendfile, Range).
Each round runs, in a rotating order:

- ``curl, one stream``: one curl process fetching the files one after the other;
- ``curl, N ranges in parallel``: the same bytes as 16 MiB ranges, N curl
  processes at once (xargs -P N), each range to its own file: no reassembly,
  no hashing, no fsync. The raw ceiling of "download in parallel";
- ``cachemesh``: a full pull in a fresh process and a fresh ``CACHEMESH_HOME``:
  listing, files in parallel, ranged reads, sha256 of every byte checked
  against the published one, fsync, blobs linked into the view, SQLite rows.
  The origin is a small "hub" source defined here (an index with sizes and
  sha256, then plain ranged GETs), which is what the Hugging Face source will
  be; variants: hashing at the end instead of while fetching, 64 KiB reads
  (httpcore's default) instead of 1 MiB, and MD5 checked too (what an S3
  single-part ETag costs);
- with ``--s3``: cachemesh through ``s3://`` and boto3, nginx answering the
  listing with a static ListObjectsV2 document (nginx's ETags are not MD5s,
  so this path checks sizes only);
- references: sha256 of the same bytes from the page cache on one core
  (hashlib), and ``dd`` writing the same amount with ``conv=fdatasync``.

Page cache: by default the origin's files are read once before every run, so
every tool reads them from the page cache (nginx sendfile); downloads are
deleted and ``sync``-ed between runs, untimed. With ``--cold`` the page cache
is dropped before every run instead (root only). Times are wall-clock from
process start to exit; CPU seconds are the tool's own (user + system, from
the kernel's accounting of the child), nginx's are read from /proc.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench" / "fetch"
BUCKET = "bench-bucket"
PREFIX = "model"
MIB = 1024 * 1024
CHUNK = 16 * MIB


# -- the model ---------------------------------------------------------------------------

def model_layout(total: int, shards: int) -> dict[str, int]:
    layout = {"config.json": 2_000, "tokenizer.json": 7 * MIB}
    rest = total - sum(layout.values())
    for i in range(shards):
        layout[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = rest // shards + (
            rest % shards if i == shards - 1 else 0)
    return layout


def make_model(total: int, shards: int) -> list[dict]:
    """Write the model under .bench (reused when it is already there); returns its index."""
    model = BENCH / "origin" / BUCKET / PREFIX
    index_path = BENCH / "origin" / "index.json"
    layout = model_layout(total, shards)
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if {f["path"]: f["size"] for f in index} == layout and all(
                (model / f["path"]).stat().st_size == f["size"] for f in index):
            return index
    shutil.rmtree(BENCH / "origin", ignore_errors=True)
    model.mkdir(parents=True)
    index = []
    for name, size in layout.items():
        sha, md5 = hashlib.sha256(), hashlib.md5()
        with open(model / name, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(left, 16 * MIB))
                f.write(block)
                sha.update(block)
                md5.update(block)
                left -= len(block)
        index.append({"path": name, "size": size, "sha256": sha.hexdigest(),
                      "md5": md5.hexdigest()})
        print(f"  generated {name} ({size / 1e6:.0f} MB)", flush=True)
    index_path.write_text(json.dumps(index))
    write_listing(index)
    return index


def write_listing(index: list[dict]) -> None:
    """A static ListObjectsV2 answer for s3://bench-bucket/model/ (nginx serves it)."""
    entries = "".join(
        f"<Contents><Key>{PREFIX}/{f['path']}</Key><LastModified>2026-01-01T00:00:00.000Z"
        f"</LastModified><ETag>&quot;bench-{i}&quot;</ETag><Size>{f['size']}</Size>"
        f"<StorageClass>STANDARD</StorageClass></Contents>" for i, f in enumerate(index))
    xml = ('<?xml version="1.0" encoding="UTF-8"?>'
           '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
           f"<Name>{BUCKET}</Name><Prefix>{PREFIX}/</Prefix><KeyCount>{len(index)}</KeyCount>"
           f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{entries}</ListBucketResult>")
    (BENCH / "origin" / "listing.xml").write_text(xml)


# -- nginx -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx on loopback serving ``root`` (the fetch benchmark's origin by default)."""

    def __init__(self, tls: bool = False, root: Path | None = None) -> None:
        self.root = root if root is not None else BENCH / "origin"
        self.dir = Path(tempfile.mkdtemp(prefix="cachemesh-bench-nginx-"))
        self.port = free_port()
        self.tls = tls
        self.ca_file = self.dir / "ca.pem"
        self.proc: subprocess.Popen | None = None

    def _listen(self) -> str:
        if not self.tls:
            return f"listen 127.0.0.1:{self.port};"
        import trustme  # a test dependency: a throwaway CA and a certificate for localhost

        ca = trustme.CA()
        cert = ca.issue_cert("localhost")
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        return (f"listen 127.0.0.1:{self.port} ssl; ssl_certificate {self.dir}/cert.pem;"
                f" ssl_certificate_key {self.dir}/key.pem; ssl_protocols TLSv1.3;")

    @property
    def base(self) -> str:
        return f"https://localhost:{self.port}" if self.tls else f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        origin = self.root
        listen = self._listen()
        (self.dir / "nginx.conf").write_text(f"""
worker_processes 2;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  default_type application/octet-stream;
  server {{
    {listen}
    root {origin};
    location = /{BUCKET} {{ default_type application/xml; alias {origin}/listing.xml; }}
  }}
}}
""")
        self.proc = subprocess.Popen(["/usr/sbin/nginx", "-c", str(self.dir / "nginx.conf"),
                                      "-p", str(self.dir)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start") from None
                time.sleep(0.05)
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU of the nginx master and workers, from /proc."""
        assert self.proc is not None
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in [self.proc.pid, *self._children(self.proc.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    @staticmethod
    def _children(pid: int) -> list[int]:
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the tools -----------------------------------------------------------------------------

@dataclass
class Run:
    seconds: float
    cpu: float  # the tool's own CPU seconds (user + system)
    nginx_cpu: float
    detail: dict = field(default_factory=dict)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(nginx: Nginx, argv: list[str], *, env: dict | None = None, stdin: str | None = None
          ) -> tuple[Run, str]:
    c0, n0 = children_cpu(), nginx.cpu_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - t0
    c1, n1 = children_cpu(), nginx.cpu_seconds()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return Run(seconds, c1 - c0, n1 - n0), proc.stdout


def curl_tls(nginx: Nginx) -> list[str]:
    return ["--cacert", str(nginx.ca_file)] if nginx.tls else []


def curl_single(nginx: Nginx, index: list[dict], out: Path) -> Run:
    argv = ["curl", "-sS", "--fail", *curl_tls(nginx)]
    for f in index:
        argv += ["-o", str(out / f["path"]), nginx.url(f"{BUCKET}/{PREFIX}/{f['path']}")]
    return timed(nginx, argv)[0]


def curl_parallel(nginx: Nginx, index: list[dict], out: Path, parallel: int) -> Run:
    return curl_ranges(nginx, [(nginx.url(f"{BUCKET}/{PREFIX}/{f['path']}"), f["size"],
                                out / f["path"]) for f in index], parallel)


def curl_ranges(nginx: Nginx, files: list[tuple[str, int, Path]], parallel: int) -> Run:
    """(url, size, target) files as CHUNK-sized ranges, ``parallel`` curl processes at
    once, each range to its own file (``target.<start>``)."""
    lines = []
    for url, size, target in files:
        for start in range(0, size, CHUNK):
            end = min(start + CHUNK, size) - 1
            lines.append(f"{start}-{end} {target}.{start} {url}")
    script = f'exec curl -sS --fail {" ".join(curl_tls(nginx))} -r "$0" -o "$1" "$2"'
    argv = ["xargs", "-P", str(parallel), "-L", "1", "sh", "-c", script]
    return timed(nginx, argv, stdin="\n".join(lines) + "\n")[0]


def cachemesh_run(nginx: Nginx, out: Path, variant: str, settings: dict[str, str]) -> Run:
    env = {**os.environ, "CACHEMESH_HOME": str(out / "home"), **settings}
    env.pop("PYTHONPATH", None)
    if nginx.tls:
        env.update(CACHEMESH_CA_BUNDLE=str(nginx.ca_file), AWS_CA_BUNDLE=str(nginx.ca_file))
    if variant == "s3":
        source = f"s3://{BUCKET}/{PREFIX}/"
        env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                   AWS_ENDPOINT_URL=nginx.base)
    else:
        source = f"benchhub://{nginx.base.split('://')[1]}/{BUCKET}/{PREFIX}"
        if nginx.tls:
            source = source.replace("benchhub://", "benchhubs://")
    argv = [sys.executable, __file__, "--worker", variant, source]
    run, stdout = timed(nginx, argv, env=env)
    run.detail = json.loads(stdout.strip().splitlines()[-1])
    return run


def sha256_reference(index: list[dict]) -> Run:
    model = BENCH / "origin" / BUCKET / PREFIX
    t0 = time.perf_counter()
    c0 = time.process_time()
    buf = bytearray(16 * MIB)
    view = memoryview(buf)
    for f in index:
        digest = hashlib.sha256()
        with open(model / f["path"], "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                digest.update(view[:n])
        assert digest.hexdigest() == f["sha256"]
    return Run(time.perf_counter() - t0, time.process_time() - c0, 0.0)


def dd_reference(nginx: Nginx, total: int, out: Path) -> Run:
    return timed(nginx, ["dd", "if=/dev/zero", f"of={out / 'dd.bin'}", "bs=1M",
                         f"count={total // MIB}", "conv=fdatasync", "status=none"])[0]


# -- the worker: one cachemesh pull in its own process -----------------------------------------

def worker(variant: str, source: str) -> None:
    t_start = time.perf_counter()
    import cachemesh.fetch.fetcher as fetcher_mod
    import cachemesh.fetch.http as fetch_http
    import cachemesh.fetch.transfer as transfer_mod
    import cachemesh.store.blobs as blobs_mod
    from cachemesh.caches import Caches, make_spec
    from cachemesh.config import Settings
    from cachemesh.sources import SCHEMES

    hub = SCHEMES["benchhub"] = SCHEMES["benchhubs"] = _bench_hub_source()
    if variant == "hash-at-end":
        fetcher_mod.HASH_MODE = "end"
    if variant == "64k-reads":
        fetch_http.HTTP11_READ_BYTES = 64 * 1024
    if variant == "md5":
        hub.publish_md5 = True
    phases: dict[str, float] = {"transfer": 0.0, "hash_tail": 0.0, "commit": 0.0}

    def timing(owner: object, name: str, phase: str) -> None:
        real = getattr(owner, name)

        def timed_call(*a, **k):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                phases[phase] += time.perf_counter() - t

        setattr(owner, name, timed_call)

    timing(transfer_mod.Transfer, "_run_workers", "transfer")
    timing(transfer_mod.PrefixHasher, "finish", "hash_tail")
    timing(blobs_mod.BlobStore, "commit", "commit")
    settings = Settings.from_env()
    caches = Caches(settings)
    t_pull = time.perf_counter()
    result = caches.ensure(make_spec(name="bench", source=source))
    t_end = time.perf_counter()
    kinds = [e.message.split("; ", 1)[-1] for e in caches.events("bench")
             if e.kind == "available"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "startup_s": t_pull - t_start, "pull_s": t_end - t_pull,
        "files": result.files_fetched, "bytes": result.bytes_fetched,
        "cpu_user": usage.ru_utime, "cpu_sys": usage.ru_stime,
        "verification": kinds[0] if kinds else "", **{f"{k}_s": v for k, v in phases.items()},
    }))


def _bench_hub_source():  # type: ignore[no-untyped-def]
    """A minimal hub-like origin: an index (path, size, sha256) and ranged GETs."""
    from cachemesh.fetch import http as fetch_http
    from cachemesh.sources.base import Listing, RemoteFile, RemoteSource

    class BenchHubSource(RemoteSource):
        schemes = ("benchhub", "benchhubs")
        publish_md5 = False

        def __init__(self, uri: str, settings) -> None:  # type: ignore[no-untyped-def]
            super().__init__(settings)
            self.uri = uri
            scheme, _, rest = uri.partition("://")
            host, _, path = rest.partition("/")
            web = "https" if scheme == "benchhubs" else "http"
            self.base = f"{web}://{host}/{path.rstrip('/')}"
            self.index_url = f"{web}://{host}/index.json"
            self.client = fetch_http.make_client(settings)

        @classmethod
        def from_uri(cls, uri, options, settings):  # type: ignore[no-untyped-def]
            return cls(uri, settings)

        def list_files(self) -> Listing:
            index = self.client.get(self.index_url).json()
            return Listing([RemoteFile(f["path"], f["size"], sha256=f["sha256"],
                                       md5=f["md5"] if self.publish_md5 else None,
                                       origin_tag="v1", locator=f"{self.base}/{f['path']}")
                            for f in index])

        def identity(self, file: RemoteFile) -> str:
            return f"benchhub\n{file.locator}\n{file.size}"  # not the sha256: no dedup across runs

        def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
            return fetch_http.read_range(self.client, file.locator, start, end, size=file.size,
                                         ranged=True)

        def close(self) -> None:
            self.client.close()

    return BenchHubSource


# -- the benchmark ----------------------------------------------------------------------------

def warm(index: list[dict]) -> None:
    model = BENCH / "origin" / BUCKET / PREFIX
    for f in index:
        with open(model / f["path"], "rb", buffering=0) as fh:
            while fh.read(16 * MIB):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2GB", help="total model size (default 2GB)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=8,
                        help="ranges at once: curl processes, and cachemesh's range concurrency")
    parser.add_argument("--s3", action="store_true", help="also pull through s3:// and boto3")
    parser.add_argument("--variants", action="store_true",
                        help="also run cachemesh with 64 KiB reads, and with an MD5 check")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    parser.add_argument("--tls", action="store_true",
                        help="serve https (TLS 1.3, a throwaway CA) instead of plain http")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    from cachemesh.config import parse_size

    total = parse_size(args.size)
    print(f"model: {args.size} in {args.shards} shards under {BENCH / 'origin'}", flush=True)
    index = make_model(total, args.shards)
    total = sum(f["size"] for f in index)
    settings = {"CACHEMESH_RANGE_CONCURRENCY": str(args.parallel),
                "CACHEMESH_CHUNK_SIZE": str(CHUNK)}
    tools: dict[str, object] = {
        "curl, one stream": lambda n, out: curl_single(n, index, out),
        f"curl, {args.parallel} ranges in parallel": lambda n, out: curl_parallel(
            n, index, out, args.parallel),
        "cachemesh": lambda n, out: cachemesh_run(n, out, "default", settings),
    }
    # Hashing while fetching against hashing at the end: always compared.
    tools["cachemesh (hash at the end)"] = lambda n, out: cachemesh_run(n, out, "hash-at-end",
                                                                       settings)
    if args.variants:
        tools["cachemesh (64 KiB reads)"] = lambda n, out: cachemesh_run(n, out, "64k-reads",
                                                                        settings)
        tools["cachemesh (+ MD5 check)"] = lambda n, out: cachemesh_run(n, out, "md5", settings)
    if args.s3:
        tools["cachemesh, s3:// (boto3)"] = lambda n, out: cachemesh_run(n, out, "s3", settings)
    tools["sha256 of the bytes, 1 core (reference)"] = lambda n, out: sha256_reference(index)
    tools["dd write + fdatasync (reference)"] = lambda n, out: dd_reference(n, total, out)

    if args.cold and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        sys.exit("--cold needs root (to drop the page cache)")
    results: dict[str, list[Run]] = {name: [] for name in tools}
    loads = []
    out = BENCH / "out"
    with Nginx(tls=args.tls) as nginx:
        for r, name in _report.rotating(list(tools), args.rounds):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            subprocess.run(["sync"], check=True)
            if args.cold:
                _report.drop_page_cache()
            else:
                warm(index)
            loads.append(os.getloadavg()[0])
            run = tools[name](nginx, out)  # type: ignore[operator]
            results[name].append(run)
            print(f"round {r + 1}/{args.rounds}  {name:42s}"
                  f" {total / run.seconds / 1e6:7.0f} MB/s"
                  f"  {run.seconds:6.2f} s  cpu {run.cpu:5.2f} s  nginx {run.nginx_cpu:5.2f} s",
                  flush=True)
        shutil.rmtree(out, ignore_errors=True)
    report(args, total, index, results, loads)


def report(args: argparse.Namespace, total: int, index: list[dict],
           results: dict[str, list[Run]], loads: list[float]) -> None:
    med = _report.median
    gb = total / 1e9
    raw_name = f"curl, {args.parallel} ranges in parallel"
    raw_runs = results[raw_name]

    def rate(runs: list[Run]) -> float:
        return med([total / r.seconds for r in runs])

    def paired(runs: list[Run]) -> float:
        """Median over rounds of (this / parallel curl in the same round)."""
        return med([raw.seconds / r.seconds for r, raw in zip(runs, raw_runs, strict=True)])

    rows = []
    for name, runs in results.items():
        reference = "(reference)" in name
        rows.append([
            name, f"{rate(runs) / 1e6:.0f}",
            (f"{min(total / r.seconds for r in runs) / 1e6:.0f}–"
             f"{max(total / r.seconds for r in runs) / 1e6:.0f}"),
            f"{med([r.seconds for r in runs]):.2f}",
            "" if reference else f"{paired(runs):.2f}",
            f"{med([r.cpu for r in runs]) / gb:.2f}",
            "" if reference else f"{med([r.nginx_cpu for r in runs]) / gb:.2f}",
        ])
    cm = results["cachemesh"]
    end = results["cachemesh (hash at the end)"]
    d = {k: med([r.detail[k] for r in cm]) for k in
         ("pull_s", "transfer_s", "hash_tail_s", "commit_s")}
    d_end = {k: med([r.detail[k] for r in end]) for k in ("transfer_s", "hash_tail_s")}
    sha_cpu = med([r.cpu for r in results["sha256 of the bytes, 1 core (reference)"]]) / gb
    dd_rate = rate(results["dd write + fdatasync (reference)"])
    cm_cpu = med([r.cpu for r in cm]) / gb
    raw_cpu = med([r.cpu for r in raw_runs]) / gb
    cm_ngx = med([r.nginx_cpu for r in cm]) / gb
    overhead = med([r.seconds - r.detail["pull_s"] for r in cm])
    pull_rate = med([total / r.detail["pull_s"] for r in cm])
    pull_paired = med([raw.seconds / r.detail["pull_s"] for r, raw in zip(cm, raw_runs,
                                                                           strict=True)])
    cache_state = (
        "dropped before every run (the origin is read from disk)." if args.cold else
        "the origin's files are read before every run, so every tool gets them from the page"
        " cache (nginx sendfile); downloads are deleted and synced between runs, untimed.")
    s3_note = (
        " The s3:// row is boto3 talking to nginx, which answers ListObjectsV2 with a static"
        " document and serves HEAD and ranged GETs (with If-Match) of the same files: moto"
        " keeps objects in Python memory and serves them through werkzeug, so it would"
        " measure moto. nginx ignores the signature and its ETags are not MD5s, so that path"
        " checks sizes only (the sha256 is still computed)."
        if "cachemesh, s3:// (boto3)" in results else "")
    setup = (
        f"{gb:.2f} GB in {len(index)} files (a config, a tokenizer, {args.shards} shards of"
        f" random bytes), nginx on loopback ({'https, TLS 1.3' if args.tls else 'plain http'}),"
        f" {args.rounds} rounds, tools in a rotating order,"
        f" medians. Page cache: {cache_state} cachemesh: a full pull in a fresh process and"
        f" `CACHEMESH_HOME` per run, `CACHEMESH_RANGE_CONCURRENCY={args.parallel}`, 16 MiB"
        " ranges, every byte hashed and checked against the published sha256"
        f" ({cm[0].detail['verification']}), fsynced, linked into the view. The curl runs"
        " write the bytes and nothing else (no hash, no fsync, ranges left as separate files)."
        + s3_note)
    legend = (
        "\"x parallel curl\" is the median over rounds of the ratio of the two tools' times in"
        " the same round. CPU is user + system time of the tool's processes (kernel"
        " accounting), per GB.")
    disk = (
        f"The disk is not the limit: writing and fdatasync-ing the same bytes runs at"
        f" {dd_rate / 1e6:.0f} MB/s (reference row)" if dd_rate > 1.5 * rate(cm) else
        f"The disk is close to being a limit too: writing and fdatasync-ing the same bytes runs"
        f" at {dd_rate / 1e6:.0f} MB/s (reference row), and curl does not fsync")
    tls_note = (
        " Over TLS, Python's ssl module returns one TLS record (at most 16 KiB) per read, so"
        " the HTTP stack runs once per 16 KiB instead of once per MiB; the fetcher joins those"
        " reads into 1 MiB writes, but h11's work per read and the decryption stay."
        if args.tls else "")
    limits = (
        f"What limits cachemesh here: CPU. The machine has {os.cpu_count()} cores and the"
        f" median load average during the runs was {med(loads):.1f} (other sessions' tests and"
        f" benchmarks share it). A pull spends {cm_cpu:.2f} CPU s/GB against {raw_cpu:.2f} for"
        f" parallel curl: the sha256 of every byte ({sha_cpu:.2f} s/GB on one core with"
        " SHA-NI, reference row), the interpreter's start and imports, and the copies of a"
        " Python HTTP stack (h11 buffers the bytes once more before they are written);"
        f" nginx adds {cm_ngx:.2f} s/GB. {disk}; the fetcher fdatasyncs every second while it"
        f" downloads, so the final fsync of all files took {d['commit_s']:.2f} s.{tls_note}")
    stream_paired, end_paired = paired(cm), paired(end)
    if abs(stream_paired - end_paired) < 0.1:
        verdict = (
            "On this machine neither wins consistently (paired ratios"
            f" {stream_paired:.2f} and {end_paired:.2f}): both do the same work, and with both"
            " cores busy there is no idle core for streaming hashing to overlap with. Its gain"
            " shows in the tail: after a file's last byte, streaming has almost nothing left"
            " to hash, which matters most for one large file (hashing at the end adds about"
            f" {sha_cpu:.2f} s per GB then).")
    else:
        best = "streaming" if stream_paired > end_paired else "hashing at the end"
        verdict = (f"{best[0].upper() + best[1:]} was faster here (paired ratios"
                   f" {stream_paired:.2f} streaming, {end_paired:.2f} at the end).")
    where = (
        f"Where a pull's time goes (medians): {overhead:.2f} s starting the process (the"
        f" interpreter, imports, opening the store), {d['pull_s']:.2f} s pulling; without the"
        f" start, the pull itself ran at {pull_rate / 1e6:.0f} MB/s ({pull_paired:.2f} x"
        " parallel curl). Hashing while fetching (the default) against hashing at the end:"
        f" transfers took {d['transfer_s']:.2f} s (summed over files) and hashing"
        f" {d['hash_tail_s']:.2f} s more after their last byte, against"
        f" {d_end['transfer_s']:.2f} s + {d_end['hash_tail_s']:.2f} s when hashing at the"
        f" end. {verdict}")
    table = _report.table(["tool", "MB/s", "min–max", "seconds", "x parallel curl (paired)",
                           "own CPU s/GB", "nginx CPU s/GB"], rows)
    body = [setup, "", table, "", legend, "", limits, "", where]
    name = "fetch" + ("-tls" if args.tls else "") + ("-cold" if args.cold else "")
    if not args.no_write:
        _report.save_results(name, {
            "total_bytes": total, "files": len(index), "rounds": args.rounds,
            "parallel": args.parallel, "tls": args.tls, "cold": args.cold, "baseline": raw_name,
            "load_averages": loads,
            "tools": {tool: [{"seconds": r.seconds, "cpu": r.cpu, "nginx_cpu": r.nginx_cpu,
                              **r.detail} for r in runs] for tool, runs in results.items()}})
        link = _report.plot(name, "Fetch throughput against parallel curl")
        if link:
            body[3:3] = ["", link]  # after the table, a blank line apart
    text = "\n".join(body)
    print("\n" + text)
    if not args.no_write:
        title = ("Fetch: cachemesh vs curl over loopback"
                 + (", https" if args.tls else "") + (", cold page cache" if args.cold else ""))
        _report.write_section(name, title, text)


if __name__ == "__main__":
    main()
