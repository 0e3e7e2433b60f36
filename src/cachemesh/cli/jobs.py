"""``cachemesh jobs ls|logs``: the jobs (conversions) of the local store."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from .common import caches_of, handle_errors, print_json, print_table, when

if TYPE_CHECKING:
    from ..jobs import Jobs


@click.group("jobs")
def jobs() -> None:
    """List jobs (conversions) and show their logs."""


def _jobs(ctx: click.Context) -> Jobs:
    from ..jobs import Jobs

    return Jobs(caches_of(ctx).store)


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
        print_json([j.to_dict() for j in found])
        return
    rows = []
    for j in found:
        detail = j.error if j.error else (j.result or {}).get("view") or j.spec.get("source", "")
        duration = f"{j.duration:.1f}s" if j.duration is not None else "-"
        rows.append((j.id, j.kind, j.status, f"{j.progress:.0%}", j.step or "",
                     when(j.created_at), duration, str(detail)))
    print_table(("ID", "KIND", "STATUS", "PROGRESS", "STEP", "CREATED", "DURATION", "DETAIL"),
                rows)


@jobs.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="The job and its log lines as JSON.")
@click.pass_context
@handle_errors
def jobs_logs(ctx: click.Context, job_id: str, follow: bool, as_json: bool) -> None:
    """Print a job's log."""
    store = _jobs(ctx)
    if as_json:
        job = store.get(job_id)
        print_json({"job": job.to_dict(), "logs": [asdict(x) for x in store.logs(job_id)]})
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
        time.sleep(0.5)
    if job.status == "Failed" and job.error:
        click.echo(f"job {job.id} failed: {job.error}", err=True)
