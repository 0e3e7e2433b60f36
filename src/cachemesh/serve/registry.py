"""What models the server serves: their specs, and where they are kept.

A :class:`ModelSpec` is the simple form a user declares (``--model``,
``POST /api/v1/models``, the V2 repository extension): one source, one
version. A :class:`~.documents.ModelDoc` is the full form (versions, traffic,
routes; ``PUT /api/v1/models/{name}``); a spec is a document with one version.

A :class:`ModelRegistry` keeps the documents deployed at run time, so they
survive a restart; the single-node default keeps them in the store's
``meta.db`` (table ``models``, see ``store/db.py``: its ``spec`` column holds
the document as JSON; rows written before documents existed hold a spec, read
as its one-version document), and cluster mode can put another registry behind
the same three methods. Models given on the command line are not written
there: the command declares them each time; a document deployed at run time
under the same name takes their place.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidInputError
from .documents import (
    DEFAULT_BUCKET,
    BucketName,
    ModelDoc,
    ModelName,
    Parameters,
    Scaling,
    SourceText,
    doc_from_spec,
    make_document,
)

__all__ = ["DEFAULT_BUCKET", "ModelRegistry", "ModelSpec", "make_model_spec", "read_config"]


class ModelSpec(BaseModel):
    """A model to serve: where its files come from and how to run them."""

    model_config = ConfigDict(extra="forbid")

    name: ModelName
    source: SourceText = Field(
        description="anything `cachemesh pull` takes: a path, file://, s3://, hf://")
    runtime: str | None = Field(default=None, description="sklearn, custom, ...; detected if absent")
    version: str | None = None
    parameters: Parameters = Field(default_factory=dict,
                                   description="runtime options, e.g. class, trusted")
    eager: bool = Field(default=False, description="load at start instead of on the first request")
    scaling: Scaling = Field(default_factory=Scaling,
                             description="extra copies: copy_rate, max_copies, cooldown_s")
    bucket: BucketName = Field(default=DEFAULT_BUCKET,
                        description="bucket of the model's cache; when it is protected, the model"
                        " is seen and called only with the bucket's token")



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
    """``NAME=SOURCE[,runtime=R][,version=V][,bucket=B][,eager=true][,copy_rate=N]
    [,max_copies=N][,cooldown_s=S][,KEY=VALUE...]``.

    Other keys are runtime parameters. A source containing ',' or '=' is given
    through ``--config`` instead.
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
        elif key in Scaling.model_fields:
            data.setdefault("scaling", {})[key] = value
        else:
            data["parameters"][key] = value
    return make_model_spec(data)


def read_config(path: Path) -> list[ModelSpec | ModelDoc]:
    """A YAML (or JSON) file: a list of models, or ``{"models": [...]}``; each is a
    spec (``name``, ``source``, ...) or a document (``name``, ``versions``, ...)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"cannot read model config {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("models")
    if not isinstance(data, list):
        raise InvalidInputError(f"{path}: expected a list of models, or a mapping with 'models:'")
    models: list[ModelSpec | ModelDoc] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidInputError(f"{path}: model #{i + 1} is not a mapping")
        models.append(make_document(item) if "versions" in item else make_model_spec(item))
    return models


class ModelRegistry(ABC):
    """Where run-time deployments are kept."""

    @abstractmethod
    def list(self) -> list[ModelDoc]: ...

    @abstractmethod
    def put(self, doc: ModelDoc) -> None: ...

    @abstractmethod
    def remove(self, name: str) -> None: ...


class MemoryModelRegistry(ModelRegistry):
    """Forgets everything at exit: for tests and for servers that want no state."""

    def __init__(self) -> None:
        self._docs: dict[str, ModelDoc] = {}

    def list(self) -> list[ModelDoc]:
        return [self._docs[k] for k in sorted(self._docs)]

    def put(self, doc: ModelDoc) -> None:
        self._docs[doc.name] = doc

    def remove(self, name: str) -> None:
        self._docs.pop(name, None)


class SqliteModelRegistry(ModelRegistry):
    """The ``models`` table of the store's meta.db."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def list(self) -> list[ModelDoc]:
        rows = self.db.query("SELECT spec FROM models ORDER BY name")
        out = []
        for r in rows:
            data = json.loads(r["spec"])
            out.append(ModelDoc.model_validate(data) if "versions" in data
                       else doc_from_spec(ModelSpec.model_validate(data)))
        return out

    def put(self, doc: ModelDoc) -> None:
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO models (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET spec = excluded.spec,"
                " updated_at = excluded.updated_at",
                (doc.name, doc.model_dump_json(), now, now),
            )

    def remove(self, name: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM models WHERE name = ?", (name,))
