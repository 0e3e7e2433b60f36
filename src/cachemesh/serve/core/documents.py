"""The model document: what a model name points to, and how traffic reaches it.

``PUT /api/v1/models/{name}`` takes one, ``GET`` returns it (with status added),
the registry keeps it across restarts, and ``--config`` may list them::

    {
      "name": "digits",                                  # from the path when absent
      "versions": {                                      # label -> where its files are
        "v1": {"source": "s3://models/digits/1", "runtime": "sklearn"},
        "v2": {"source": "s3://models/digits/2", "parameters": {"trusted": "true"}}
      },
      "traffic": {"v1": 90, "v2": 10},                   # percentages, summing to 100
      "routes": [                                        # first match wins, before traffic
        {"header": "x-model-version", "value": "v2", "version": "v2"},
        {"header": "x-user", "pattern": "beta-.*", "version": "v2"},
        {"parameter": "variant", "value": "b", "version": "canary"}
      ],
      "aliases": {"canary": "v2", "stable": "v1"},       # more names for versions
      "eager": false,                                    # load at start, not on first use
      "bucket": "models",                                # of every version's cache
      "scaling": {"copy_rate": 50, "max_copies": 3, "min_copies": 1, "cooldown_s": 60}
    }

A route matches a request header (names are case-insensitive) or a key of the
V2 request's ``parameters``, with exactly one of ``value`` (equal), ``prefix``
or ``pattern`` (a regular expression that must match the whole value). A route
or a path (``/v2/models/{m}/versions/{v}``) may name a version or an alias.
``traffic`` may be left out when there is one version. ``scaling`` overrides
the server's ``CACHEMESH_SERVE_COPY_*`` settings for this model. When ``bucket``
is protected (``cachemesh bucket protect``), the model is listed, changed and
called only by requests that carry that bucket's token; it does not change
over a model's life (remove and deploy again to move it).

The simple forms (``--model NAME=SOURCE,version=V``, ``POST /api/v1/models``,
the V2 repository extension) are a document with one version, labelled by
their ``version`` or else ``default``, taking all the traffic.

Versions are immutable: a label keeps its source, runtime and parameters for
as long as it is in the document; publish a change under a new label.

GET shows sources (and a ``base`` parameter) with their query values hidden
(``sources/redact.py``: a presigned URL's signature). A PUT that sends such a
shown source back for a version the model has means that version's real one.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from ...errors import InvalidInputError
from ...sources.redact import redact_source
from ...store.names import check_name
from .jsonshape import check_json

DEFAULT_VERSION = "default"
# The bucket a model's caches go to unless its document names another.
DEFAULT_BUCKET = "models"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)

# What GET adds to a document; PUT drops it, so that GET | edit | PUT works.
STATUS_FIELDS = frozenset({
    "state", "reason", "origin", "worker", "workers", "size_bytes", "predicted_bytes",
    "inflight", "loads", "evictions", "last_used", "view", "version", "source", "runtime",
    "parameters", "status", "rollout", "copies", "revision"})


def check_label(value: str, what: str = "version") -> str:
    if not isinstance(value, str) or not _LABEL.match(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-',"
                         " starting with a letter or digit")
    return value


def _source_text(v: str) -> str:
    if not v or not v.strip():
        raise ValueError("a source is required")
    return v.strip()


#: A source as a model's spec or document carries it: required, surrounding blanks dropped.
SourceText = Annotated[str, AfterValidator(_source_text)]
#: A model's name and its bucket, as every spec and document checks them.
ModelName = Annotated[str, AfterValidator(lambda v: check_name(v, "model name"))]
BucketName = Annotated[str, AfterValidator(lambda v: check_name(v, "bucket"))]
#: Runtime options: JSON values within the request limits.
Parameters = Annotated[dict[str, Any], AfterValidator(lambda v: check_json(v, "parameters"))]


class VersionSpec(BaseModel):
    """One version: where its files come from and how to run them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: SourceText = Field(description="anything `cachemesh pull` takes")
    runtime: str | None = Field(default=None, description="sklearn, custom, ...; detected if absent")
    parameters: Parameters = Field(default_factory=dict, description="runtime options")


Scalar = str | int | float | bool


class RouteRule(BaseModel):
    """Send requests with a header or parameter of some value to a version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    header: str | None = Field(default=None, description="an HTTP header name")
    parameter: str | None = Field(default=None, description="a key of the V2 request's parameters")
    value: Scalar | None = Field(default=None, description="equal to this")
    prefix: str | None = Field(default=None, description="starting with this")
    pattern: str | None = Field(default=None, description="a regular expression, whole value")
    version: str = Field(description="a version label or alias")

    @model_validator(mode="after")
    def _one_of_each(self) -> RouteRule:
        if (self.header is None) == (self.parameter is None):
            raise ValueError("a route needs exactly one of 'header' or 'parameter'")
        if self.header is not None and not _HEADER.match(self.header):
            raise ValueError(f"{self.header!r} is not a header name")
        if sum(x is not None for x in (self.value, self.prefix, self.pattern)) != 1:
            raise ValueError("a route needs exactly one of 'value', 'prefix' or 'pattern'")
        if self.header is not None and self.value is not None and not isinstance(self.value, str):
            raise ValueError("a header route's value is a string")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r}: {exc}") from None
        return self

    def describe(self) -> str:
        what = f"header {self.header}" if self.header else f"parameter {self.parameter}"
        if self.value is not None:
            test = f"={self.value}"
        elif self.prefix is not None:
            test = f" starts with {self.prefix!r}"
        else:
            test = f" matches {self.pattern!r}"
        return f"{what}{test}"


class Scaling(BaseModel):
    """Per-model overrides of the server's copy settings (None: the server's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    copy_rate: float | None = Field(default=None, ge=0, description=(
        "requests per second per copy above which the model gets another copy; 0: one copy"))
    max_copies: int | None = Field(default=None, ge=1, description="at most this many copies")
    cooldown_s: float | None = Field(default=None, ge=0, description=(
        "seconds the rate must stay low before an extra copy goes"))
    min_copies: int | None = Field(default=None, ge=0, le=1000, description=(
        "in a cluster: copies kept loaded across the nodes, one per node, whatever the"
        " rate (the leader places them); not above max_copies"))

    @model_validator(mode="after")
    def _bounds(self) -> Scaling:
        if (self.min_copies is not None and self.max_copies is not None
                and self.min_copies > self.max_copies):
            raise ValueError(f"scaling: min_copies ({self.min_copies}) is above max_copies"
                             f" ({self.max_copies})")
        return self


Percent = Annotated[int, Field(ge=0, le=100, strict=True)]


class ModelDoc(BaseModel):
    """A model name, its versions, and how requests choose among them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ModelName
    versions: dict[str, VersionSpec]
    traffic: dict[str, Percent] = Field(default_factory=dict)
    routes: list[RouteRule] = Field(default_factory=list)
    aliases: dict[str, str] = Field(default_factory=dict)
    eager: bool = False
    scaling: Scaling = Field(default_factory=Scaling)
    bucket: BucketName = DEFAULT_BUCKET

    @model_validator(mode="before")
    @classmethod
    def _default_traffic(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("traffic"):
            versions = data.get("versions")
            if isinstance(versions, dict) and len(versions) == 1:
                data = {**data, "traffic": {next(iter(versions)): 100}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelDoc:
        problems = []
        if not self.versions:
            problems.append("versions: at least one is required")
        for label in self.versions:
            try:
                check_label(label)
                # The version's cache is named after it (see cache_name).
                check_name(cache_name(self.name, label), "cache name")
            except (ValueError, InvalidInputError) as exc:
                problems.append(f"versions: {exc}")
        if not self.traffic and len(self.versions) > 1:
            problems.append("traffic: required when there are several versions"
                            ' (for example {"v1": 90, "v2": 10})')
        unknown = sorted(set(self.traffic) - set(self.versions))
        if unknown:
            problems.append(f"traffic: unknown version(s) {', '.join(unknown)}"
                            f" (versions: {', '.join(sorted(self.versions))})")
        if self.traffic and sum(self.traffic.values()) != 100:
            problems.append(f"traffic: the shares sum to {sum(self.traffic.values())}, not 100")
        for alias, target in self.aliases.items():
            try:
                check_label(alias, "alias")
            except ValueError as exc:
                problems.append(f"aliases: {exc}")
            if alias in self.versions:
                problems.append(f"aliases: {alias!r} is a version label already")
            if target not in self.versions:
                problems.append(f"aliases: {alias!r} points to unknown version {target!r}")
        for i, route in enumerate(self.routes):
            if route.version not in self.versions and route.version not in self.aliases:
                problems.append(f"routes.{i}: unknown version {route.version!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def target(self, label_or_alias: str) -> str | None:
        """The version a label or alias names, or None."""
        if label_or_alias in self.versions:
            return label_or_alias
        return self.aliases.get(label_or_alias)

    def serving(self) -> list[str]:
        """Versions that take traffic or that a route sends requests to: these
        are loaded before a document takes effect."""
        wanted = {v for v, share in self.traffic.items() if share > 0}
        wanted |= {self.target(r.version) for r in self.routes}  # type: ignore[misc]
        return [v for v in self.versions if v in wanted]

    def primary(self) -> str:
        """The version with the largest share of traffic (the first on a tie)."""
        return max(self.versions, key=lambda v: self.traffic.get(v, 0))

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


def shown_version(entry: dict[str, Any]) -> dict[str, Any]:
    """A version as JSON, for a response: its source and base source redacted."""
    out = {**entry, "source": redact_source(entry["source"])}
    params = entry.get("parameters") or {}
    if isinstance(params.get("base"), str):
        out["parameters"] = {**params, "base": redact_source(params["base"])}
    return out


def unredact(doc: ModelDoc, old: ModelDoc) -> ModelDoc:
    """``doc`` with each source that is the shown (redacted) form of the same version's
    source in ``old`` replaced by that source: GET | edit | PUT changes nothing it
    did not mean to."""
    versions = {}
    for label, spec in doc.versions.items():
        before = old.versions.get(label)
        if before is not None:
            if spec.source != before.source and spec.source == redact_source(before.source):
                spec = spec.model_copy(update={"source": before.source})
            base, was = spec.parameters.get("base"), before.parameters.get("base")
            if isinstance(base, str) and isinstance(was, str) and base != was \
                    and base == redact_source(was):
                spec = spec.model_copy(update={"parameters": {**spec.parameters, "base": was}})
        versions[label] = spec
    return doc.model_copy(update={"versions": versions})


def cache_name(model: str, label: str) -> str:
    """The cache that holds a version's files: ``NAME`` for the default version
    (what a model deployed without versions always used), else ``NAME.LABEL``."""
    return model if label == DEFAULT_VERSION else f"{model}.{label}"


def _problems(exc: ValidationError) -> str:
    out = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"])
        message = str(err.get("ctx", {}).get("error") or err["msg"])
        message = message.removeprefix("Value error, ")
        out.append(f"{where}: {message}" if where else message)
    return "; ".join(out)


def make_document(data: Any, name: str | None = None) -> ModelDoc:
    """Validate a document (or a simple spec: ``source``, ``runtime``, ``version``,
    ``parameters``, ``eager``). ``name`` comes from the URL and must agree with the body."""
    from .registry import ModelSpec, make_model_spec

    if not isinstance(data, dict):
        raise InvalidInputError("a model document is a JSON object")
    if name is not None:
        if data.get("name", name) != name:
            raise InvalidInputError(
                f"the document names model {data['name']!r} but the URL names {name!r}")
        data = {**data, "name": name}
    if "versions" not in data:
        fields = set(ModelSpec.model_fields)
        simple = {k: v for k, v in data.items() if k in fields or k not in STATUS_FIELDS}
        return doc_from_spec(make_model_spec(simple))
    doc = {k: v for k, v in data.items() if k not in STATUS_FIELDS}
    if isinstance(doc.get("versions"), dict):
        doc["versions"] = {label: ({k: v for k, v in entry.items() if k != "status"}
                                   if isinstance(entry, dict) else entry)
                           for label, entry in doc["versions"].items()}
    try:
        return ModelDoc.model_validate(doc)
    except ValidationError as exc:
        raise InvalidInputError("invalid model document: " + _problems(exc)) from None


def doc_from_spec(spec: Any) -> ModelDoc:
    """The one-version document of a simple spec (:class:`~.registry.ModelSpec`)."""
    label = spec.version or DEFAULT_VERSION
    try:
        return ModelDoc(name=spec.name, eager=spec.eager, traffic={label: 100},
                        scaling=spec.scaling, bucket=spec.bucket, versions={
            label: VersionSpec(source=spec.source, runtime=spec.runtime,
                               parameters=dict(spec.parameters))})
    except ValidationError as exc:
        raise InvalidInputError("invalid model spec: " + _problems(exc)) from None
