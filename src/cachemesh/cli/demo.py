"""``cachemesh demo``: two models built, pulled and served, to try cachemesh on."""

from __future__ import annotations

from pathlib import Path

import click

from .common import handle_errors, settings_of


@click.command("demo")
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
    from ..demo import run_demo, serve_demo

    run_demo(settings_of(ctx), origin)
    if serve:
        serve_demo(settings_of(ctx), origin, port)
