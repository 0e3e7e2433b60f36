"""What the command groups share: error handling, the store, sizes, times, JSON."""

from __future__ import annotations

import datetime as dt
import functools
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..config import Settings, parse_size
from ..error_codes import codes_of
from ..errors import CachemeshError, InvalidInputError

if TYPE_CHECKING:
    from ..caches import Caches

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """``error: <message>`` on stderr and the error's exit code (``error_codes.py``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CachemeshError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(codes_of(exc).exit)
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


def caches_of(ctx: click.Context) -> Caches:
    from ..caches import Caches  # here, not above: --help stays fast

    return Caches(settings_of(ctx))


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def print_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table on stdout (rich), as wide as a piped reader needs."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # piped: do not squeeze columns to 80
    console.print(table)
