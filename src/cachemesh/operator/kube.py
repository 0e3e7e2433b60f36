"""What the operator does to Kubernetes: the :class:`Kube` interface, and the Pod's client.

The handlers (handlers.py) change Kubernetes only through three calls, so that they
run in tests with no API server (a recording :class:`Kube`) and in a cluster with
:class:`InClusterKube`:

    patch_status(obj, status)        merge-patch the object's status subresource
                                     (``replacing`` makes the patch that replaces it whole)
    label_node(node, key, value)     set (value) or remove (None) one label of a node
    event(obj, type, reason, msg)    record an Event about the object (core/v1)

:class:`InClusterKube` speaks the Kubernetes REST API over httpx with the Pod's
service-account token and CA (what every Pod is given), rather than through kopf's
private client or the official client library: three requests need neither.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx

from ..config import OperatorSettings
from ..errors import CachemeshError, InvalidInputError, NotFoundError, UnavailableError

EventType = Literal["Normal", "Warning"]
COMPONENT = "cachemesh-operator"
MERGE_PATCH = "application/merge-patch+json"


class Kube(Protocol):
    """The Kubernetes side effects of the handlers."""

    async def patch_status(self, obj: Mapping[str, Any], status: Mapping[str, Any]) -> None: ...

    async def label_node(self, node: str, key: str, value: str | None) -> None: ...

    async def event(self, obj: Mapping[str, Any], type: EventType, reason: str,
                    message: str) -> None: ...


def _plural(obj: Mapping[str, Any]) -> str:
    return str(obj.get("kind", "")).lower() + "s"  # DataCache -> datacaches, Model -> models


def _path(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    if not group or not meta.get("name") or not meta.get("namespace"):
        raise InvalidInputError("a namespaced custom object needs apiVersion, namespace and name")
    return (f"/apis/{group}/{version}/namespaces/{quote(meta['namespace'], safe='')}/"
            f"{_plural(obj)}/{quote(meta['name'], safe='')}")


def replacing(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch (RFC 7386) that turns ``old`` into ``new``: a field ``new`` lacks is
    sent as null, which removes it, so a message or a node that no longer applies does not
    stay in the status forever. Nested objects are compared the same way; lists replace."""
    patch: dict[str, Any] = dict(new)
    for key, value in (old or {}).items():
        if key not in new:
            patch[key] = None
        elif isinstance(value, Mapping) and isinstance(new[key], Mapping):
            patch[key] = replacing(value, new[key])
    return patch


def event_body(obj: Mapping[str, Any], type: EventType, reason: str, message: str,
               now: dt.datetime | None = None) -> dict[str, Any]:
    """A core/v1 Event about ``obj``, as ``kubectl describe`` shows them."""
    meta = obj.get("metadata") or {}
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'object')}.",
                     "namespace": meta.get("namespace", "default")},
        "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                           "name": meta.get("name"), "namespace": meta.get("namespace"),
                           "uid": meta.get("uid")},
        "type": type, "reason": reason, "message": message[:1024],
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


class InClusterKube:
    """:class:`Kube` over the API server a Pod reaches (``settings.kube_url``)."""

    def __init__(self, settings: OperatorSettings, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 token: str | None = None) -> None:
        if settings.kube_url is None and transport is None:
            raise InvalidInputError("not in a Kubernetes Pod: KUBERNETES_SERVICE_HOST is unset")
        account = Path(settings.service_account)
        if token is None:
            token = (account / "token").read_text().strip()
        verify: Any = True
        if transport is None and (account / "ca.crt").is_file():
            verify = ssl.create_default_context(cafile=str(account / "ca.crt"))
        self._http = httpx.AsyncClient(base_url=settings.kube_url or "https://kubernetes",
                                       headers={"Authorization": f"Bearer {token}"},
                                       verify=verify, timeout=30, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, body: Any, content_type: str) -> None:
        try:
            r = await self._http.request(method, path, json=body,
                                         headers={"Content-Type": content_type})
        except httpx.HTTPError as exc:
            raise UnavailableError(f"the Kubernetes API cannot be reached:"
                                   f" {type(exc).__name__}") from exc
        if r.status_code == 404:
            raise NotFoundError(f"{method} {path}: not found")
        if r.status_code >= 400:
            try:
                message = r.json().get("message") or r.text
            except ValueError:
                message = r.text
            cls = UnavailableError if r.status_code in (429, 500, 503, 504) else CachemeshError
            raise cls(f"{method} {path}: {message} (HTTP {r.status_code})")

    async def patch_status(self, obj: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        await self._send("PATCH", _path(obj) + "/status", {"status": dict(status)}, MERGE_PATCH)

    async def label_node(self, node: str, key: str, value: str | None) -> None:
        body = {"metadata": {"labels": {key: value}}}  # null removes it (RFC 7386)
        try:
            await self._send("PATCH", f"/api/v1/nodes/{quote(node, safe='')}", body,
                             MERGE_PATCH)
        except NotFoundError:
            if value is not None:
                raise  # a node that left has no label to remove

    async def event(self, obj: Mapping[str, Any], type: EventType, reason: str,
                    message: str) -> None:
        namespace = (obj.get("metadata") or {}).get("namespace", "default")
        await self._send("POST", f"/api/v1/namespaces/{quote(namespace, safe='')}/events",
                         event_body(obj, type, reason, message), "application/json")
