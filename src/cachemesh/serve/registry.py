"""What models the server serves: their specs, and where specs are kept.

A :class:`ModelSpec` is what a user declares (``--model``, ``--config``,
``POST /api/v1/models``). A :class:`ModelRegistry` keeps the specs deployed
at run time, so they survive a restart; the single-node default keeps them in
the store's ``meta.db`` (table ``models``, see ``store/db.py``), and cluster
mode can put another registry behind the same four methods. Models given on
the command line are not written there: the command declares them each time.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InvalidInputError
from ..store.names import check_name
from .limits import check_json

# The bucket a model's cache goes to unless its spec names another.
DEFAULT_BUCKET = "models"


class ModelSpec(BaseModel):
    """A model to serve: where its files come from and how to run them."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str = Field(description="anything `cachemesh pull` takes: a path, file://, s3://, hf://")
    runtime: str | None = Field(default=None, description="sklearn, custom, ...; detected if absent")
    version: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="runtime options, e.g. class, trusted")
    eager: bool = Field(default=False, description="load at start instead of on the first request")
    bucket: str = Field(default=DEFAULT_BUCKET,
                        description="bucket of the model's cache; when it is protected, the model"
                        " is seen and called only with the bucket's token")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "model name")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return check_name(v, "bucket")

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_json(v, "parameters")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("a source is required")
        return v.strip()


def make_model_spec(data: dict[str, Any]) -> ModelSpec:
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "model"
            problems.append(f"{where}: {err.get('ctx', {}).get('error') or err['msg']}")
        raise InvalidInputError("invalid model spec: " + "; ".join(problems)) from None


_TRUE = {"1", "true", "yes", "on"}


def parse_model_option(text: str) -> ModelSpec:
    """``NAME=SOURCE[,runtime=R][,version=V][,bucket=B][,eager=true][,KEY=VALUE...]``.

    Keys other than runtime, version, bucket and eager are runtime parameters. A
    source containing ',' or '=' is given through ``--config`` instead.
    """
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise InvalidInputError(f"--model expects NAME=SOURCE[,runtime=R][,version=V], got {text!r}")
    source, *options = rest.split(",")
    data: dict[str, Any] = {"name": name.strip(), "source": source, "parameters": {}}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInputError(
                f"--model {name}: option {option!r} is not KEY=VALUE (a source with ',' or '='"
                " goes in --config)")
        if key in ("runtime", "version", "bucket"):
            data[key] = value
        elif key == "eager":
            data["eager"] = value.strip().lower() in _TRUE
        else:
            data["parameters"][key] = value
    return make_model_spec(data)


def read_config(path: Path) -> list[ModelSpec]:
    """A YAML (or JSON) file: a list of model specs, or ``{"models": [...]}``."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"cannot read model config {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("models")
    if not isinstance(data, list):
        raise InvalidInputError(f"{path}: expected a list of models, or a mapping with 'models:'")
    specs = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidInputError(f"{path}: model #{i + 1} is not a mapping")
        specs.append(make_model_spec(item))
    return specs


class ModelRegistry(ABC):
    """Where run-time deployments are kept."""

    @abstractmethod
    def list(self) -> list[ModelSpec]: ...

    @abstractmethod
    def put(self, spec: ModelSpec) -> None: ...

    @abstractmethod
    def remove(self, name: str) -> None: ...


class MemoryModelRegistry(ModelRegistry):
    """Forgets everything at exit: for tests and for servers that want no state."""

    def __init__(self) -> None:
        self._specs: dict[str, ModelSpec] = {}

    def list(self) -> list[ModelSpec]:
        return [self._specs[k] for k in sorted(self._specs)]

    def put(self, spec: ModelSpec) -> None:
        self._specs[spec.name] = spec

    def remove(self, name: str) -> None:
        self._specs.pop(name, None)


class SqliteModelRegistry(ModelRegistry):
    """The ``models`` table of the store's meta.db."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def list(self) -> list[ModelSpec]:
        rows = self.db.query("SELECT spec FROM models ORDER BY name")
        return [ModelSpec.model_validate(json.loads(r["spec"])) for r in rows]

    def put(self, spec: ModelSpec) -> None:
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO models (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET spec = excluded.spec,"
                " updated_at = excluded.updated_at",
                (spec.name, spec.model_dump_json(), now, now),
            )

    def remove(self, name: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM models WHERE name = ?", (name,))
