"""kopf's registration of the reconcilers (handlers.py); run with ``python -m cachemesh.operator``.

Nothing here decides anything: each decorator calls one reconciler with the object,
the control API client and the Kubernetes side (:class:`~.kube.InClusterKube`), and
turns its errors into kopf's: an invalid object is permanent (its status says why), any
other error is retried after :data:`RESYNC_S`. The finalizer (``cachemesh.io/cleanup``)
keeps an object until its delete handler removed the cache or model from the mesh.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import kopf

from ..client import AsyncControlClient
from ..config import OperatorSettings, Settings
from ..errors import CachemeshError, InvalidInputError
from . import handlers
from .kube import InClusterKube
from .mapping import GROUP, VERSION

FINALIZER = f"{GROUP}/cleanup"
#: Seconds between two looks at an object's cache or model, and before a retry.
RESYNC_S = 10.0
T = TypeVar("T")
log = logging.getLogger(__name__)


class Context:
    """What every handler of one operator process shares (kopf's ``memo``)."""

    def __init__(self, settings: Settings, operator: OperatorSettings) -> None:
        self.operator = operator
        self.api = AsyncControlClient.from_settings(settings)
        self.kube = InClusterKube(operator)

    async def aclose(self) -> None:
        await self.api.aclose()
        await self.kube.aclose()


_context: Context | None = None


def context() -> Context:
    if _context is None:
        raise kopf.PermanentError("the operator did not start (no context)")
    return _context


async def _call(work: Awaitable[T]) -> T:
    try:
        return await work
    except InvalidInputError as exc:
        raise kopf.PermanentError(str(exc)) from exc
    except CachemeshError as exc:
        raise kopf.TemporaryError(str(exc), delay=RESYNC_S) from exc


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _context
    settings.persistence.finalizer = FINALIZER
    settings.posting.enabled = False  # events go through Kube.event, in the object's namespace
    _context = Context(Settings.from_env(), OperatorSettings.from_env())


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    if _context is not None:
        await _context.aclose()


@kopf.on.create(GROUP, VERSION, "datacaches")
@kopf.on.update(GROUP, VERSION, "datacaches", field="spec")
@kopf.on.resume(GROUP, VERSION, "datacaches")
async def datacache_declared(body: Mapping[str, Any], **_: Any) -> None:
    ctx = context()
    await _call(handlers.reconcile_datacache(body, ctx.api, ctx.kube, declare=True,
                                             lone_node=ctx.operator.lone_node))


@kopf.timer(GROUP, VERSION, "datacaches", interval=RESYNC_S, idle=0)
async def datacache_resync(body: Mapping[str, Any], **_: Any) -> None:
    ctx = context()
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return
    with contextlib.suppress(kopf.PermanentError):  # an invalid spec: its status says why
        await _call(handlers.reconcile_datacache(body, ctx.api, ctx.kube, declare=False,
                                                 lone_node=ctx.operator.lone_node))


@kopf.on.delete(GROUP, VERSION, "datacaches")
async def datacache_deleted(body: Mapping[str, Any], **_: Any) -> None:
    ctx = context()
    await _call(handlers.delete_datacache(body, ctx.api, ctx.kube))


@kopf.on.create(GROUP, VERSION, "models")
@kopf.on.update(GROUP, VERSION, "models", field="spec")
@kopf.on.resume(GROUP, VERSION, "models")
async def model_declared(body: Mapping[str, Any], **_: Any) -> None:
    ctx = context()
    await _call(handlers.reconcile_model(body, ctx.api, ctx.kube, declare=True))


@kopf.timer(GROUP, VERSION, "models", interval=RESYNC_S, idle=0)
async def model_resync(body: Mapping[str, Any], **_: Any) -> None:
    ctx = context()
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return
    with contextlib.suppress(kopf.PermanentError):
        await _call(handlers.reconcile_model(body, ctx.api, ctx.kube, declare=False))


@kopf.on.delete(GROUP, VERSION, "models")
async def model_deleted(body: Mapping[str, Any], **_: Any) -> None:
    ctx = context()
    await _call(handlers.delete_model(body, ctx.api, ctx.kube))
