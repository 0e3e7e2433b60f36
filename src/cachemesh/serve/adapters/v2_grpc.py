"""KServe V2 over gRPC (``inference.GRPCInferenceService``): a thin adapter over the service.

It runs on ``grpc.aio`` in the same event loop as the REST app (``app.py``
starts and stops it with the app's lifespan), on ``ServeSettings.grpc_port``
(8033; 0 turns it off) of the same host, and speaks the protocol that
``tritonclient.grpc`` and KServe's clients speak (``protos/inference.proto``)::

    ServerLive, ServerReady            open, like the REST health probes
    ServerMetadata, ModelMetadata,     inference token (when one is configured)
    ModelReady, ModelInfer,
    ModelStreamInfer, ModelConfig,     (Triton's configuration: derived from the
    ModelStatistics                    metadata; statistics: the versions' tallies)
    RepositoryIndex,                   control token (when one is configured), as
    RepositoryModelLoad | Unload       /v2/repository is over REST

A ``ModelInfer`` without ``model_version`` is routed as REST routes a request
without a version in its path (``docs/mesh.md``): the model's routes read the
call's metadata as headers (``x-model-version: v2``) and the request's
parameters; the version that answered comes back in ``model_version`` and in
the ``x-model-version`` initial metadata.

Tensors come as typed ``contents`` or as ``raw_input_contents`` (what
tritonclient sends); the answer uses ``raw_output_contents`` when the request
used raw inputs, as Triton does, and typed ``contents`` otherwise (raw for all
outputs when one has no typed field, FP16). The datatype work is v2_codec.py's,
shared with REST.

The same port serves gRPC's health service (``grpc_health.py``), which
Kubernetes' gRPC probes call.

Credentials come from the call's metadata, the same two as over HTTP
(``auth.py``): ``authorization: Bearer <token>`` and
``x-cachemesh-bucket-token``. The largest message taken is ``max_body``
(larger ones fail with RESOURCE_EXHAUSTED before any of it is parsed). Errors
map to the status codes of ``error_codes.py`` (by name: see :func:`code_of`);
Retry-After and WWW-Authenticate travel as trailing metadata.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import orjson
from grpc import aio

from ... import __version__
from ... import errors as e
from ...access import CONTROL, INFERENCE, OPEN, Keyring, Principal, acting_as
from ...error_codes import codes_of
from ...runtimes.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor
from .. import protos as pb
from ..cluster import forward_grpc
from ..core.documents import DEFAULT_VERSION
from ..core.service import ModelService
from .auth import credentials
from .grpc_health import health_handler
from .http_errors import message_of, status_of
from .limits import MAX_TENSOR_ELEMENTS
from .repository import EXTENSIONS, index, load_model, unload_model
from .v2_codec import (
    check_datatype,
    check_shape,
    contents_field,
    contents_values,
    decode_contents,
    decode_raw,
    encode_raw,
    needs_raw_outputs,
    unwrap_parameters,
)

log = logging.getLogger("cachemesh.serve")
VERSION_METADATA = "x-model-version"  # initial metadata: the version that answered
CLUSTER_VERSION = "cachemesh-model-version"  # the same, under the cluster's name

_INT64_MAX = 2**63 - 1


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The error's row of the one table (``error_codes.py``), which names the code."""
    return grpc.StatusCode[codes_of(exc).grpc]


# -- messages <-> the service's types ------------------------------------------------

def _parameters(field: Any) -> dict[str, Any]:
    """A protobuf parameter map as the V2 JSON form ({"key": {"bool_param": true}})."""
    out: dict[str, Any] = {}
    for key, param in field.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = {which: getattr(param, which)} if which else None
    return out


def _set_parameters(field: Any, params: dict[str, Any]) -> None:
    for key, value in params.items():
        p = field[str(key)]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if -_INT64_MAX - 1 <= value <= _INT64_MAX:
                p.int64_param = value
            elif 0 < value < 2**64:
                p.uint64_param = value
            else:
                p.string_param = str(value)  # past both 64-bit fields
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            p.string_param = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def decode_request(msg: Any, max_elements: int = MAX_TENSOR_ELEMENTS
                   ) -> tuple[InferenceRequest, bool]:
    """A ``ModelInferRequest`` as the service's request, and whether it used raw inputs;
    a tensor holds at most ``max_elements`` elements (the server's body limit)."""
    if not msg.inputs:
        raise e.InferenceInputError("the request needs at least one input")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise e.InferenceInputError(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs;"
            " it needs one per input, in order")
    tensors = []
    for position, item in enumerate(msg.inputs):
        if not item.name:
            raise e.InferenceInputError(f"input #{position + 1} needs a name")
        where = f"input {item.name!r}"
        datatype = check_datatype(item.datatype, where)
        shape = check_shape(list(item.shape), where, max_elements)
        params = unwrap_parameters(_parameters(item.parameters), where)
        has_contents = item.HasField("contents")
        if raw:
            if has_contents and item.contents.ListFields():
                raise e.InferenceInputError(
                    f"{where} has both contents and raw_input_contents; send one")
            array = decode_raw(raw[position], datatype, shape, where)
        elif has_contents:
            field = contents_field(datatype, where)
            values = getattr(item.contents, field)
            sent = [f.name for f, _ in item.contents.ListFields()]
            if not values and sent:
                raise e.InferenceInputError(
                    f"{where}: {datatype} data goes in contents.{field} (got {', '.join(sent)})")
            array = decode_contents(values, datatype, shape, where)
        elif math.prod(shape) == 0:  # an empty tensor needs no data
            array = decode_raw(b"", datatype, shape, where)
        else:
            raise e.InferenceInputError(f"{where} has no data (contents or raw_input_contents)")
        tensors.append(Tensor(item.name, datatype, shape, array, params))
    outputs = [RequestedOutput(o.name, unwrap_parameters(_parameters(o.parameters),
                                                         f"output {o.name!r}"))
               for o in msg.outputs]
    params = unwrap_parameters(_parameters(msg.parameters), "request")
    return InferenceRequest(tensors, outputs, params, msg.id or None), bool(raw)


def encode_response(response: InferenceResponse, raw_inputs: bool) -> Any:
    """The service's answer as a ``ModelInferResponse``."""
    out = pb.ModelInferResponse(model_name=response.model_name,
                                model_version=response.model_version or "",
                                id=response.id or "")
    _set_parameters(out.parameters, response.parameters)
    use_raw = needs_raw_outputs(response, raw_inputs)
    for t in response.outputs:
        o = out.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        _set_parameters(o.parameters, t.parameters)
        if use_raw:
            out.raw_output_contents.append(encode_raw(t))
        else:
            field, values = contents_values(t)
            getattr(o.contents, field).extend(values)
    return out


# -- the service -------------------------------------------------------------------------

class InferenceServicer:
    """One coroutine per RPC; each runs as the principal its metadata authenticates."""

    def __init__(self, service: ModelService) -> None:
        self.service = service

    async def ServerLive(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self.service.live)

    async def ServerReady(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="cachemesh", version=__version__,
                                         extensions=EXTENSIONS)

    async def ModelReady(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ModelReadyResponse(
            ready=self.service.is_ready(request.name, request.version or None))

    async def ModelMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        meta = await self.service.metadata(request.name, request.version or None)
        out = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                       platform=meta["platform"] or "")
        for key in ("inputs", "outputs"):
            for t in meta[key]:
                getattr(out, key).add(name=t["name"], datatype=t["datatype"],
                                      shape=[int(d) for d in t.get("shape") or []])
        return out

    async def ModelConfig(self, request: Any, context: aio.ServicerContext) -> Any:
        """Triton's configuration, derived from the V2 metadata: no batching of its own
        (``max_batch_size`` 0: the first dimension is part of ``dims``)."""
        meta = await self.service.metadata(request.name, request.version or None)
        out = pb.ModelConfigResponse()
        config = out.config
        config.name = meta["name"]
        config.platform = meta["platform"] or ""
        config.backend = meta["platform"] or ""
        for key, field in (("inputs", config.input), ("outputs", config.output)):
            for t in meta[key]:
                field.add(name=t["name"], data_type=_config_type(t["datatype"]),
                          dims=[int(d) for d in t.get("shape") or []])
        return out

    async def ModelStatistics(self, request: Any, context: aio.ServicerContext) -> Any:
        out = pb.ModelStatisticsResponse()
        for row in self.service.statistics(request.name, request.version or None):
            stats = out.model_stats.add(
                name=row["name"], version=row["version"],
                last_inference=row["last_inference"],
                inference_count=row["inference_count"],
                execution_count=row["execution_count"])
            for key in ("success", "fail", "queue"):
                count, ns = row[key]
                getattr(stats.inference_stats, key).MergeFrom(
                    pb.message("StatisticDuration")(count=count, ns=ns))
        return out

    async def ModelInfer(self, request: Any, context: aio.ServicerContext) -> Any:
        response, raw = await self._infer(request, context)
        if response.model_version:
            # The version that answered (routing.py chose it), as REST's x-model-version.
            await context.send_initial_metadata(((VERSION_METADATA, response.model_version),
                                                 (CLUSTER_VERSION, response.model_version)))
        return self._encode(response, raw)

    async def _infer(self, request: Any, context: aio.ServicerContext
                     ) -> tuple[InferenceResponse, bool]:
        req, raw = decode_request(request, self.service.cfg.max_body)
        # Without a model_version, the model's routes and traffic choose one, from the
        # call's metadata (as REST's headers) and the request's parameters.
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in _metadata(context)}
        response = await self.service.infer(request.model_name, request.model_version or None,
                                            req, headers=headers)
        return response, raw

    @staticmethod
    def _encode(response: InferenceResponse, raw: bool) -> Any:
        out = encode_response(response, raw)
        if response.model_version == DEFAULT_VERSION:
            out.model_version = ""  # a model without versions (the simple forms)
        return out

    async def ModelStreamInfer(self, requests: AsyncIterator[Any],
                               context: aio.ServicerContext) -> AsyncIterator[Any]:
        """Each request in turn; a failed one answers with its error_message and the
        stream goes on, as Triton streams a model that answers each request once."""
        async for request in requests:
            try:
                out = self._encode(*await self._infer(request, context))
            except Exception as exc:
                if not isinstance(exc, e.CachemeshError):
                    log.exception("unexpected error", exc_info=exc)
                yield pb.ModelStreamInferResponse(error_message=message_of(exc))
                continue
            yield pb.ModelStreamInferResponse(infer_response=out)

    async def RepositoryIndex(self, request: Any, context: aio.ServicerContext) -> Any:
        out = pb.RepositoryIndexResponse()
        for entry in index(self.service, request.ready):
            out.models.add(name=entry.name, version=entry.version or "", state=entry.state,
                           reason=entry.reason or "")
        return out

    async def RepositoryModelLoad(self, request: Any, context: aio.ServicerContext) -> Any:
        await load_model(self.service, request.model_name, _repository_parameters(request))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: aio.ServicerContext) -> Any:
        await unload_model(self.service, request.model_name, _repository_parameters(request))
        return pb.RepositoryModelUnloadResponse()


def _config_type(datatype: str) -> str:
    """A V2 datatype as Triton's configuration names it (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _repository_parameters(request: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, param in request.parameters.items():
        which = param.WhichOneof("parameter_choice")
        if which == "bytes_param":
            # tritonclient's load_model(files=...): model files inside the request.
            raise e.InvalidInputError(
                f"load parameter {key!r}: model files in the request are not supported;"
                " give a 'source' (anything `cachemesh pull` takes)")
        out[key] = getattr(param, which) if which else None
    return out


ACCESS = {
    "ServerLive": OPEN, "ServerReady": OPEN,
    "ServerMetadata": INFERENCE, "ModelMetadata": INFERENCE, "ModelReady": INFERENCE,
    "ModelInfer": INFERENCE, "ModelStreamInfer": INFERENCE,
    "ModelConfig": INFERENCE, "ModelStatistics": INFERENCE,
    "RepositoryIndex": CONTROL, "RepositoryModelLoad": CONTROL, "RepositoryModelUnload": CONTROL,
}


def _metadata(context: aio.ServicerContext) -> list[tuple[bytes, bytes]]:
    """The call's text metadata as raw HTTP headers (lower-case names), as auth.py reads them."""
    out = []
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):  # "-bin" keys carry bytes: no credentials there
            out.append((key.lower().encode("latin-1", "replace"),
                        value.encode("latin-1", "replace")))
    return out


async def _abort(context: aio.ServicerContext, exc: BaseException) -> None:
    code = code_of(exc)
    _, headers = status_of(exc)  # Retry-After, WWW-Authenticate; logs what was unexpected
    if headers:
        context.set_trailing_metadata(tuple((k.lower(), v) for k, v in headers.items()))
    await context.abort(code, message_of(exc))


def _wrap_unary(fn: Callable[[Any, Any], Awaitable[Any]], access: str,
                keyring: Keyring) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handler(request: Any, context: aio.ServicerContext) -> Any:
        try:
            principal: Principal = keyring.authenticate(access, *credentials(_metadata(context)))
            with acting_as(principal):
                return await fn(request, context)
        except aio.AbortError:
            raise  # the call already ended with its status (a forwarded call's, forward_grpc)
        except Exception as exc:
            failure = exc
        await _abort(context, failure)  # raises: the call ends with the status

    return handler


def _wrap_stream(fn: Callable[[Any, Any], AsyncIterator[Any]], access: str,
                 keyring: Keyring) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handler(requests: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            principal = keyring.authenticate(access, *credentials(_metadata(context)))
        except Exception as exc:
            await _abort(context, exc)
            return
        with acting_as(principal):
            async for item in fn(requests, context):
                yield item

    return handler


def generic_handler(service: ModelService, keyring: Keyring) -> grpc.GenericRpcHandler:
    servicer = InferenceServicer(service)
    handlers = {}
    for name, (request_cls, response_cls, client_streams, server_streams) in pb.methods().items():
        fn = forward_grpc.wrap(service, name, getattr(servicer, name))
        kw = {"request_deserializer": request_cls.FromString,
              "response_serializer": response_cls.SerializeToString}
        if client_streams and server_streams:
            handlers[name] = grpc.stream_stream_rpc_method_handler(
                _wrap_stream(fn, ACCESS[name], keyring), **kw)
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(fn, ACCESS[name], keyring), **kw)
    return grpc.method_handlers_generic_handler(pb.SERVICE_NAME, handlers)


async def start_grpc(service: ModelService, keyring: Keyring) -> aio.Server:
    """Serve gRPC on ``grpc_port`` of the REST host, in the running event loop."""
    cfg = service.cfg
    server = aio.server(options=[
        # gRPC counts in a C int: a --max-body past 2 GiB is 2 GiB here.
        ("grpc.max_receive_message_length", min(cfg.max_body, 2**31 - 1)),
        ("grpc.max_send_message_length", -1),
        # A port another process holds must fail here, not be shared with it.
        ("grpc.so_reuseport", 0),
    ])
    server.add_generic_rpc_handlers((generic_handler(service, keyring),
                                     health_handler(service)))
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    try:
        port = server.add_insecure_port(f"{host}:{cfg.grpc_port}")
    except RuntimeError as exc:  # grpcio raises where older releases returned 0
        raise e.ConflictError(f"cannot serve gRPC on {host}:{cfg.grpc_port}: the port is"
                              f" taken or the address is not local ({exc})") from None
    if port == 0:
        raise e.ConflictError(f"cannot serve gRPC on {host}:{cfg.grpc_port}: the port is"
                              " taken or the address is not local")
    await server.start()
    log.info("KServe V2 gRPC on %s:%d", host, port)
    return server
