"""What a cache is: the spec a user declares, its statuses, and what reading it returns.

A cache's status goes::

    Pending --pull--> Loading --+--> Available
                                +--> Failed  (the error says why; pull again to retry)

and ``Deleting`` while it is removed (a crash there leaves a row that gc finishes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import InvalidInputError
from ..sources.redact import redact_source
from ..store.names import check_name, check_relpath

PENDING, LOADING, AVAILABLE, FAILED, DELETING = (
    "Pending", "Loading", "Available", "Failed", "Deleting",
)
GIB = 1024**3
# The error of a Loading cache whose puller died (its lock is free).
INTERRUPTED = "the pull was interrupted; pull again to resume it"

# Bounds of a spec's numbers: past them a date or a byte count stops being a number
# (an expiry date past year 9999, a quota past any disk).
MAX_RETENTION_DAYS = 36_500.0
MAX_SIZE_LIMIT_GIB = float(1024**3)  # 1 EiB


class CacheSpec(BaseModel):
    """What a user declares. Validated before anything touches the disk."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    bucket: str = "default"
    path: str | None = None  # defaults to the name
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    size_limit_gib: float | None = Field(default=None, gt=0, le=MAX_SIZE_LIMIT_GIB)
    retention_days: float | None = Field(default=None, gt=0, le=MAX_RETENTION_DAYS)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "cache name")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return check_name(v, "bucket")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else check_relpath(v, "cache path", absolute_ok=True)

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not pattern or "\x00" in pattern:
                raise ValueError(f"invalid glob {pattern!r}")
        return v

    @model_validator(mode="after")
    def _default_path(self) -> CacheSpec:
        if self.path is None:
            self.path = self.name
        return self


def make_spec(**fields: Any) -> CacheSpec:
    """Build a :class:`CacheSpec`, turning validation errors into one clear message."""
    from pydantic import ValidationError

    try:
        return CacheSpec(**fields)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "spec"
            msg = str(err.get("ctx", {}).get("error") or err["msg"])
            problems.append(f"{where}: {msg}")
        raise InvalidInputError("invalid cache spec: " + "; ".join(problems)) from None


@dataclass
class Progress:
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    rate: float = 0.0  # bytes per second over the pull so far


@dataclass
class Event:
    id: int
    ts: float
    level: str
    kind: str
    message: str


@dataclass
class CacheInfo:
    name: str
    bucket: str
    path: str
    source: str
    status: str
    view: str
    pinned: bool
    in_use: bool
    error: str | None
    revision: str | None
    progress: Progress
    size_limit_gib: float | None
    retention_days: float | None
    created_at: float
    updated_at: float
    last_access: float
    spec: dict[str, Any] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """For people and the API: the spec's source redacted (the row's already is)."""
        out = asdict(self)
        if isinstance(out["spec"].get("source"), str):
            out["spec"]["source"] = redact_source(out["spec"]["source"])
        return out


@dataclass
class PullResult:
    view: Path
    files_fetched: int = 0
    files_reused: int = 0  # already present: same blob or same origin version
    bytes_fetched: int = 0
    evicted: list[str] = field(default_factory=list)
    verification: str = ""  # what the bytes were checked against, for the events


@dataclass
class GcReport:
    removed_caches: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    bytes_freed: int = 0
    tmp_bytes_freed: int = 0
