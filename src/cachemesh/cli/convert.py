"""``cachemesh convert``: a model into an inference format, as a job."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import InvalidInputError
from .common import caches_of, handle_errors, print_json


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


@click.command("convert")
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

    from ..convert import Conversions, make_options
    from ..progress import PullBar

    if target is None:
        if tp is None:
            raise InvalidInputError("--to is required: ct2, onnx, or safetensors (with --tp N)")
        target = "safetensors"
    options = make_options(target, quantization, tp, dtype)
    conversions = Conversions(caches_of(ctx))
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
        print_json(result.to_dict())
        return
    if not quiet:
        how = "already converted" if result.cached else f"converted by job {result.job}"
        click.echo(f"{result.cache}: {how} (identity {result.identity})", err=True)
    click.echo(str(result.view))
