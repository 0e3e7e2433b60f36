"""The command line: ``cachemesh --help``.

A thin adapter: it parses arguments, calls the core, prints, and maps
:mod:`cachemesh.errors` to exit codes (2: bad input, 3: not found, 4: conflict
or in use, 5: capacity, 6: access denied (by an origin, or by the server's
tokens), 1: anything else). Progress goes to stderr so that
stdout carries only results (a path, or JSON with ``--json``).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from .config import Settings, format_size, parse_size
from .errors import (
    AccessDeniedError,
    CachemeshError,
    CapacityError,
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    RequestTooLargeError,
    UnauthorizedError,
)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES: list[tuple[type[CachemeshError], int]] = [
    (InvalidInputError, 2),
    (NotFoundError, 3),
    (ConflictError, 4),
    (CapacityError, 5),
    (AccessDeniedError, 6),
    (UnauthorizedError, 6),
    (ForbiddenError, 6),
]


def _exit_code(exc: CachemeshError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CachemeshError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(_exit_code(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


class _Size(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_size(value)
        except InvalidInputError as exc:
            self.fail(str(exc), param, ctx)


SIZE = _Size()


def settings_of(ctx: click.Context) -> Settings:
    return ctx.find_root().obj["settings"]


def _caches(ctx: click.Context):  # noqa: ANN202 - lazy import keeps --help fast
    from .caches import Caches

    return Caches(settings_of(ctx))


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Store directory (default: $CACHEMESH_HOME or ~/.cache/cachemesh).")
@click.version_option(package_name="cachemesh")
@click.pass_context
@handle_errors
def main(ctx: click.Context, home: Path | None) -> None:
    """cachemesh: a verified model cache, a fast loader and a multi-model server."""
    overrides = {"home": home} if home is not None else {}
    ctx.obj = {"settings": Settings.from_env(**overrides)}


# -- pull and cache -------------------------------------------------------------

def _spec_options(fn: F) -> F:
    options = [
        click.option("--bucket", default="default", show_default=True, help="Bucket of the view."),
        click.option("--path", "view_path", default=None,
                     help="Path of the view inside the bucket (default: the cache name)."),
        click.option("--include", multiple=True, help="Only files matching this glob (repeatable)."),
        click.option("--exclude", multiple=True, help="Skip files matching this glob (repeatable)."),
        click.option("--size-limit", "size_limit_gib", type=click.FloatRange(min=0, min_open=True),
                     default=None, help="Fail if the cache would exceed this many GiB."),
        click.option("--retention-days", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="gc removes the cache after this many days without use."),
        click.option("--endpoint-url", default=None,
                     help="S3-compatible endpoint (OSS, MinIO) for s3:// and oss:// sources."),
        click.option("--sha256", default=None, help="Expected sha256 of an https:// file."),
        click.option("--follow-symlinks", is_flag=True, default=False,
                     help="Local sources: follow symlinks that point outside the source."),
        click.option("--refresh", is_flag=True, help="Check the origin again even if Available."),
        click.option("--json", "as_json", is_flag=True, help="Print the cache's status as JSON."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _do_pull(ctx: click.Context, source: str, name: str | None, bucket: str, view_path: str | None,
             include: tuple[str, ...], exclude: tuple[str, ...], size_limit_gib: float | None,
             retention_days: float | None, endpoint_url: str | None, sha256: str | None,
             follow_symlinks: bool, refresh: bool, as_json: bool, quiet: bool) -> None:
    from .caches import make_spec
    from .progress import PullBar
    from .sources import parse_source

    settings = settings_of(ctx)
    caches = _caches(ctx)
    source_options = {k: v for k, v in {
        "endpoint_url": endpoint_url, "sha256": sha256,
        "follow_symlinks": follow_symlinks or None,
    }.items() if v is not None}
    src = parse_source(source, source_options, settings)
    spec = make_spec(
        name=name or src.default_name(), source=source, bucket=bucket, path=view_path,
        include=list(include), exclude=list(exclude), size_limit_gib=size_limit_gib,
        retention_days=retention_days, options=source_options,
    )
    with PullBar(spec.name, enabled=not quiet and not as_json) as bar:
        result = caches.ensure(spec, refresh=refresh, on_progress=bar.update)
    if as_json:
        _print_json(caches.get(spec.name).to_dict())
    else:
        if not quiet:
            click.echo(
                f"{spec.name}: {result.files_fetched} file(s) fetched"
                f" ({format_size(result.bytes_fetched)}), {result.files_reused} already present",
                err=True,
            )
        click.echo(str(result.view))


@main.command()
@click.argument("source")
@click.option("--name", default=None, help="Cache name (default: derived from the source).")
@_spec_options
@click.pass_context
@handle_errors
def pull(ctx: click.Context, source: str, name: str | None, **kw: Any) -> None:
    """Pull SOURCE into the cache and print the view directory.

    SOURCE is hf://org/name[@rev], ms://org/name[@rev], s3://bucket/prefix,
    oss://bucket/prefix, https://host/file, file:///path or a plain path.
    """
    _do_pull(ctx, source, name, **kw)


@main.group()
def cache() -> None:
    """Create, list, inspect, verify, pin and remove caches."""


@cache.command("create")
@click.argument("name")
@click.argument("source")
@_spec_options
@click.pass_context
@handle_errors
def cache_create(ctx: click.Context, name: str, source: str, **kw: Any) -> None:
    """Declare cache NAME from SOURCE and prewarm it (same as pull --name NAME)."""
    _do_pull(ctx, source, name, **kw)


@cache.command("ls")
@click.option("--bucket", default=None, help="Only caches of this bucket.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def cache_ls(ctx: click.Context, bucket: str | None, as_json: bool) -> None:
    """List caches."""
    infos = _caches(ctx).list(bucket)
    if as_json:
        _print_json([i.to_dict() for i in infos])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for col in ("NAME", "BUCKET", "PATH", "STATUS", "SIZE", "FILES", "PINNED", "LAST ACCESS", "SOURCE"):
        table.add_column(col)
    for i in infos:
        p = i.progress
        table.add_row(i.name, i.bucket, i.path, i.status, format_size(p.bytes_total),
                      f"{p.files_done}/{p.files_total}", "yes" if i.pinned else "",
                      _when(i.last_access), i.source)
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # piped: do not squeeze columns to 80
    console.print(table)


@cache.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.option("--events/--no-events", default=True, show_default=True)
@click.pass_context
@handle_errors
def cache_status(ctx: click.Context, name: str, as_json: bool, events: bool) -> None:
    """Show a cache's status, progress and events."""
    caches = _caches(ctx)
    info = caches.get(name)
    evs = caches.events(name) if events else []
    if as_json:
        data = info.to_dict()
        data["events"] = [asdict(e) for e in evs]
        _print_json(data)
        return
    p = info.progress
    lines = [
        f"name:        {info.name}",
        f"status:      {info.status}" + (f" ({info.error})" if info.error else ""),
        f"source:      {info.source}" + (f" @ {info.revision}" if info.revision else ""),
        f"view:        {info.view}",
        f"bucket/path: {info.bucket}/{info.path}",
        f"progress:    {format_size(p.bytes_done)} / {format_size(p.bytes_total)},"
        f" {p.files_done}/{p.files_total} files, {format_size(p.rate)}/s",
        f"pinned:      {'yes' if info.pinned else 'no'}    in use: {'yes' if info.in_use else 'no'}",
        f"last access: {_when(info.last_access)}",
    ]
    click.echo("\n".join(lines))
    if evs:
        click.echo("events:")
        for e in evs:
            click.echo(f"  {_when(e.ts)}  {e.level:<7} {e.kind:<14} {e.message}")


@cache.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Remove even if a running process uses it.")
@click.pass_context
@handle_errors
def cache_rm(ctx: click.Context, names: tuple[str, ...], force: bool) -> None:
    """Remove caches: their views, and blobs no other cache uses."""
    caches = _caches(ctx)
    for name in names:
        caches.rm(name, force=force)
        click.echo(f"removed {name}", err=True)


@cache.command("verify")
@click.argument("name", required=False)
@click.option("--quick", is_flag=True, help="Check sizes and links only; do not re-hash blobs.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def cache_verify(ctx: click.Context, name: str | None, quick: bool, as_json: bool) -> None:
    """Re-hash blobs and check views against the database (exit 1 on problems)."""
    problems = _caches(ctx).verify(name, rehash=not quick)
    if as_json:
        _print_json({"ok": not problems, "problems": [asdict(p) for p in problems]})
    elif problems:
        for p in problems:
            where = f"[{p.cache}] " if p.cache else ""
            click.echo(f"{p.kind}: {where}{p.subject}: {p.detail}")
    else:
        click.echo("ok", err=True)
    if problems:
        sys.exit(1)


@cache.command("pin")
@click.argument("name")
@click.pass_context
@handle_errors
def cache_pin(ctx: click.Context, name: str) -> None:
    """Keep a cache: gc and eviction never remove it."""
    _caches(ctx).pin(name, True)


@cache.command("unpin")
@click.argument("name")
@click.pass_context
@handle_errors
def cache_unpin(ctx: click.Context, name: str) -> None:
    """Let gc and eviction remove a cache again."""
    _caches(ctx).pin(name, False)


@main.command()
@click.option("--max-size", type=SIZE, default=None,
              help="Evict least recently used caches until the store fits (e.g. 100GiB).")
@click.option("--tmp-age", type=click.FloatRange(min=0), default=24.0, show_default=True,
              help="Remove partial downloads older than this many hours.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def gc(ctx: click.Context, max_size: int | None, tmp_age: float, as_json: bool) -> None:
    """Remove expired caches, enforce the size limit, free unreferenced blobs."""
    report = _caches(ctx).gc(max_bytes=max_size, tmp_age_s=tmp_age * 3600)
    if as_json:
        _print_json(asdict(report))
        return
    click.echo(
        f"removed {len(report.removed_caches)} cache(s)"
        + (f" ({', '.join(report.removed_caches)})" if report.removed_caches else "")
        + f", {report.blobs_removed} blob(s), freed {format_size(report.bytes_freed)}"
        f" (+{format_size(report.tmp_bytes_freed)} of partial downloads)"
    )


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def du(ctx: click.Context, as_json: bool) -> None:
    """Disk usage: logical bytes (as the views show them) against physical bytes."""
    report = _caches(ctx).du()
    if as_json:
        _print_json(report)
        return
    for c in report["caches"]:
        click.echo(f"{format_size(c['logical_bytes']):>12}  {c['files']:>6} files"
                   f"  {format_size(c['exclusive_bytes']):>12} exclusive  {c['name']}")
    click.echo(f"logical {format_size(report['logical_bytes'])}, physical"
               f" {format_size(report['physical_bytes'])}, saved by dedup"
               f" {format_size(report['saved_bytes'])} ({report['blobs']} blobs)")


# -- convert and jobs ------------------------------------------------------------

class _JobBar:
    """Job progress on stderr: a bar on a terminal, one line per step otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._step: str | None = None

    def __enter__(self) -> _JobBar:
        from rich.console import Console

        console = Console(stderr=True)
        if self.enabled and console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                      TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                      console=console)
            self._progress.start()
            self._task = self._progress.add_task("converting", total=1.0)
        return self

    def update(self, job: Any) -> None:
        if not self.enabled:
            return
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=job.progress,
                                  description=job.step or job.status)
        elif job.step and job.step != self._step:
            click.echo(f"{job.id}: {job.step}", err=True)
        self._step = job.step

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


@main.command()
@click.argument("source")
@click.option("--to", "target", default=None,
              help="Target format: ct2 (CTranslate2), onnx, or safetensors (a GGUF's"
                   " Hugging Face folder, or --tp shards).")
@click.option("--quantization", default=None,
              help="ct2 weight type: int8, int8_float32, int8_float16, int8_bfloat16, int16,"
                   " float16, bfloat16, float32 (default: the checkpoint's own).")
@click.option("--tp", type=int, default=None,
              help="Pre-split a safetensors checkpoint into N tensor-parallel shards.")
@click.option("--dtype", default=None,
              help="A GGUF input's weights, dequantized: float32 (default), bfloat16, float16.")
@click.option("--input-name", default=None,
              help="Name of the input cache when SOURCE is pulled (default: derived from it).")
@click.option("--refresh", is_flag=True, help="Check the input's origin again before converting.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.pass_context
@handle_errors
def convert(ctx: click.Context, source: str, target: str | None, quantization: str | None,
            tp: int | None, dtype: str | None, input_name: str | None, refresh: bool,
            as_json: bool, quiet: bool) -> None:
    """Convert SOURCE into an inference format; print the converted model's directory.

    SOURCE is anything `pull` takes, a cache view directory or a cache name; it is
    pulled through the cache first. A GGUF file becomes a Hugging Face folder
    (--to safetensors), which the other targets then convert. The result is a cache in bucket "converted",
    named by the conversion's identity: converting again is a lookup. The work runs
    as a job (see `cachemesh jobs`).
    """
    import contextlib

    from .convert import Conversions, make_options
    from .progress import PullBar

    if target is None:
        if tp is None:
            raise InvalidInputError("--to is required: ct2, onnx, or safetensors (with --tp N)")
        target = "safetensors"
    options = make_options(target, quantization, tp, dtype)
    conversions = Conversions(_caches(ctx))
    show = not quiet and not as_json

    def waiting(job: Any) -> None:
        if show:
            who = f"job {job.id}" if job is not None else "another process"
            click.echo(f"waiting for {who}, converting the same input with the same options",
                       err=True)

    with PullBar(f"input {source}", enabled=show) as pull_bar, _JobBar(show) as job_bar:
        # Converters and the libraries under them may print; stdout carries only the result.
        with contextlib.redirect_stdout(sys.stderr):
            result = conversions.convert(source, options, input_name=input_name, refresh=refresh,
                                         on_pull=pull_bar.update, on_job=job_bar.update,
                                         on_wait=waiting)
    if as_json:
        _print_json(result.to_dict())
        return
    if not quiet:
        how = "already converted" if result.cached else f"converted by job {result.job}"
        click.echo(f"{result.cache}: {how} (identity {result.identity})", err=True)
    click.echo(str(result.view))


@main.group()
def jobs() -> None:
    """List jobs (conversions) and show their logs."""


def _jobs(ctx: click.Context):  # noqa: ANN202
    from .jobs import Jobs

    return Jobs(_caches(ctx).store)


@jobs.command("ls")
@click.option("--kind", default=None, help="Only jobs of this kind (convert).")
@click.option("--status", default=None, help="Only jobs with this status (Running, Failed, …).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def jobs_ls(ctx: click.Context, kind: str | None, status: str | None, limit: int | None,
            as_json: bool) -> None:
    """List jobs, newest first."""
    found = _jobs(ctx).list(kind=kind, status=status, limit=limit)
    if as_json:
        _print_json([j.to_dict() for j in found])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for col in ("ID", "KIND", "STATUS", "PROGRESS", "STEP", "CREATED", "DURATION", "DETAIL"):
        table.add_column(col)
    for j in found:
        detail = j.error if j.error else (j.result or {}).get("view") or j.spec.get("source", "")
        duration = f"{j.duration:.1f}s" if j.duration is not None else "-"
        table.add_row(j.id, j.kind, j.status, f"{j.progress:.0%}", j.step or "",
                      _when(j.created_at), duration, str(detail))
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    console.print(table)


@jobs.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="The job and its log lines as JSON.")
@click.pass_context
@handle_errors
def jobs_logs(ctx: click.Context, job_id: str, follow: bool, as_json: bool) -> None:
    """Print a job's log."""
    import time as _time

    store = _jobs(ctx)
    if as_json:
        job = store.get(job_id)
        _print_json({"job": job.to_dict(), "logs": [asdict(x) for x in store.logs(job_id)]})
        return
    last = 0
    while True:
        job = store.get(job_id)
        for line in store.logs(job_id, after=last):
            last = line.id
            stamp = dt.datetime.fromtimestamp(line.ts).strftime("%H:%M:%S.%f")[:-3]
            text = line.message.replace("\n", "\n" + " " * 22)
            click.echo(f"{stamp}  {line.level:<7}  {text}")
        if not follow or job.done:
            break
        _time.sleep(0.5)
    if job.status == "Failed" and job.error:
        click.echo(f"job {job.id} failed: {job.error}", err=True)


@main.command()
@click.option("--origin", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to generate the demo's origin folder.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port to serve on (default 8008, or a free one if 8008 is taken).")
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="Serve the demo models until Ctrl-C after pulling them.")
@click.pass_context
@handle_errors
def demo(ctx: click.Context, origin: Path | None, port: int | None, serve: bool) -> None:
    """Build a digits classifier, convert a real chat model (SmolLM2, from its GGUF), pull
    both through the cache, serve them (KServe V2, OpenAI)."""
    from .demo import run_demo, serve_demo

    run_demo(settings_of(ctx), origin)
    if serve:
        serve_demo(settings_of(ctx), origin, port)


# -- buckets ---------------------------------------------------------------------

@main.group()
def bucket() -> None:
    """Protect buckets with a token of their own (see docs/security.md)."""


def _read_token(from_stdin: bool) -> str | None:
    if not from_stdin:
        return None
    token = sys.stdin.readline().strip()
    if not token:
        raise InvalidInputError("--token-stdin: no token on the first line of stdin")
    return token


@bucket.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def bucket_ls(ctx: click.Context, as_json: bool) -> None:
    """List buckets: whether each is protected, and how many caches it holds."""
    rows = _caches(ctx).bucket_list()
    if as_json:
        _print_json(rows)
        return
    click.echo(f"{'BUCKET':<32} {'PROTECTED':<10} CACHES")
    for row in rows:
        click.echo(f"{row['name']:<32} {'yes' if row['protected'] else '':<10} {row['caches']}")


@bucket.command("protect")
@click.argument("name")
@click.option("--token-stdin", is_flag=True,
              help="Use the token on the first line of stdin instead of making one.")
@click.pass_context
@handle_errors
def bucket_protect(ctx: click.Context, name: str, token_stdin: bool) -> None:
    """Protect bucket NAME and print its token (shown once; only a digest is kept).

    Its folder becomes private to the store's owner, its caches leave hub/, and
    the server shows and serves its caches and models only to requests that
    carry the token (X-Cachemesh-Bucket-Token, or Authorization: Bearer).
    """
    token = _caches(ctx).protect_bucket(name, _read_token(token_stdin))
    if not token_stdin:
        click.echo(token)
    click.echo(f"bucket {name} is protected", err=True)


@bucket.command("rotate")
@click.argument("name")
@click.option("--token-stdin", is_flag=True,
              help="Use the token on the first line of stdin instead of making one.")
@click.pass_context
@handle_errors
def bucket_rotate(ctx: click.Context, name: str, token_stdin: bool) -> None:
    """Give protected bucket NAME a new token and print it; the old one stops working."""
    token = _caches(ctx).rotate_bucket_token(name, _read_token(token_stdin))
    if not token_stdin:
        click.echo(token)


@bucket.command("unprotect")
@click.argument("name")
@click.pass_context
@handle_errors
def bucket_unprotect(ctx: click.Context, name: str) -> None:
    """Open bucket NAME again: its folder readable, its caches back in hub/."""
    _caches(ctx).unprotect_bucket(name)
    click.echo(f"bucket {name} is open", err=True)


# -- serving ---------------------------------------------------------------------

@main.command()
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1;"
              " 0.0.0.0 in a container). $CACHEMESH_SERVE_HOST")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="HTTP port (default 8008). $CACHEMESH_SERVE_PORT")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help="KServe V2 gRPC port on the same host (default 8033; 0 turns gRPC off)."
              " $CACHEMESH_SERVE_GRPC_PORT")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes that hold the models (default: one per two cores).")
@click.option("--memory", type=SIZE, default=None,
              help="Memory budget for everything the workers hold, e.g. 8GiB (default: the"
              " container's limit or the physical memory, less a buffer).")
@click.option("--worker-memory-limit", type=SIZE, default=None,
              help="Address-space limit of each worker (RLIMIT_AS); a load past it fails.")
@click.option("--model", "models", multiple=True, metavar="NAME=SOURCE[,runtime=R][,version=V]",
              help="Serve SOURCE (anything `cachemesh pull` takes) as NAME; repeatable."
              " Options: runtime, version, bucket, eager=true (load at start), copy_rate,"
              " max_copies, cooldown_s; other KEY=VALUE options are runtime parameters"
              " (class=mod:Cls, trusted=false).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), default=None,
              help="YAML file with a list of models: simple ones (name, source, runtime,"
              " version, bucket, parameters, eager) or documents with versions, traffic and"
              " routes (docs/mesh.md); for sources that contain ',' or '='.")
@click.option("--copy-rate", type=click.FloatRange(min=0), default=None,
              help="Requests/s per copy above which a model gets another copy on another"
              " worker (default 50; 0: one copy each). $CACHEMESH_SERVE_COPY_RATE")
@click.option("--max-copies", type=click.IntRange(min=1), default=None,
              help="Copies of one model at most (default: one per worker)."
              " $CACHEMESH_SERVE_MAX_COPIES")
@click.option("--copy-cooldown", type=click.FloatRange(min=0), default=None,
              help="Seconds the rate must stay low before an extra copy goes (default 60)."
              " $CACHEMESH_SERVE_COPY_COOLDOWN")
@click.option("--api-token", default=None, metavar="TOKEN",
              help="Bearer token for the control API, the repository extension and /metrics."
              " Prefer $CACHEMESH_API_TOKEN: a flag shows in the process list.")
@click.option("--inference-token", default=None, metavar="TOKEN",
              help="Bearer token for inference (default: inference is open)."
              " Prefer $CACHEMESH_INFERENCE_TOKEN.")
@click.option("--metrics-token", default=None, metavar="TOKEN",
              help="Read-only bearer token for /metrics. Prefer $CACHEMESH_METRICS_TOKEN.")
@click.option("--max-body", type=SIZE, default=None,
              help="Largest inference request body, e.g. 256MiB (default 64MiB); more is 413."
              " $CACHEMESH_SERVE_MAX_BODY")
@click.pass_context
@handle_errors
def serve(ctx: click.Context, host: str | None, port: int | None, grpc_port: int | None,
          workers: int | None,
          memory: int | None, worker_memory_limit: int | None, models: tuple[str, ...],
          config_file: Path | None, api_token: str | None, inference_token: str | None,
          metrics_token: str | None, max_body: int | None, copy_rate: float | None,
          max_copies: int | None, copy_cooldown: float | None) -> None:
    """Serve models over KServe V2 REST and the OpenAI API (/v1), with the control API
    and /metrics, on one port, and over KServe V2 gRPC on --grpc-port.

    Models load on their first request (or at start with eager=true), in worker
    processes, under one memory budget; idle ones are evicted least recently
    used first. Models deployed at run time (POST /api/v1/models, `cachemesh
    models deploy`, PUT /api/v1/models/NAME) are served again after a restart.
    A model requested faster than --copy-rate gets more copies. SIGTERM drains.

    With a control token, the control API needs it; with an inference token,
    inference does too; health probes stay open. See docs/security.md.
    """
    import dataclasses

    from .serve.registry import parse_model_option, read_config

    settings = settings_of(ctx)
    overrides = {k: v for k, v in {
        "host": host, "port": port, "grpc_port": grpc_port, "workers": workers, "memory": memory,
        "worker_memory_limit": worker_memory_limit, "max_body": max_body,
        "copy_rate": copy_rate, "max_copies": max_copies, "copy_cooldown_s": copy_cooldown,
    }.items()
        if v is not None}
    tokens = {k: v.strip() for k, v in {
        "api_token": api_token, "inference_token": inference_token,
        "metrics_token": metrics_token}.items() if v is not None and v.strip()}
    settings = dataclasses.replace(settings, serve=dataclasses.replace(settings.serve, **overrides),
                                   **tokens)
    specs = list(read_config(config_file)) if config_file else []
    specs += [parse_model_option(m) for m in models]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInputError(f"model(s) declared twice: {', '.join(dupes)}")
    cfg = settings.serve
    # The workers start now, and import the frameworks of local models, while this
    # process imports the web stack (a cold start is mostly imports on both sides).
    from .serve.workers import launch_workers

    launched = launch_workers(settings, specs)
    from .serve.server import run

    def started() -> None:
        grpc = f", gRPC {cfg.host}:{cfg.grpc_port}" if cfg.grpc_port else ""
        click.echo(f"cachemesh serving {len(specs)} model(s) on http://{cfg.host}:{cfg.port}"
                   f"{grpc} ({cfg.worker_count()} worker(s)); Ctrl-C or SIGTERM to stop", err=True)

    run(settings, specs, on_started=started, launched=launched)


@main.group()
@click.option("--url", default=None, help="Server URL (default $CACHEMESH_URL or"
              " http://127.0.0.1:8008).")
@click.pass_context
def models(ctx: click.Context, url: str | None) -> None:
    """List, deploy and remove the models of a running server (the control API).

    Sends $CACHEMESH_API_TOKEN as the bearer token and $CACHEMESH_BUCKET_TOKEN
    (','-separated) as the tokens of protected buckets.
    """
    ctx.ensure_object(dict)
    ctx.obj["url"] = (url or settings_of(ctx).serve.url).rstrip("/")


def _without_userinfo(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _api(ctx: click.Context, method: str, path: str, body: Any = None) -> Any:
    """Call the control API with the tokens of the settings: CACHEMESH_API_TOKEN as the
    bearer, CACHEMESH_BUCKET_TOKEN as the tokens of protected buckets."""
    import httpx

    from .errors import ConflictError as Conflict
    from .errors import NotFoundError as Missing

    url = ctx.obj["url"] + path
    settings = settings_of(ctx)
    headers = {}
    if settings.api_token:
        headers["Authorization"] = f"Bearer {settings.api_token}"
    if settings.bucket_tokens:
        headers["X-Cachemesh-Bucket-Token"] = ", ".join(settings.bucket_tokens)
    try:
        r = httpx.request(method, url, json=body, headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        raise CachemeshError(
            f"cannot reach the server at {_without_userinfo(ctx.obj['url'])}:"
            f" {type(exc).__name__}") from None
    if r.status_code >= 400:
        try:
            message = r.json().get("error") or r.text
        except ValueError:
            message = r.text
        if r.status_code == 401:
            message += " (set CACHEMESH_API_TOKEN)"
        cls = {400: InvalidInputError, 401: UnauthorizedError, 403: ForbiddenError,
               404: Missing, 409: Conflict, 413: RequestTooLargeError,
               507: CapacityError}.get(r.status_code, CachemeshError)
        raise cls(f"{message} (HTTP {r.status_code})")
    return r.json() if r.content else None


@models.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def models_ls(ctx: click.Context, as_json: bool) -> None:
    """List models: each version's share of traffic, state, the workers holding its
    copies, size, requests in flight and per second, last use; routes and errors."""
    data = _api(ctx, "GET", "/api/v1/models")
    if as_json:
        _print_json(data)
        return
    mem = data["memory"]
    click.echo(f"{'NAME':<20} {'VERSION':<10} {'TRAFFIC':>7} {'STATE':<9} {'WORKERS':<8}"
               f" {'SIZE':>9} {'INFLIGHT':>8} {'RATE':>7} {'LAST USED':>9}  SOURCE")
    for m in data["models"]:
        for i, (label, v) in enumerate(m["versions"].items()):
            st = v["status"]
            workers = ",".join(str(c["worker"]) for c in st["copies"]) or "-"
            size = format_size(st["size_bytes"]) if st["size_bytes"] else "-"
            share = f"{m['traffic'].get(label, 0)}%"
            click.echo(f"{m['name'] if i == 0 else '':<20} {label:<10} {share:>7}"
                       f" {st['state']:<9} {workers:<8} {size:>9} {st['inflight']:>8}"
                       f" {st['rate']:>5.1f}/s {_ago(st['last_used']):>9}  {v['source']}")
            notes = ([st["reason"]] if st["reason"] and st["state"] != "Ready" else [])
            notes += st["errors"][-1:]
            for note in notes:
                click.echo(f"{'':<20} {note if len(note) <= 160 else note[:159] + '…'}")
        for route in m["routes"]:
            test = (f"={route['value']}" if route["value"] is not None else
                    f" starts with {route['prefix']!r}" if route["prefix"] is not None else
                    f" matches {route['pattern']!r}")
            what = f"header {route['header']}" if route["header"] else f"parameter {route['parameter']}"
            click.echo(f"{'':<20} route: {what}{test} -> {route['version']}")
        if m["aliases"]:
            click.echo(f"{'':<20} aliases: " + ", ".join(f"{a} -> {t}" for a, t in m["aliases"].items()))
        if m["rollout"]:  # in full in --json and GET /api/v1/models/NAME
            note = m["rollout"]
            click.echo(f"{'':<20} {note if len(note) <= 160 else note[:159] + '…'}")
    click.echo(f"memory: {format_size(mem['held_bytes'])} held of {format_size(mem['budget_bytes'])}"
               f" by {sum(1 for w in mem['workers'] if w['alive'])} worker(s)")


def _ago(unix: float | None) -> str:
    if not unix:
        return "-"
    seconds = max(dt.datetime.now().timestamp() - unix, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@models.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def models_apply(ctx: click.Context, file: Path, as_json: bool) -> None:
    """Set a model's document from FILE (YAML or JSON: name, versions, traffic, routes):
    deploys it, or rolls it out and waits until the new versions serve (docs/mesh.md)."""
    import yaml

    try:
        doc = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{file}: not YAML or JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise InvalidInputError(f"{file}: expected a mapping with a 'name'")
    from .store.names import check_name

    # Checked here too: a name like '..' would be resolved into another URL path.
    data = _api(ctx, "PUT", f"/api/v1/models/{check_name(doc['name'], 'model name')}", doc)
    if as_json:
        _print_json(data)
    else:
        click.echo(f"{data['name']}: {data.get('rollout') or data['state']}")


@models.command("deploy")
@click.argument("name")
@click.argument("source")
@click.option("--runtime", default=None, help="sklearn, custom, ... (default: detected).")
@click.option("--version", "model_version", default=None)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Runtime parameter (class=mod:Cls, trusted=false); repeatable.")
@click.option("--eager", is_flag=True, help="Load now rather than on the first request.")
@click.option("--bucket", default=None, help="Bucket of the model's cache (default: models)."
              " A protected bucket needs its token in $CACHEMESH_BUCKET_TOKEN.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def models_deploy(ctx: click.Context, name: str, source: str, runtime: str | None,
                  model_version: str | None, params: tuple[str, ...], eager: bool,
                  bucket: str | None, as_json: bool) -> None:
    """Deploy SOURCE as model NAME on the running server (kept across restarts)."""
    parameters = {}
    for p in params:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--param expects KEY=VALUE, got {p!r}")
        parameters[key] = value
    body = {"name": name, "source": source, "runtime": runtime, "version": model_version,
            "parameters": parameters, "eager": eager}
    if bucket is not None:
        body["bucket"] = bucket
    data = _api(ctx, "POST", "/api/v1/models", body)
    if as_json:
        _print_json(data)
    else:
        click.echo(f"deployed {data['name']} ({data['state']})")


@models.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
@handle_errors
def models_rm(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Unload and forget models on the running server."""
    from .store.names import check_name

    for name in names:
        # Checked here too: a name like '..' would be resolved into another URL path.
        _api(ctx, "DELETE", f"/api/v1/models/{check_name(name, 'model name')}")
        click.echo(f"removed {name}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
