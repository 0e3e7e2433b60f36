"""Origins of model files, one module each, behind :class:`~.base.Source`.

:func:`parse_source` turns a URI into a source. The table below is the one
place where a scheme is bound to its module; modules are imported on first use
so that an origin's client library (boto3, huggingface_hub) loads only when it
is needed.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import UnknownSourceError
from .base import Listing, RemoteFile, RemoteSource, Source

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Listing", "RemoteFile", "RemoteSource", "Source", "parse_source", "SCHEMES"]

# scheme -> "module:Class" (absolute), or the class itself
SCHEMES: dict[str, str | type[Source]] = {
    "file": "cachemesh.sources.local:LocalSource",
    "hf": "cachemesh.sources.hf:HfSource",
    "ms": "cachemesh.sources.modelscope:ModelScopeSource",
    "modelscope": "cachemesh.sources.modelscope:ModelScopeSource",
    "s3": "cachemesh.sources.s3:S3Source",
    "oss": "cachemesh.sources.s3:S3Source",
    "https": "cachemesh.sources.http:HttpSource",
    "http": "cachemesh.sources.http:HttpSource",
}

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    match = _SCHEME_RE.match(uri)
    return match.group(1).lower() if match else "file"


def source_class(scheme: str) -> type[Source]:
    target = SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in sorted(SCHEMES))
        raise UnknownSourceError(
            f"unknown source scheme {scheme + '://'!r}; supported: {known}, or a plain local path"
        )
    if isinstance(target, type):
        return target
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_source(
    uri: str, options: Mapping[str, Any] | None = None, settings: Settings | None = None
) -> Source:
    """The source for ``uri``: ``hf://org/name@rev``, ``s3://bucket/prefix``, a path…"""
    if not isinstance(uri, str) or not uri.strip():
        raise UnknownSourceError("a source is required (a URI such as hf://org/name, or a path)")
    if settings is None:
        from ..config import Settings

        settings = Settings.from_env()
    return source_class(scheme_of(uri)).from_uri(uri.strip(), dict(options or {}), settings)
