"""``cachemesh serve``: the server (KServe V2 REST and gRPC, OpenAI, the control API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..config import Settings
from ..errors import InvalidInputError
from .common import SIZE, handle_errors, settings_of


@click.command("serve")
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
@click.option("--cluster", default=None, metavar="etcd://HOST:PORT[,HOST:PORT...]",
              help="Join the cluster whose state is in this etcd (needs"
              " $CACHEMESH_CLUSTER_TOKEN). $CACHEMESH_CLUSTER")
@click.option("--node-name", default=None, metavar="NAME",
              help="This node's name in the cluster (default: the host name)."
              " $CACHEMESH_NODE_NAME")
@click.option("--advertise", default=None, metavar="http(s)://ADDR:PORT",
              help="Where the other nodes reach this one (default: --host and --port)."
              " $CACHEMESH_ADVERTISE")
@click.option("--etcd-cacert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CA of etcd's certificate (etcd over HTTPS). $CACHEMESH_ETCD_CACERT")
@click.option("--etcd-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Client certificate for etcd. $CACHEMESH_ETCD_CERT")
@click.option("--etcd-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Key of the client certificate. $CACHEMESH_ETCD_KEY")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Serve HTTPS with this certificate (PEM chain), e.g. for an"
              " https --advertise URL. $CACHEMESH_SERVE_TLS_CERT")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Key of --tls-cert. $CACHEMESH_SERVE_TLS_KEY")
@click.pass_context
@handle_errors
def serve(ctx: click.Context, host: str | None, port: int | None, grpc_port: int | None,
          workers: int | None,
          memory: int | None, worker_memory_limit: int | None, models: tuple[str, ...],
          config_file: Path | None, api_token: str | None, inference_token: str | None,
          metrics_token: str | None, max_body: int | None, copy_rate: float | None,
          max_copies: int | None, copy_cooldown: float | None, cluster: str | None,
          node_name: str | None, advertise: str | None, etcd_cacert: Path | None,
          etcd_cert: Path | None, etcd_key: Path | None, tls_cert: Path | None,
          tls_key: Path | None) -> None:
    """Serve models over KServe V2 REST and the OpenAI API (/v1), with the control API
    and /metrics, on one port, and over KServe V2 gRPC on --grpc-port.

    Models load on their first request (or at start with eager=true), in worker
    processes, under one memory budget; idle ones are evicted least recently
    used first. Models deployed at run time (POST /api/v1/models, `cachemesh
    models deploy`, PUT /api/v1/models/NAME) are served again after a restart.
    A model requested faster than --copy-rate gets more copies. SIGTERM drains.

    With a control token, the control API needs it; with an inference token,
    inference does too; health probes stay open. See docs/security.md.

    With --cluster, the server joins a cluster of nodes coordinated through etcd:
    declarations are shared, every node lists the others (docs/cluster.md).
    """
    import dataclasses

    from ..serve.core.registry import parse_model_option, read_config

    settings = settings_of(ctx)
    overrides = {k: v for k, v in {
        "host": host, "port": port, "grpc_port": grpc_port, "workers": workers, "memory": memory,
        "worker_memory_limit": worker_memory_limit, "max_body": max_body,
        "copy_rate": copy_rate, "max_copies": max_copies, "copy_cooldown_s": copy_cooldown,
        "tls_cert": tls_cert, "tls_key": tls_key,
    }.items()
        if v is not None}
    tokens = {k: v.strip() for k, v in {
        "api_token": api_token, "inference_token": inference_token,
        "metrics_token": metrics_token}.items() if v is not None and v.strip()}
    settings = dataclasses.replace(settings, serve=dataclasses.replace(settings.serve, **overrides),
                                   **tokens)
    if (settings.serve.tls_cert is None) != (settings.serve.tls_key is None):
        raise InvalidInputError("--tls-cert and --tls-key go together: give both or neither")
    settings = with_cluster_flags(settings, cluster=cluster, node_name=node_name,
                                  advertise=advertise, etcd_cacert=etcd_cacert,
                                  etcd_cert=etcd_cert, etcd_key=etcd_key)
    specs = list(read_config(config_file)) if config_file else []
    specs += [parse_model_option(m) for m in models]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInputError(f"model(s) declared twice: {', '.join(dupes)}")
    # Both ports first: one taken is one line, before any worker or import.
    from ..serve.adapters.ports import take_ports

    ports = take_ports(settings.serve)
    settings = dataclasses.replace(settings, serve=dataclasses.replace(
        settings.serve, port=ports.http_port))
    cfg = settings.serve
    if settings.cluster.enabled:
        import asyncio

        from ..serve.cluster.cluster_mode import preflight

        # A clear refusal (no token, etcd unreachable, the name taken) before anything starts.
        asyncio.run(preflight(settings))
    # The workers start now, and import the frameworks of local models, while this
    # process imports the web stack (a cold start is mostly imports on both sides).
    from ..serve.workers.workers import launch_workers

    launched = launch_workers(settings, specs)
    from ..serve.adapters.server import run

    def started() -> None:
        grpc = f", gRPC {cfg.host}:{cfg.grpc_port}" if cfg.grpc_port else ""
        scheme = "https" if cfg.tls_cert else "http"
        click.echo(f"cachemesh serving {len(specs)} model(s) on {scheme}://{cfg.host}:{cfg.port}"
                   f"{grpc} ({cfg.worker_count()} worker(s)); Ctrl-C or SIGTERM to stop", err=True)

    run(settings, specs, on_started=started, launched=launched, ports=ports)


def with_cluster_flags(settings: Settings, **flags: Any) -> Settings:
    """The settings with the cluster flags given on the command line over the environment's."""
    import dataclasses

    from ..config import parse_advertise_url, parse_cluster_url, parse_node_name

    cluster = settings.cluster
    changes: dict[str, Any] = {}
    if flags.get("cluster"):
        changes["endpoints"] = parse_cluster_url(flags["cluster"].strip())
    if flags.get("node_name"):
        changes["node_name"] = parse_node_name(flags["node_name"])
    if flags.get("advertise"):
        changes["advertise"] = parse_advertise_url(flags["advertise"])
    for name in ("etcd_cacert", "etcd_cert", "etcd_key"):
        if flags.get(name) is not None:
            changes[name] = flags[name]
    if not changes:
        return settings
    cluster = dataclasses.replace(cluster, **changes)
    if (cluster.etcd_cert is None) != (cluster.etcd_key is None):
        raise InvalidInputError("--etcd-cert and --etcd-key go together: give both or neither")
    return dataclasses.replace(settings, cluster=cluster)
