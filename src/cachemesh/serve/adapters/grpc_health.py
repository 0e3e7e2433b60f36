"""gRPC's standard health service, ``grpc.health.v1.Health`` (``protos/health.proto``).

Kubernetes' gRPC probes (``grpc: {port: 8033}``) and ``grpc_health_probe`` call it.
It answers for the server as a whole (``service`` empty) and for the one service
it serves, ``inference.GRPCInferenceService``::

    SERVING        the server is ready (``ModelService.ready``: started, not draining)
    NOT_SERVING    starting or draining
    NOT_FOUND      Check of any other service name (the protocol's rule);
                   Watch answers SERVICE_UNKNOWN instead, and goes on

It needs no token, like ``ServerLive``/``ServerReady`` and the REST probes: a
probe carries none. ``Watch`` sends the status, then each change (looked at every
``WATCH_INTERVAL_S``), until the client or the server ends the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from .. import protos as pb
from ..core.service import ModelService

WATCH_INTERVAL_S = 0.5


class HealthServicer:
    def __init__(self, service: ModelService) -> None:
        self.service = service

    def _status(self, name: str) -> int | None:
        if name not in ("", pb.SERVICE_NAME):
            return None
        return pb.SERVING if self.service.ready else pb.NOT_SERVING

    async def Check(self, request: Any, context: aio.ServicerContext) -> Any:
        status = self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown service {request.service!r}")
        return pb.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        last: int | None = -1
        while True:
            status = self._status(request.service)
            if status != last:
                yield pb.HealthCheckResponse(
                    status=pb.SERVICE_UNKNOWN if status is None else status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)


def health_handler(service: ModelService) -> grpc.GenericRpcHandler:
    servicer = HealthServicer(service)
    handlers = {}
    for name, (request_cls, response_cls, _, server_streams) in pb.methods(pb.HEALTH).items():
        make = (grpc.unary_stream_rpc_method_handler if server_streams
                else grpc.unary_unary_rpc_method_handler)
        handlers[name] = make(getattr(servicer, name),
                              request_deserializer=request_cls.FromString,
                              response_serializer=response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(pb.HEALTH_NAME, handlers)
