"""``cachemesh models ls|deploy|rm|apply``: the models of a running server, over its
control API (:class:`~cachemesh.client.ControlClient`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..config import format_size
from ..errors import InvalidInputError
from .common import handle_errors, print_json, print_table, settings_of

if TYPE_CHECKING:
    from ..client import ControlClient

# What a 401 from the server adds to its message: where the command line's token comes from.
TOKEN_HINT = " (set CACHEMESH_API_TOKEN)"


@click.group("models")
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


def _client(ctx: click.Context) -> ControlClient:
    """The server's control API, with the tokens of the settings."""
    from ..client import ControlClient  # here, not above: --help stays fast

    return ControlClient.from_settings(settings_of(ctx), ctx.obj["url"],
                                       unauthorized_hint=TOKEN_HINT)


def _clip(note: str) -> str:
    return note if len(note) <= 160 else note[:159] + "…"


@models.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def models_ls(ctx: click.Context, as_json: bool) -> None:
    """List models: each version's share of traffic, state, the workers (in a cluster: the
    nodes) holding its copies, the memory they hold, requests in flight and per second,
    last use; then routes, aliases, rollouts and errors."""
    with _client(ctx) as api:
        data = api.list_models()
    if as_json:
        print_json(data)
        return
    mem = data["memory"]
    cluster = any("nodes" in v["status"] for m in data["models"] for v in m["versions"].values())
    rows, notes = [], []
    for m in data["models"]:
        for i, (label, v) in enumerate(m["versions"].items()):
            st = v["status"]
            workers = ",".join(str(c["worker"]) for c in st["copies"]) or "-"
            if "nodes" in st:  # cluster mode: the nodes holding a copy, not this one's workers
                workers = ",".join(n["node"] for n in st["nodes"]) or "-"
            held = format_size(st["size_bytes"]) if st["size_bytes"] else "-"
            rows.append((m["name"] if i == 0 else "", label, f"{m['traffic'].get(label, 0)}%",
                         st["state"], workers, held, str(st["inflight"]),
                         f"{st['rate']:.1f}/s", _ago(st["last_used"]), v["source"]))
            reasons = [st["reason"]] if st["reason"] and st["state"] != "Ready" else []
            notes += [f"{m['name']}@{label}: {_clip(n)}" for n in reasons + st["errors"][-1:]]
        for route in m["routes"]:
            test = (f"={route['value']}" if route["value"] is not None else
                    f" starts with {route['prefix']!r}" if route["prefix"] is not None else
                    f" matches {route['pattern']!r}")
            what = (f"header {route['header']}" if route["header"]
                    else f"parameter {route['parameter']}")
            notes.append(f"{m['name']}: route: {what}{test} -> {route['version']}")
        if m["aliases"]:
            notes.append(f"{m['name']}: aliases: "
                         + ", ".join(f"{a} -> {t}" for a, t in m["aliases"].items()))
        if m["rollout"]:  # in full in --json and GET /api/v1/models/NAME
            notes.append(f"{m['name']}: {_clip(m['rollout'])}")
    # MEMORY: what the copies hold in the workers (measured), not the files on disk.
    print_table(("NAME", "VERSION", "TRAFFIC", "STATE", "NODES" if cluster else "WORKERS",
                 "MEMORY", "INFLIGHT", "RATE", "LAST USED", "SOURCE"), rows)
    for note in notes:
        click.echo(note)
    click.echo(f"memory: {format_size(mem['held_bytes'])} held of"
               f" {format_size(mem['budget_bytes'])}"
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
    with _client(ctx) as api:
        data = api.apply_model(doc)
    if as_json:
        print_json(data)
    else:
        click.echo(f"{data['name']}: {data.get('rollout') or data['state']}")


@models.command("deploy")
@click.argument("name")
@click.argument("source")
@click.option("--runtime", default=None, help="sklearn, custom, ... (default: detected).")
@click.option("--version", "model_version", default=None)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Runtime parameter (class=mod:Cls, trusted=false); repeatable.")
@click.option("--eager", is_flag=True, help="Load now rather than on the first request, and"
              " wait for the outcome: Ready, or a non-zero exit with the reason.")
@click.option("--timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="With --eager: seconds to wait for the model to be Ready.")
@click.option("--bucket", default=None, help="Bucket of the model's cache (default: models)."
              " A protected bucket needs its token in $CACHEMESH_BUCKET_TOKEN.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def models_deploy(ctx: click.Context, name: str, source: str, runtime: str | None,
                  model_version: str | None, params: tuple[str, ...], eager: bool,
                  timeout: float, bucket: str | None, as_json: bool) -> None:
    """Deploy SOURCE as model NAME on the running server (kept across restarts).

    SOURCE is read by the server: a local path must exist on the server's machine,
    under the directories of its CACHEMESH_SERVE_SOURCE_ROOTS."""
    parameters: dict[str, str] = {}
    for p in params:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--param expects KEY=VALUE, got {p!r}")
        parameters[key] = value
    with _client(ctx) as api:
        data = api.deploy_model(name, source, runtime=runtime, version=model_version,
                                parameters=parameters, eager=eager, bucket=bucket)
        if eager:
            data = _wait_ready(api, data, timeout)
    if as_json:
        print_json(data)
    else:
        click.echo(f"deployed {data['name']} ({data['state']})")


POLL_S = 0.25


def _wait_ready(api: ControlClient, data: dict, timeout: float) -> dict:
    """Follow an eager deploy until its model is Ready (its description) or Failed
    (:class:`ModelFailedError` with the server's reason)."""
    import time

    from ..errors import ModelFailedError, RequestTimeoutError

    deadline = time.monotonic() + timeout
    while data["state"] not in ("Ready", "Failed"):
        if time.monotonic() > deadline:
            raise RequestTimeoutError(f"model {data['name']!r} was not Ready within"
                                      f" {timeout:g} s (it is {data['state']})")
        time.sleep(POLL_S)
        data = api.get_model(data["name"])
    if data["state"] == "Failed":
        raise ModelFailedError(f"model {data['name']!r} failed: {data['reason']}")
    return data


@models.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
@handle_errors
def models_rm(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Unload and forget models on the running server."""
    with _client(ctx) as api:
        for name in names:
            api.delete_model(name)  # names are checked first: '..' would be another path
            click.echo(f"removed {name}", err=True)
