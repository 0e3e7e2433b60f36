"""Alibaba Cloud ECI's CreateDataCache, translated: its request into a cache spec, and
a cache's description into ECI's names.

A request (:class:`EciCreateDataCache`, recognised by its capitalised
``Name``/``DataSource``)::

    {"Name": "qwen", "Bucket": "default", "Path": "/models/qwen", "Size": 20, "RetentionDays": 7,
     "DataSource": {"Type": "URL", "Options": {"repoSource": "HuggingFace/Model",
                                                "repoId": "Qwen/Qwen2.5-0.5B", "revision": "main"}}}

``DataSource.Type``: ``URL`` with ``repoSource`` ``HuggingFace/Model``,
``HuggingFace/Dataset`` or ``ModelScope/Model`` and ``repoId`` (``revision``
optional), or with ``url`` (one https file); ``NAS`` with ``server`` and
``path`` of a share this node has mounted already (found in /proc/self/mounts;
``server`` ``localhost`` names a local directory); ``OSS`` with ``bucket``,
``path`` (a prefix) and ``url`` (the endpoint). The option names follow ECI's
documentation as we know it (the option table was not reachable from here,
2026-11); credentials in options (``akId``, ``akSecret``, ...) are refused:
they would be stored with the cache, so OSS reads ``AWS_*`` from the server's
environment instead. ``Size`` (GiB, 20 by default as in ECI) is the cache's
quota: a pull whose files exceed it fails. ``RetentionDays``: a cache not used
for that long is removed by ``cachemesh gc`` (the server does not run gc on
its own).

Every description carries, whatever shape created the cache, the ECI-named fields
(:func:`eci_fields`: ``DataCacheId``, ``Name``, ``Status``, ``LastMatchedTime``, ...):
ECI's statuses are ours (Pending, Loading, Available, Failed).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ...caches import AVAILABLE, MAX_RETENTION_DAYS, MAX_SIZE_LIMIT_GIB, CacheInfo
from ...errors import InvalidInputError

ECI_DEFAULT_SIZE_GIB = 20
# Option names that carry credentials: never stored with a cache.
_SECRET_OPTIONS = {"akid", "aksecret", "accesskeyid", "accesskeysecret", "securitytoken",
                   "token", "password", "stsToken".lower()}


class EciDataSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    Type: Literal["URL", "NAS", "OSS"]
    Options: dict[str, str | int | bool] = Field(default_factory=dict)


class EciCreateDataCache(BaseModel):
    """Alibaba Cloud ECI's CreateDataCache request (the parts that mean something on one node)."""

    model_config = ConfigDict(extra="forbid")

    Name: str
    DataSource: EciDataSource
    Bucket: str = "default"
    Path: str | None = None
    Size: float = Field(default=ECI_DEFAULT_SIZE_GIB, gt=0, le=MAX_SIZE_LIMIT_GIB,
                        description="GiB; the cache's quota")
    RetentionDays: float | None = Field(default=None, gt=0, le=MAX_RETENTION_DAYS)
    # Cluster mode (ours, in ECI's casing): which nodes pull it ("all", a count, names)
    # and how many copies eviction keeps cluster-wide (serve/datacache/preheat.py).
    Nodes: StrictStr | StrictInt | list[StrictStr] | None = None
    MinCopies: int | None = Field(default=None, ge=1)
    # Accepted for compatibility, without meaning on a single node.
    RegionId: str | None = None
    SecurityGroupId: str | None = None
    VSwitchId: str | None = None
    ClientToken: str | None = None
    ResourceGroupId: str | None = None


def _refuse_secrets(options: dict[str, Any]) -> None:
    secret = sorted(k for k in options if k.lower() in _SECRET_OPTIONS)
    if secret:
        raise InvalidInputError(
            f"DataSource.Options: {', '.join(secret)} would be stored with the cache; give the"
            " server its credentials in its environment (AWS_ACCESS_KEY_ID, ...) instead")


def _option(options: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = options.get(name)
    if value is None or str(value).strip() == "":
        if required:
            raise InvalidInputError(f"DataSource.Options.{name} is required")
        return None
    return str(value).strip()


def nas_path(server: str, share_path: str, mounts_file: str = "/proc/self/mounts") -> Path:
    """Where this node has ``server:share_path`` mounted (or a local directory for localhost)."""
    if not share_path.startswith("/"):
        raise InvalidInputError(f"DataSource.Options.path must be absolute, got {share_path!r}")
    if server in ("localhost", "127.0.0.1", "::1"):
        local = Path(share_path)
    else:
        local = None
        try:
            lines = Path(mounts_file).read_text().splitlines()
        except OSError:
            lines = []
        best = ""
        for line in lines:
            fields = line.split()
            if len(fields) < 3 or not fields[2].startswith("nfs"):
                continue
            host, _, exported = fields[0].partition(":")
            exported = "/" + exported.strip("/")
            rest = share_path.rstrip("/") or "/"
            if host != server or not (rest == exported or rest.startswith(exported.rstrip("/") + "/")):
                continue
            if len(exported) > len(best):
                best = exported
                mountpoint = fields[1].replace("\\040", " ")
                local = Path(mountpoint) / os.path.relpath(rest, exported)
        if local is None:
            raise InvalidInputError(f"NAS share {server}:{share_path} is not mounted on this"
                                    " node; mount it first (cachemesh reads mounted shares)")
    if not local.is_dir():
        raise InvalidInputError(f"NAS path {server}:{share_path} ({local}) is not a directory")
    return local


def eci_to_spec_fields(body: EciCreateDataCache) -> dict[str, Any]:
    """The fields of a :class:`~cachemesh.caches.CacheSpec` for an ECI request."""
    source_type, opts = body.DataSource.Type, dict(body.DataSource.Options)
    _refuse_secrets(opts)
    options: dict[str, Any] = {}
    if source_type == "URL":
        url = _option(opts, "url", required=False)
        repo_source = _option(opts, "repoSource", required=url is None)
        if url is not None and repo_source is None:
            source = url
        else:
            repo_id = _option(opts, "repoId")
            revision = _option(opts, "revision", required=False)
            kinds = {"huggingface/model": "hf://", "huggingface/dataset": "hf://datasets/",
                     "modelscope/model": "ms://"}
            prefix = kinds.get(str(repo_source).lower())
            if prefix is None:
                raise InvalidInputError(
                    f"DataSource.Options.repoSource {repo_source!r} is not one of"
                    " HuggingFace/Model, HuggingFace/Dataset, ModelScope/Model")
            source = f"{prefix}{repo_id}" + (f"@{revision}" if revision else "")
    elif source_type == "NAS":
        source = str(nas_path(str(_option(opts, "server")), str(_option(opts, "path"))))
    else:  # OSS
        bucket = _option(opts, "bucket")
        prefix_path = (_option(opts, "path", required=False) or "").strip("/")
        if any(part in (".", "..") for part in prefix_path.split("/")):
            raise InvalidInputError(f"DataSource.Options.path {prefix_path!r}: an OSS prefix"
                                    " has no '.' or '..' segments")
        endpoint = _option(opts, "url", required=False) or _option(opts, "endpoint", required=False)
        source = f"s3://{bucket}/{prefix_path}".rstrip("/")
        if endpoint:
            if "://" not in endpoint:
                endpoint = f"https://{endpoint}"
            options["endpoint_url"] = endpoint
    return {
        "name": body.Name, "source": source, "bucket": body.Bucket,
        "path": body.Path.strip("/") if body.Path else None,
        "size_limit_gib": body.Size, "retention_days": body.RetentionDays, "options": options,
    }


def iso(ts: float | None) -> str | None:
    """A unix time as ECI writes times (UTC, to the second); None for none."""
    if not ts:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # a date no calendar holds: none
        return None


def percent(info: CacheInfo) -> int:
    if info.status == AVAILABLE:
        return 100
    p = info.progress
    return int(100 * p.bytes_done / p.bytes_total) if p.bytes_total else 0


def eci_fields(info: CacheInfo, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The description of a cache in ECI's names (``events``: as the API lists them)."""
    out: dict[str, Any] = {
        "DataCacheId": f"edc-{info.name}",
        "Name": info.name,
        "Bucket": info.bucket,
        "Path": "/" + info.path.strip("/"),
        "Status": info.status,
        "Progress": f"{percent(info)}%",
        "Size": info.size_limit_gib,
        "RetentionDays": info.retention_days,
        "CreationTime": iso(info.created_at),
        "LastMatchedTime": iso(info.last_access),
        "ExpireDateTime": iso(info.last_access + info.retention_days * 86400)
        if info.retention_days else None,
    }
    if events is not None:
        out["Events"] = [{"Type": "Warning" if e["level"] in ("warning", "error") else "Normal",
                          "Reason": e["kind"], "Message": e["message"],
                          "FirstTimestamp": iso(e["ts"]), "LastTimestamp": iso(e["ts"]),
                          "Count": 1} for e in events]
    return out
