"""``cachemesh bucket ls|protect|rotate|unprotect``: buckets with a token of their own."""

from __future__ import annotations

import sys

import click

from ..errors import InvalidInputError
from .common import caches_of, handle_errors, print_json, print_table


@click.group("bucket")
def bucket() -> None:
    """Protect buckets with a token of their own (see docs/security.md)."""


_token_stdin = click.option(
    "--token-stdin", is_flag=True,
    help="Use the token on the first line of stdin instead of making one.")


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
    rows = caches_of(ctx).bucket_list()
    if as_json:
        print_json(rows)
        return
    print_table(("BUCKET", "PROTECTED", "CACHES"),
                [(r["name"], "yes" if r["protected"] else "", str(r["caches"])) for r in rows])


@bucket.command("protect")
@click.argument("name")
@_token_stdin
@click.pass_context
@handle_errors
def bucket_protect(ctx: click.Context, name: str, token_stdin: bool) -> None:
    """Protect bucket NAME and print its token (shown once; only a digest is kept).

    Its folder becomes private to the store's owner, its caches leave hub/, and
    the server shows and serves its caches and models only to requests that
    carry the token (X-Cachemesh-Bucket-Token, or Authorization: Bearer).
    """
    token = caches_of(ctx).protect_bucket(name, _read_token(token_stdin))
    if not token_stdin:
        click.echo(token)
    click.echo(f"bucket {name} is protected", err=True)


@bucket.command("rotate")
@click.argument("name")
@_token_stdin
@click.pass_context
@handle_errors
def bucket_rotate(ctx: click.Context, name: str, token_stdin: bool) -> None:
    """Give protected bucket NAME a new token and print it; the old one stops working."""
    token = caches_of(ctx).rotate_bucket_token(name, _read_token(token_stdin))
    if not token_stdin:
        click.echo(token)


@bucket.command("unprotect")
@click.argument("name")
@click.pass_context
@handle_errors
def bucket_unprotect(ctx: click.Context, name: str) -> None:
    """Open bucket NAME again: its folder readable, its caches back in hub/."""
    caches_of(ctx).unprotect_bucket(name)
    click.echo(f"bucket {name} is open", err=True)
