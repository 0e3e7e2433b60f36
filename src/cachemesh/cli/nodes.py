"""``cachemesh nodes ls``: the nodes of a running server's cluster, over its control API
(``GET /api/v1/nodes``; a lone server lists itself)."""

from __future__ import annotations

import click

from ..config import format_size
from .common import handle_errors, print_json, print_table, settings_of
from .models import TOKEN_HINT


@click.group("nodes")
@click.option("--url", default=None, help="Server URL (default $CACHEMESH_URL or"
              " http://127.0.0.1:8008).")
@click.pass_context
def nodes(ctx: click.Context, url: str | None) -> None:
    """The nodes of the cluster (the control API; $CACHEMESH_API_TOKEN)."""
    ctx.ensure_object(dict)
    ctx.obj["url"] = (url or settings_of(ctx).serve.url).rstrip("/")


@nodes.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def nodes_ls(ctx: click.Context, as_json: bool) -> None:
    """List nodes: address, health, memory used of the budget, the model copies each
    holds, and the models it cannot load (and why)."""
    from ..client import ControlClient

    with ControlClient.from_settings(settings_of(ctx), ctx.obj["url"],
                                     unauthorized_hint=TOKEN_HINT) as api:
        found = api.list_nodes()
    if as_json:
        print_json(found)
        return
    rows, notes = [], []
    for n in found:
        health = ("degraded" if n.get("degraded") else "stale" if n.get("stale")
                  else "draining" if n.get("draining") else "healthy")
        cap = n.get("capacity_bytes")
        memory = (f"{format_size(n.get('memory_used_bytes') or 0)}/"
                  f"{format_size(cap) if cap else '-'}")
        copies = ", ".join(f"{c['model']}@{c['version']}" + ("" if c["state"] == "ready"
                                                             else f" ({c['state']})")
                           for c in n.get("copies") or []) or "-"
        me = "*" if n.get("self") else ""  # the node that answered
        rows.append((n["name"] + me, n["advertise"], health, memory, copies))
        notes += [f"{n['name']}: cannot load {model}: {why}"
                  for model, why in sorted((n.get("cannot_load") or {}).items())]
    print_table(("NAME", "ADVERTISE", "HEALTH", "MEMORY USED/BUDGET", "COPIES"), rows)
    for note in notes:
        click.echo(note)
