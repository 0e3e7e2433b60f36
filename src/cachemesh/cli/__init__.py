"""The command line: ``cachemesh --help``.

A thin adapter, one module per command group: it parses arguments, calls the core
(the local store) or a running server (:class:`~cachemesh.client.ControlClient`),
prints, and turns :mod:`cachemesh.errors` into exit codes (``error_codes.py``).
Progress goes to stderr so that stdout carries only results (a path, or JSON with
``--json``).

    cache.py    pull, cache create|ls|status|rm|verify|pin|unpin, gc, du
    bucket.py   bucket ls|protect|rotate|unprotect
    convert.py  convert
    jobs.py     jobs ls|logs
    serve.py    serve
    models.py   models ls|deploy|rm|apply (over the control API)
    nodes.py    nodes ls (over the control API)
    demo.py     demo
    common.py   what they share: error handling, the store, sizes, times, JSON
"""

from __future__ import annotations

from pathlib import Path

import click

from ..config import Settings
from . import bucket, cache, convert, demo, jobs, models, nodes, serve
from .common import handle_errors

__all__ = ["main"]


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


for _command in (cache.pull, cache.cache, cache.gc, cache.du, convert.convert, jobs.jobs,
                 demo.demo, bucket.bucket, serve.serve, models.models, nodes.nodes):
    main.add_command(_command)
