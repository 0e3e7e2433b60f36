"""The one place where the Kubernetes objects' fields meet the control API's.

Custom resources (group ``cachemesh.io``, version ``v1alpha1``; their CRDs are in
deploy/helm/cachemesh/crds/) are camelCase; the control API takes ECI's PascalCase
for data caches and snake_case model documents. Nothing else in the operator
renames a field.

DataCache (``spec`` in ECI's names) -> ``POST /api/v1/datacaches`` in ECI's shape::

    spec.bucket                 Bucket            (default "default", as ECI)
    spec.path                   Path              the view: buckets/<bucket>/<path>
    spec.dataSource.type        DataSource.Type   URL | NAS | OSS
    spec.dataSource.options     DataSource.Options  (repoSource, repoId, revision, url;
                                                     NAS: server, path, vers, options;
                                                     OSS: bucket, path, url)
    spec.size                   Size              GiB, the cache's quota
    spec.retentionDays          RetentionDays
    spec.nodes                  Nodes             "all" | N | [node names]   only when set
    spec.minCopies              MinCopies         K                          only when set
    metadata.name               Name

The node, not the operator, turns a data source into a source URI (serve/adapters/eci.py):
a NAS share is looked up in the mounts of the node that pulls it.

The description the API answers -> ``status``::

    Status Pending|Loading|Available|Failed   phase Pending|Pulling|Available|Failed
    progress {percent, bytes_done, ...}        progress {percent, bytesDone, ...}
    view, error                                view, message
    nodes [{node, status, progress, view, error}]  nodes [{name, phase, percent, view, message}]

A cluster-wide cache (one declared with ``nodes``; in cluster mode the operator declares
``nodes: all`` when the spec says none) is described with ``nodes`` (each node's pull,
``{node: {state, progress, ...}}``) and ``cluster`` (the declaration): its phase and
progress are summed over the nodes it selects. A description without them is the
answering node's own cache, reported as one node (see :func:`per_node`).

Model (``spec``: the model document in camelCase) -> ``PUT /api/v1/models/{name}``::

    spec.versions.{label}.{source, runtime, parameters}     versions (as is)
    spec.traffic, spec.routes, spec.aliases, spec.eager, spec.bucket   (as is)
    spec.scaling.copyRate, maxCopies, cooldownSeconds       scaling.copy_rate, max_copies,
                                                            cooldown_s
    spec.scaling.minCopies                                  scaling.min_copies (only when set)
    spec.source, spec.runtime, spec.parameters, spec.version  the one-version short form
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidInputError

GROUP = "cachemesh.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: The label a Kubernetes node gets while it holds an Available copy of a cache.
LABEL_PREFIX = f"{GROUP}/cache."
PENDING, PULLING, AVAILABLE, FAILED = "Pending", "Pulling", "Available", "Failed"
_PHASES = {"Pending": PENDING, "Loading": PULLING, "Available": AVAILABLE, "Failed": FAILED}
# A Kubernetes node name (DNS subdomain), as the cluster's node records use them.
_NODE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

# Model document fields whose names differ from the CRD's, by the object they live in.
_SCALING = {"copyRate": "copy_rate", "maxCopies": "max_copies", "minCopies": "min_copies",
            "cooldownSeconds": "cooldown_s"}
_DOCUMENT = ("versions", "traffic", "routes", "aliases", "eager", "bucket")
_SHORT = ("source", "runtime", "parameters", "version")
# The document's own name for a version of the short form (documents.DEFAULT_VERSION).
DEFAULT_VERSION = "default"


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise InvalidInputError(f"{kind_name(obj)}: spec is missing")
    return spec


def kind_name(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` of an object, for messages."""
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', 'object')} {meta.get('namespace', '')}/{meta.get('name', '?')}"


def name_of(obj: Mapping[str, Any]) -> str:
    name = (obj.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError("the object has no metadata.name")
    return name


def check_nodes(value: Any) -> str | int | list[str]:
    """``nodes``: ``"all"``, a count of at least 1, or a list of node names."""
    if value == "all":
        return "all"
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1:
            return value
    elif isinstance(value, list) and value and all(
            isinstance(n, str) and _NODE.match(n) for n in value):
        if len(set(value)) == len(value):
            return list(value)
    raise InvalidInputError(f"nodes: expected \"all\", a count of at least 1, or a list of"
                            f" distinct node names, got {value!r}")


# -- DataCache ------------------------------------------------------------------------------


def datacache_request(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The ECI-shaped ``POST /api/v1/datacaches`` body of a DataCache object."""
    spec = _spec(obj)
    source = spec.get("dataSource")
    if not isinstance(source, Mapping) or "type" not in source:
        raise InvalidInputError(f"{kind_name(obj)}: spec.dataSource.type is required")
    body: dict[str, Any] = {
        "Name": name_of(obj),
        "Bucket": spec.get("bucket") or "default",
        "DataSource": {"Type": source["type"], "Options": dict(source.get("options") or {})},
    }
    for crd, api in (("path", "Path"), ("size", "Size"), ("retentionDays", "RetentionDays")):
        if spec.get(crd) is not None:
            body[api] = spec[crd]
    if spec.get("nodes") is not None:
        body["Nodes"] = check_nodes(spec["nodes"])
    if spec.get("minCopies") is not None:
        body["MinCopies"] = spec["minCopies"]
    return body


def _progress(progress: Mapping[str, Any] | None, status: str) -> dict[str, Any]:
    p = dict(progress or {})
    total, done = int(p.get("bytes_total") or 0), int(p.get("bytes_done") or 0)
    percent = p.get("percent")
    if percent is None:
        percent = 100 if status == "Available" else (100 * done // total if total else 0)
    return {"percent": int(percent), "bytesDone": done, "bytesTotal": total,
            "filesDone": int(p.get("files_done") or 0),
            "filesTotal": int(p.get("files_total") or 0)}


def phase_of(api_status: str | None) -> str:
    """The CR's phase for one of the API's statuses (ECI's: Loading is our Pulling)."""
    return _PHASES.get(api_status or "", PENDING)


def per_node(description: Mapping[str, Any], answering_node: str | None,
             expected: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Each node's state of a cache, sorted by node.

    A cluster-wide cache's description has ``nodes``, ``{node: {state, progress (0..1),
    bytes_done, bytes_total, error}}`` (each node's prewarm entry, serve/datacache/preheat.py; a
    list of ``{node, status, ...}`` is read too); a node in ``expected`` without an entry
    has not started: Pending. Otherwise the description is the answering node's own cache,
    reported as ``answering_node`` (unknown: no per-node state).
    """
    listed = description.get("nodes")
    if isinstance(listed, Mapping):
        entries = {str(k): v for k, v in listed.items() if isinstance(v, Mapping)}
    elif isinstance(listed, list):
        entries = {str(n.get("node") or n.get("name")): n for n in listed
                   if isinstance(n, Mapping)}
    elif answering_node:
        entries = {answering_node: description}
    else:
        entries = {}
    if expected and isinstance(listed, Mapping):
        # Only the nodes the declaration selects: a node's entry outlives a DELETE of its
        # copy (and a declaration that moved the cache elsewhere) until its lease goes.
        entries = {k: v for k, v in entries.items() if k in expected}
    for node in expected:
        entries.setdefault(node, {"state": PENDING})
    out = []
    for node, d in sorted(entries.items()):
        status = str(d.get("status") or d.get("Status") or d.get("state") or "")
        fraction = d.get("progress")
        if isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
            percent = 100 if status == AVAILABLE else min(100, int(fraction * 100))
        else:
            percent = _progress(fraction, status)["percent"]
        entry = {"name": node, "phase": phase_of(status), "percent": percent,
                 "view": d.get("view"), "message": d.get("error")}
        # A list is replaced whole by a merge patch: a null in it would stay a null.
        out.append({k: v for k, v in entry.items() if v is not None})
    return out


def _overall(nodes: Sequence[Mapping[str, Any]]) -> str:
    """A cluster-wide cache's phase: Available once every node holds it, Failed once
    none is still on its way and one failed, Pulling while any pulls or holds it."""
    phases = {n["phase"] for n in nodes}
    if not phases:
        return PENDING
    if phases == {AVAILABLE}:
        return AVAILABLE
    if FAILED in phases and not phases & {PENDING, PULLING}:
        return FAILED
    return PULLING if phases & {PULLING, AVAILABLE} else PENDING


def datacache_status(description: Mapping[str, Any], answering_node: str | None,
                     generation: int | None = None, *, expected: Sequence[str] = (),
                     view: str | None = None) -> dict[str, Any]:
    """The ``status`` of a DataCache from the API's description of its cache.

    A cluster-wide cache (``cluster`` in the description) is summed over its nodes
    (``expected``: the nodes it selects); ``view`` stands in for the view path when the
    answering node holds no copy (the path is the same on every node of the chart).
    """
    status = str(description.get("status") or description.get("Status") or "")
    nodes = per_node(description, answering_node, expected)
    out: dict[str, Any] = {
        "phase": phase_of(status),
        "message": description.get("error"),
        "progress": _progress(description.get("progress"), status),
        "view": description.get("view") or view,
        "bucket": description.get("bucket") or description.get("Bucket"),
        "path": description.get("Path"),
        "nodes": nodes,
        "availableNodes": sum(1 for n in nodes if n["phase"] == AVAILABLE),
    }
    if isinstance(description.get("cluster"), Mapping):
        out["phase"] = _overall(nodes)
        failed = [f"{n['name']}: {n['message']}" for n in nodes if n["phase"] == FAILED
                  and n.get("message")]
        out["message"] = "; ".join(failed) or None
        raw = description.get("nodes")
        entries = [v for v in raw.values() if isinstance(v, Mapping)] \
            if isinstance(raw, Mapping) else []
        out["progress"] = {
            "percent": sum(n["percent"] for n in nodes) // len(nodes) if nodes else 0,
            "bytesDone": sum(int(e.get("bytes_done") or 0) for e in entries),
            "bytesTotal": sum(int(e.get("bytes_total") or 0) for e in entries),
            "filesDone": 0, "filesTotal": 0}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def node_label(cache: str) -> str:
    """``cachemesh.io/cache.<name>``: a label key's name part is at most 63 characters."""
    name = f"cache.{cache}"
    if not _LABEL_NAME.match(name):
        raise InvalidInputError(f"DataCache {cache!r}: the node label {LABEL_PREFIX}{cache}"
                                " would be longer than 63 characters; use a shorter name")
    return LABEL_PREFIX + cache


# -- Model -----------------------------------------------------------------------------------


def model_document(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The model document (``PUT /api/v1/models/{name}``) of a Model object."""
    spec = _spec(obj)
    has_versions, has_source = spec.get("versions") is not None, spec.get("source") is not None
    if has_versions == has_source:
        raise InvalidInputError(f"{kind_name(obj)}: give either spec.versions or spec.source")
    doc: dict[str, Any] = {"name": name_of(obj)}
    for key in _DOCUMENT:
        if spec.get(key) is not None:
            doc[key] = spec[key]
    if has_source:
        label = spec.get("version") or DEFAULT_VERSION
        doc["versions"] = {label: {k: spec[k] for k in ("source", "runtime", "parameters")
                                   if spec.get(k) is not None}}
    scaling = spec.get("scaling")
    if scaling is not None:
        unknown = sorted(set(scaling) - set(_SCALING))
        if unknown:
            raise InvalidInputError(f"{kind_name(obj)}: spec.scaling has unknown field(s)"
                                    f" {', '.join(unknown)}")
        doc["scaling"] = {_SCALING[k]: v for k, v in scaling.items() if v is not None}
    return doc


_MODEL_PHASES = {"Pulling": "Pulling", "Loading": "Loading", "Ready": "Ready",
                 "Unloaded": "Standby", "Unloading": "Standby", "Failed": "Failed"}
# A copy's state in a node record (cluster/records.py CopyState).
_COPY_PHASES = {"loading": "Loading", "ready": "Ready", "draining": "Draining"}


def model_status(status: Mapping[str, Any], generation: int | None = None) -> dict[str, Any]:
    """The ``status`` of a Model from ``GET /api/v1/models/{name}``.

    Standby: declared and serving, loaded on its first request (a model that is not
    eager); Ready: a copy is loaded now (on the answering node). In cluster mode each
    version lists the nodes holding a copy, and ``copies`` counts them.
    """
    versions = {}
    for label, version in (status.get("versions") or {}).items():
        st = version.get("status") or {}
        # Cluster mode: the nodes holding a copy (copies/ in etcd), each counted once.
        held = sorted({str(n["node"]): n for n in st.get("nodes") or []
                       if isinstance(n, Mapping) and n.get("node")}.items())
        nodes = [{"name": node, "phase": _COPY_PHASES.get(n.get("state"), "Pending")}
                 for node, n in held]
        entry = {"phase": _MODEL_PHASES.get(st.get("state"), "Pending"),
                 "message": st.get("reason") if st.get("state") != "Ready" else None,
                 "copies": len(nodes) if nodes else len(st.get("copies") or []),
                 "traffic": (status.get("traffic") or {}).get(label, 0),
                 "nodes": nodes or None}
        versions[label] = {k: v for k, v in entry.items() if v is not None}
    name = status.get("name")
    out: dict[str, Any] = {
        "phase": _MODEL_PHASES.get(status.get("state"), "Pending"),
        "message": status.get("rollout") or status.get("reason"),
        "versions": versions,
        "inference": {"v2": f"/v2/models/{name}/infer", "openai": name},
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out
