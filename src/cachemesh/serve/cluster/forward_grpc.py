"""Any node answers any gRPC V2 call: ``ModelInfer``, ``ModelMetadata``, ``ModelReady`` and
each request of ``ModelStreamInfer`` go to the node that holds the model, as
``forward.py`` does for HTTP.

:func:`wrap` wraps those servicer methods (``v2_grpc.generic_handler``). The same rules:
a call from another node (metadata ``cachemesh-forwarded-by``) needs the cluster token
(``cachemesh-cluster-token``; UNAUTHENTICATED otherwise) and is served here; a call from
outside loses any inbound copies of both, and goes where ``ClusterPlacer.locate`` says,
once, over a ``grpc.aio`` channel to the node's gRPC address (its record's ``grpc``), with
the caller's metadata. Metadata and readiness calls go to a ready copy elsewhere if there
is one and never start a load, except ``ModelMetadata`` on a node without the version's
files (cluster mode pulls on placement): placed like an inference. The node that answered
is named in the trailing metadata (``cachemesh-node``); the version, in the initial
metadata (``x-model-version`` and ``cachemesh-model-version``).

The retry rule is ``placer.with_retries``'s: a node whose channel does not connect within
:data:`CONNECT_S` never got the call, and the next copy is tried; an error after that is
the node's answer (or its death while it held the call) and goes back to the caller as
it is: never replayed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from ...errors import CachemeshError, NodeUnreachableError, UnauthorizedError
from .. import protos as pb
from .forward import token_ok
from .placer import (
    FORWARDED_BY,
    NODE_HEADER,
    REFUSED_HEADER,
    TOKEN_HEADER,
    VERSION_HEADER,
    ClusterPlacer,
    placer_of,
)

if TYPE_CHECKING:
    from ..core.service import ModelService

CONNECT_S = 2.0
FORWARDED = frozenset({"ModelInfer", "ModelMetadata", "ModelReady"})
_INTERNAL = frozenset({FORWARDED_BY, TOKEN_HEADER})


class Channels:
    """One channel per node address, kept while the server runs."""

    def __init__(self) -> None:
        self._by_address: dict[str, aio.Channel] = {}

    def get(self, address: str) -> aio.Channel:
        channel = self._by_address.get(address)
        if channel is None:
            channel = aio.insecure_channel(address, options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1)])
            self._by_address[address] = channel
        return channel


def wrap(service: ModelService, name: str,
         fn: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    """``fn`` (a servicer method), forwarded in cluster mode; itself otherwise."""
    if name == "ModelStreamInfer":
        return wrap_stream(service, fn)  # type: ignore[arg-type,return-value]
    if name not in FORWARDED:
        return fn
    request_cls, response_cls, _, _ = pb.methods()[name]
    method = f"/{pb.SERVICE_NAME}/{name}"
    channels = Channels()

    async def handler(request: Any, context: aio.ServicerContext) -> Any:
        placer = placer_of(service)
        metadata = [(k, v) for k, v in (context.invocation_metadata() or ())
                    if isinstance(v, str)]
        if placer is None:
            return await fn(request, context)
        given = {k.lower(): v for k, v in metadata if k.lower() in _INTERNAL}
        context.set_trailing_metadata(((NODE_HEADER, placer.name),))
        if FORWARDED_BY in given:
            if not token_ok(given.get(TOKEN_HEADER), placer.cluster.token):
                service.metrics.forwards.labels("refused").inc()
                raise UnauthorizedError(
                    f"a call forwarded by {given[FORWARDED_BY]!r} without the cluster token")
            if placer.draining and service.draining:
                context.set_trailing_metadata(((NODE_HEADER, placer.name),
                                               (REFUSED_HEADER, "draining")))
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"node {placer.name!r} is draining")
            return await fn(request, context)
        model = request.name if name != "ModelInfer" else request.model_name
        version = request.version if name != "ModelInfer" else request.model_version
        outside = [(k, v) for k, v in metadata if k.lower() not in _INTERNAL]
        try:
            label = service.route(model, version or None, headers=dict(outside)).version
        except CachemeshError:
            return await fn(request, context)  # unknown here: the servicer answers
        if name != "ModelInfer":
            ready = placer.copies(model, label, "ready")
            # As forward.py: metadata without the files here is placed like an inference.
            if placer.here(model, label) or (not ready and (
                    name == "ModelReady" or placer.has_files(model, label))):
                return await fn(request, context)

        async def serve(node: str) -> Any:
            if node == placer.name:
                return await fn(request, context)
            return await _forward(placer, channels, node, method, request_cls, response_cls,
                                  request, label, outside, context)

        return await placer.with_retries(model, label, serve)

    return handler


def wrap_stream(service: ModelService, fn: Callable[[Any, Any], AsyncIterator[Any]]
                ) -> Callable[[Any, Any], AsyncIterator[Any]]:
    """``ModelStreamInfer``: each request of the stream goes where its model is, as a
    ``ModelInfer`` call to that node; its answer (or its error, as ``error_message``, the
    stream going on) comes back in the stream's order."""
    request_cls, response_cls, _, _ = pb.methods()["ModelInfer"]
    method = f"/{pb.SERVICE_NAME}/ModelInfer"
    channels = Channels()

    async def one(request: Any) -> AsyncIterator[Any]:
        yield request

    async def handler(requests: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        placer = placer_of(service)
        metadata = [(k, v) for k, v in (context.invocation_metadata() or ())
                    if isinstance(v, str)]
        given = {k.lower(): v for k, v in metadata if k.lower() in _INTERNAL}
        if placer is None or FORWARDED_BY in given:
            if placer is not None and not token_ok(given.get(TOKEN_HEADER),
                                                   placer.cluster.token):
                service.metrics.forwards.labels("refused").inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "a stream forwarded without the cluster token")
            async for out in fn(requests, context):
                yield out
            return
        outside = [(k, v) for k, v in metadata if k.lower() not in _INTERNAL]
        async for request in requests:
            try:
                label = service.route(request.model_name, request.model_version or None,
                                      headers=dict(outside)).version
            except CachemeshError:
                label = None  # the servicer answers (not found)
            response = None
            if label is not None and (placer.draining
                                      or not placer.here(request.model_name, label)):

                async def serve(node: str, request: Any = request, label: str = label) -> Any:
                    if node == placer.name:
                        return None
                    return await _forward(placer, channels, node, method, request_cls,
                                          response_cls, request, label, outside, None)

                try:
                    response = await placer.with_retries(request.model_name, label, serve)
                except CachemeshError as exc:
                    yield pb.ModelStreamInferResponse(error_message=str(exc))
                    continue
                except aio.AioRpcError as exc:
                    yield pb.ModelStreamInferResponse(error_message=exc.details() or "")
                    continue
            if response is None:
                async for out in fn(one(request), context):
                    yield out
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)

    return handler


async def _forward(placer: ClusterPlacer, channels: Channels, node: str, method: str,
                   request_cls: Any, response_cls: Any, request: Any, label: str,
                   outside: list[tuple[str, str]],
                   context: aio.ServicerContext | None) -> Any:
    """One unary call on ``node``. With ``context`` (a unary call of a client), the
    answer's metadata and status are the call's; without (one request of a stream), an
    error is raised for the stream to report."""
    record = await placer.record(node)
    if not record.grpc:
        raise NodeUnreachableError(f"node {node!r} serves no gRPC", node)
    channel = channels.get(record.grpc)
    try:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_S)
    except (TimeoutError, asyncio.TimeoutError) as exc:
        raise NodeUnreachableError(
            f"node {node!r} did not take the call: no gRPC connection to {record.grpc}",
            node) from exc
    if method.endswith("/ModelInfer") and label != "default" and request.model_version != label:
        pinned = request_cls()
        pinned.CopyFrom(request)
        pinned.model_version = label  # the other node does not draw from the split again
        request = pinned
    call = channel.unary_unary(method, request_serializer=request_cls.SerializeToString,
                               response_deserializer=response_cls.FromString)
    metrics = placer.service.metrics
    started = time.perf_counter()
    metadata = (*outside, (FORWARDED_BY, placer.name), (TOKEN_HEADER, placer.cluster.token))
    outcome = "ok"
    try:
        rpc = call(request, metadata=metadata)
        response = await rpc
        if context is None:
            return response
        initial = dict(await rpc.initial_metadata() or ())
        version = initial.get("x-model-version")
        if version:
            await context.send_initial_metadata(
                (("x-model-version", version), (VERSION_HEADER, version)))
        context.set_trailing_metadata(((NODE_HEADER, node),))
        return response
    except aio.AioRpcError as exc:
        if dict(exc.trailing_metadata() or ()).get(REFUSED_HEADER):
            outcome = ""  # counted by with_retries
            raise NodeUnreachableError(f"node {node!r} refused the call: it is draining",
                                       node) from None
        outcome = "error"
        if context is None:
            raise
        context.set_trailing_metadata(((NODE_HEADER, node),))
        await context.abort(exc.code() or grpc.StatusCode.UNKNOWN, exc.details() or "")
    finally:
        if outcome:
            metrics.forwards.labels(outcome).inc()
        metrics.forward_latency.observe(time.perf_counter() - started)
