"""The operator's reconcilers: plain async functions over the object Kubernetes sends.

Each takes the object as a dict (what the API server sends, and what kopf hands a
handler as ``body``), an :class:`~cachemesh.client.AsyncControlClient` of any node, and
a :class:`~.kube.Kube` for what it does to Kubernetes. kopf's decorators (main.py)
only call them, so every line here runs in tests without an API server.

DataCache::

    create / update / resume ──▶ reconcile_datacache(declare=True)   POST (same declaration: 2xx)
    every RESYNC_S (main.py) ──▶ reconcile_datacache(declare=False)  GET (gone: declare again)
                                  status ◀─ description; nodes Available ─▶ label
                                  cachemesh.io/cache.<name>="true" (removed when it is not)
    delete (finalizer)        ──▶ delete_datacache                     DELETE, unlabel

In cluster mode (``GET /api/v1/nodes`` says so) a DataCache is a cluster-wide
declaration (``Nodes: all`` unless the spec names nodes); its status is summed over the
nodes' pulls, each node labelled as its own copy becomes Available; deleting it removes
the declaration, then each node's copy (through the node's advertise address).

Model::

    create / update / resume ──▶ reconcile_model(declare=True)        PUT the document
    every RESYNC_S (main.py) ──▶ reconcile_model(declare=False)       GET (gone: PUT again)
    delete (finalizer)        ──▶ delete_model                         DELETE

What a handler raises decides what kopf does (main.py): an
:class:`~cachemesh.errors.InvalidInputError` is permanent (the status says Failed and
why, and nothing is retried until the object changes); any other error is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..client import AsyncControlClient
from ..errors import CachemeshError, ConflictError, InvalidInputError, NotFoundError
from . import mapping as m
from .kube import Kube, replacing

log = logging.getLogger(__name__)


def _previous(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, Mapping) else {}


def _generation(obj: Mapping[str, Any]) -> int | None:
    value = (obj.get("metadata") or {}).get("generation")
    return value if isinstance(value, int) else None


async def _fail(obj: Mapping[str, Any], kube: Kube, exc: CachemeshError) -> None:
    """Write Failed and why, and say it in an event (once per message)."""
    message = str(exc)
    if _previous(obj).get("message") != message or _previous(obj).get("phase") != m.FAILED:
        await kube.event(obj, "Warning", "Invalid" if isinstance(exc, InvalidInputError)
                         else "Failed", message)
    await kube.patch_status(obj, {"phase": m.FAILED, "message": message,
                                  "observedGeneration": _generation(obj)})


# -- DataCache ----------------------------------------------------------------------------------


async def cluster_members(api: AsyncControlClient) -> list[dict[str, Any]] | None:
    """The nodes of the cluster the API belongs to (``GET /api/v1/nodes``); None when the
    API is a lone node's."""
    answer = await api.get_nodes()
    if answer.get("cluster") is None:
        return None
    return [n for n in answer.get("nodes") or [] if isinstance(n, Mapping)]


def _expected(description: Mapping[str, Any], members: list[dict[str, Any]] | None
              ) -> list[str]:
    """The nodes a cluster-wide cache selects: its names, the N picked, or every live
    node that is not draining (``all``)."""
    decl = description.get("cluster")
    if not isinstance(decl, Mapping):
        return []
    if isinstance(decl.get("nodes"), list):
        return [str(n) for n in decl["nodes"]]
    if decl.get("assigned"):
        return [str(n) for n in decl["assigned"]]
    if decl.get("nodes") == "all" and members:
        return [str(n["name"]) for n in members if n.get("name") and not n.get("draining")]
    return []


async def reconcile_datacache(obj: Mapping[str, Any], api: AsyncControlClient, kube: Kube, *,
                              declare: bool = True, lone_node: str | None = None
                              ) -> dict[str, Any]:
    """Declare the object's cache (or look at it), write its status, label its nodes.

    In cluster mode a spec without ``nodes`` is declared for every node (``Nodes: all``):
    a cache on whichever node the Service picked would be found on no other. ``lone_node``:
    the Kubernetes node of the one cachemesh node the API reaches, for a server that does
    not say which node answered. Returns the status written.
    """
    name = m.name_of(obj)
    try:
        label = m.node_label(name)
        body = m.datacache_request(obj)
        members = await cluster_members(api)
        if members is not None:
            body.setdefault("Nodes", "all")
        description = None
        if not declare:
            try:
                description = await api.get_datacache(name)
            except NotFoundError:
                log.info("%s: its cache is gone from the node; declaring it again",
                         m.kind_name(obj))
        # Declaring is idempotent, and queues the pull again of a Pending cache whose
        # pull the node lost (a restart, or a pull submitted as the last one ended). A
        # cluster-wide cache's nodes follow its declaration themselves (serve/datacache/preheat.py).
        if description is None or (description.get("status") == "Pending"
                                   and "cluster" not in description):
            description = await _declare_cache(obj, api, kube, body, members)
    except InvalidInputError as exc:
        await _fail(obj, kube, exc)
        raise
    answering = description.get("node") or lone_node
    status = m.datacache_status(description, answering, _generation(obj),
                                expected=_expected(description, members),
                                view=_previous(obj).get("view"))
    await _label_nodes(obj, kube, label, status["nodes"])
    before = _previous(obj).get("phase")
    if status["phase"] != before:
        if status["phase"] == m.AVAILABLE:
            where = ", ".join(n["name"] for n in status["nodes"] if n["phase"] == m.AVAILABLE)
            await kube.event(obj, "Normal", "Available",
                             f"view {status['view']}" + (f" on {where}" if where else ""))
        elif status["phase"] == m.FAILED:
            await kube.event(obj, "Warning", "Failed", status["message"] or "the pull failed")
        elif status["phase"] == m.PULLING:
            await kube.event(obj, "Normal", "Pulling", f"{status['progress']['percent']}%")
    await kube.patch_status(obj, replacing(obj.get("status"), status))
    return status


async def _declare_cache(obj: Mapping[str, Any], api: AsyncControlClient, kube: Kube,
                         body: dict[str, Any], members: list[dict[str, Any]] | None
                         ) -> dict[str, Any]:
    """POST the declaration; one that differs from the node's (the spec changed) replaces it."""
    try:
        description = await api.create_datacache_eci(body)
    except ConflictError:
        # Caches are immutable on a node: the old one goes first (refused while in use
        # or still pulling: retried), from every node in a cluster.
        await kube.event(obj, "Normal", "Replacing", "the spec changed: removing the"
                         " cache of the old spec, then pulling the new one")
        await _remove(api, body["Name"], members)
        description = await api.create_datacache_eci(body)
    if _previous(obj).get("observedGeneration") != _generation(obj):
        source = body["DataSource"]
        where = f" on {'every node' if body.get('Nodes') == 'all' else body['Nodes']}" \
            if "Nodes" in body else ""
        await kube.event(obj, "Normal", "Declared",
                         f"{source['Type']} {_describe_options(source['Options'])} into"
                         f" {description.get('Bucket') or description.get('bucket')}"
                         f"{description.get('Path') or body.get('Path') or ''}{where}")
    return description


async def _remove(api: AsyncControlClient, name: str,
                  members: list[dict[str, Any]] | None) -> None:
    """Remove a cache: from the node (lone), or its declaration and then every node's
    copy (a cluster; DELETE ?cluster=true leaves the other nodes' copies). A node still
    pulling or using it answers 409: raised, so kopf retries."""
    if members is None:
        try:
            await api.delete_datacache(name)
        except NotFoundError:
            pass
        return
    try:
        await api.delete_datacache(name, cluster=True)  # no node pulls it any more
    except NotFoundError:
        pass
    for member in members:
        if not member.get("advertise"):
            continue
        node_api = api.at(str(member["advertise"]))
        try:
            await node_api.delete_datacache(name)
        except NotFoundError:
            pass
        finally:
            await node_api.aclose()


def _describe_options(options: Mapping[str, Any]) -> str:
    keys = ("repoSource", "repoId", "revision", "url", "server", "path", "bucket")
    return " ".join(f"{k}={options[k]}" for k in keys if k in options)


async def _label_nodes(obj: Mapping[str, Any], kube: Kube, label: str,
                       nodes: list[dict[str, Any]]) -> None:
    holding = {n["name"] for n in nodes if n["phase"] == m.AVAILABLE}
    labelled = {n.get("name") for n in _previous(obj).get("nodes") or []
                if isinstance(n, Mapping) and n.get("phase") == m.AVAILABLE}
    for node in sorted(holding - labelled):
        await kube.label_node(node, label, "true")
    # A node that lost its copy loses the label: a Pod asking for it must not land there.
    for node in sorted(n for n in labelled - holding if n):
        await kube.label_node(node, label, None)


async def delete_datacache(obj: Mapping[str, Any], api: AsyncControlClient, kube: Kube) -> None:
    """Remove the cache from the node and the label from every node that held it."""
    name = m.name_of(obj)
    try:
        await _remove(api, name, await cluster_members(api))
    except ConflictError as exc:
        await kube.event(obj, "Warning", "DeleteRefused", str(exc))
        raise
    try:
        label = m.node_label(name)
    except InvalidInputError:
        return  # never labelled
    for node in sorted({n.get("name") for n in _previous(obj).get("nodes") or []
                        if isinstance(n, Mapping) and n.get("name")}):
        await kube.label_node(node, label, None)
    await kube.event(obj, "Normal", "Deleted", f"cache {name} removed")


# -- Model --------------------------------------------------------------------------------------


async def reconcile_model(obj: Mapping[str, Any], api: AsyncControlClient, kube: Kube, *,
                          declare: bool = True) -> dict[str, Any]:
    """PUT the object's document (or look at the model), and write its status."""
    name = m.name_of(obj)
    try:
        doc = m.model_document(obj)
        current = None
        if not declare:
            try:
                current = await api.get_model(name)
            except NotFoundError:
                log.info("%s: the mesh lost the model; declaring it again", m.kind_name(obj))
        if current is None:
            changed = _previous(obj).get("observedGeneration") != _generation(obj)
            current = await api.apply_model(doc)
            if changed:
                versions = ", ".join(f"{v} {p}%" for v, p in current["traffic"].items())
                await kube.event(obj, "Normal", "Applied", f"serving {versions}")
    except InvalidInputError as exc:
        await _fail(obj, kube, exc)
        raise
    status = m.model_status(current, _generation(obj))
    before = _previous(obj).get("phase")
    if status["phase"] != before and status["phase"] in ("Ready", "Failed"):
        kind = "Normal" if status["phase"] == "Ready" else "Warning"
        await kube.event(obj, kind, status["phase"], status["message"] or
                         f"{name} answers at {status['inference']['v2']}")
    await kube.patch_status(obj, replacing(obj.get("status"), status))
    return status


async def delete_model(obj: Mapping[str, Any], api: AsyncControlClient, kube: Kube) -> None:
    """Unload the model everywhere and forget it."""
    name = m.name_of(obj)
    try:
        await api.delete_model(name)
    except NotFoundError:
        pass
    await kube.event(obj, "Normal", "Deleted", f"model {name} removed")
