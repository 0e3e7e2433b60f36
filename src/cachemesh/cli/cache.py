"""``cachemesh pull``, ``cachemesh cache ...``, ``gc`` and ``du``: the caches of the local store."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import click

from ..config import format_size
from .common import SIZE, F, caches_of, handle_errors, print_json, print_table, when


def _spec_options(fn: F) -> F:
    options = [
        click.option("--bucket", default="default", show_default=True, help="Bucket of the view."),
        click.option("--path", "view_path", default=None,
                     help="Path of the view inside the bucket (default: the cache name)."),
        click.option("--include", multiple=True, help="Only files whose path matches this glob (repeatable; as huggingface_hub's allow_patterns: the full path, DIR/ for a folder)."),
        click.option("--exclude", multiple=True, help="Skip files whose path matches this glob (repeatable; as ignore_patterns)."),
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
    """The pull of :func:`cachemesh.pull` (caches/pull.py), with a progress bar."""
    from ..caches.pull import SourcePull
    from ..progress import PullBar

    caches = caches_of(ctx)
    source_options = {k: v for k, v in {
        "endpoint_url": endpoint_url, "sha256": sha256,
        "follow_symlinks": follow_symlinks or None,
    }.items() if v is not None}
    named = {"name": name} if name else {}
    with SourcePull(caches, source, source_options, bucket=bucket, path=view_path,
                    include=list(include), exclude=list(exclude), size_limit_gib=size_limit_gib,
                    retention_days=retention_days, **named) as job:
        with PullBar(job.spec.name, enabled=not quiet and not as_json) as bar:
            result = job.run(refresh=refresh, on_progress=bar.update)
    if as_json:
        print_json(caches.get(job.spec.name).to_dict())
    else:
        if not quiet:
            click.echo(
                f"{job.spec.name}: {result.files_fetched} file(s) fetched"
                f" ({format_size(result.bytes_fetched)}), {result.files_reused} already present",
                err=True,
            )
        click.echo(str(result.view))


@click.command("pull")
@click.argument("source")
@click.option("--name", default=None, help="Cache name (default: derived from the source).")
@click.option("--nodes", default=None,
              help="Cluster mode: pull it onto these nodes: all, a count, or a,b (through"
                   " the local node's API, $CACHEMESH_URL).")
@click.option("--min-copies", type=click.IntRange(min=1), default=None,
              help="Cluster mode: eviction keeps it on at least this many nodes.")
@click.option("--timeout", "wait_s", type=click.FloatRange(min=0), default=3600.0,
              show_default=True, help="With --nodes: seconds to wait for the nodes.")
@_spec_options
@click.pass_context
@handle_errors
def pull(ctx: click.Context, source: str, name: str | None, nodes: str | None,
         min_copies: int | None, wait_s: float, **kw: Any) -> None:
    """Pull SOURCE into the cache and print the view directory.

    SOURCE is hf://org/name[@rev], ms://org/name[@rev], s3://bucket/prefix,
    oss://bucket/prefix, https://host/file, file:///path or a plain path.

    With $CACHEMESH_CLUSTER set, the pull asks the cluster's peers for each file before
    its origin (the blob index in etcd). With --nodes or --min-copies, the cache is
    declared cluster-wide through the local node, and the command waits for the nodes.
    """
    if nodes is not None or min_copies is not None:
        _declare_cluster_wide(ctx, source, name, nodes, min_copies, wait_s, **kw)
        return
    _do_pull(ctx, source, name, **kw)


def _declare_cluster_wide(ctx: click.Context, source: str, name: str | None,
                          nodes: str | None, min_copies: int | None, wait_s: float, *,
                          bucket: str, view_path: str | None, include: tuple[str, ...],
                          exclude: tuple[str, ...], size_limit_gib: float | None,
                          retention_days: float | None, endpoint_url: str | None,
                          sha256: str | None, follow_symlinks: bool, refresh: bool,
                          as_json: bool, quiet: bool) -> None:
    """POST the declaration to the local node; wait until every selected node is done."""
    import time

    from ..client import ControlClient
    from ..cluster.cache_decls import parse_nodes
    from ..errors import CachemeshError
    from ..sources import parse_source
    from .common import settings_of

    settings = settings_of(ctx)
    chosen = parse_nodes(nodes) if nodes is not None else "all"
    options = {k: v for k, v in {"endpoint_url": endpoint_url, "sha256": sha256,
                                 "follow_symlinks": follow_symlinks or None}.items()
               if v is not None}
    cache_name = name or parse_source(source, options, settings).default_name()
    client = ControlClient.from_settings(settings)
    client.create_datacache(cache_name, source, bucket=bucket, path=view_path,
                            include=include, exclude=exclude, size_gib=size_limit_gib,
                            retention_days=retention_days, options=options or None,
                            nodes=chosen, min_copies=min_copies)
    deadline = time.monotonic() + wait_s
    shown: dict[str, str] = {}
    while True:
        described = client.get_datacache(cache_name)
        progress = described.get("nodes") or {}
        if not as_json and not quiet:  # each node's news as it comes
            for node, p in sorted(progress.items()):
                line = _node_line(node, p)
                if shown.get(node) != line:
                    shown[node] = line
                    click.echo(line, err=True)
        if progress and described.get("cluster", {}).get("done"):
            break
        if time.monotonic() > deadline:
            raise CachemeshError(f"cache {cache_name!r}: not on every node after {wait_s} s:"
                                 f" {progress}")
        time.sleep(0.5)
    if as_json:
        print_json(described)
    else:
        if described.get("view"):
            click.echo(described["view"])
    failed = [n for n, p in progress.items() if p.get("state") == "Failed"]
    if failed:
        raise CachemeshError(f"cache {cache_name!r} failed on {', '.join(sorted(failed))}")


def _node_line(node: str, p: dict) -> str:
    done, total = p.get("bytes_done") or 0, p.get("bytes_total") or 0
    sizes = f" {format_size(done)}/{format_size(total)}" if total else ""
    return (f"{node}: {p.get('state')} {100 * (p.get('progress') or 0):.0f}%{sizes}"
            + (f" ({p['error']})" if p.get("error") else ""))


@click.group("cache")
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
    infos = caches_of(ctx).list(bucket)
    if as_json:
        print_json([i.to_dict() for i in infos])
        return
    print_table(
        ("NAME", "BUCKET", "PATH", "STATUS", "SIZE", "FILES", "PINNED", "LAST ACCESS", "SOURCE"),
        [(i.name, i.bucket, i.path, i.status, format_size(i.progress.bytes_total),
          f"{i.progress.files_done}/{i.progress.files_total}", "yes" if i.pinned else "",
          when(i.last_access), i.source) for i in infos])


@cache.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.option("--events/--no-events", default=True, show_default=True)
@click.pass_context
@handle_errors
def cache_status(ctx: click.Context, name: str, as_json: bool, events: bool) -> None:
    """Show a cache's status, progress and events."""
    caches = caches_of(ctx)
    info = caches.get(name)
    evs = caches.events(name) if events else []
    if as_json:
        data = info.to_dict()
        data["events"] = [asdict(e) for e in evs]
        print_json(data)
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
        f"last access: {when(info.last_access)}",
    ]
    click.echo("\n".join(lines))
    if evs:
        click.echo("events:")
        for e in evs:
            click.echo(f"  {when(e.ts)}  {e.level:<7} {e.kind:<14} {e.message}")


@cache.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Remove even if a running process uses it.")
@click.pass_context
@handle_errors
def cache_rm(ctx: click.Context, names: tuple[str, ...], force: bool) -> None:
    """Remove caches: their views, and blobs no other cache uses."""
    caches = caches_of(ctx)
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
    problems = caches_of(ctx).verify(name, rehash=not quick)
    if as_json:
        print_json({"ok": not problems, "problems": [asdict(p) for p in problems]})
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
    caches_of(ctx).pin(name, True)


@cache.command("unpin")
@click.argument("name")
@click.pass_context
@handle_errors
def cache_unpin(ctx: click.Context, name: str) -> None:
    """Let gc and eviction remove a cache again."""
    caches_of(ctx).pin(name, False)


@click.command("gc")
@click.option("--max-size", type=SIZE, default=None,
              help="Evict least recently used caches until the store fits (e.g. 100GiB).")
@click.option("--tmp-age", type=click.FloatRange(min=0), default=24.0, show_default=True,
              help="Remove partial downloads older than this many hours.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def gc(ctx: click.Context, max_size: int | None, tmp_age: float, as_json: bool) -> None:
    """Remove expired caches, enforce the size limit, free unreferenced blobs."""
    report = caches_of(ctx).gc(max_bytes=max_size, tmp_age_s=tmp_age * 3600)
    if as_json:
        print_json(asdict(report))
        return
    click.echo(
        f"removed {len(report.removed_caches)} cache(s)"
        + (f" ({', '.join(report.removed_caches)})" if report.removed_caches else "")
        + f", {report.blobs_removed} blob(s), freed {format_size(report.bytes_freed)}"
        f" (+{format_size(report.tmp_bytes_freed)} of partial downloads)"
    )


@click.command("du")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def du(ctx: click.Context, as_json: bool) -> None:
    """Disk usage: logical bytes (as the views show them) against physical bytes.
    EXCLUSIVE: the bytes no other cache shares (what removing the cache frees)."""
    report = caches_of(ctx).du()
    if as_json:
        print_json(report)
        return
    print_table(("NAME", "BUCKET", "FILES", "LOGICAL", "EXCLUSIVE"),
                [(c["name"], c["bucket"], str(c["files"]), format_size(c["logical_bytes"]),
                  format_size(c["exclusive_bytes"])) for c in report["caches"]])
    click.echo(f"logical {format_size(report['logical_bytes'])}, physical"
               f" {format_size(report['physical_bytes'])}, saved by dedup"
               f" {format_size(report['saved_bytes'])} ({report['blobs']} blobs)")
