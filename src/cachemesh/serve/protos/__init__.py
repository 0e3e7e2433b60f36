"""The KServe V2 gRPC messages (package ``inference``) and gRPC's health service
(``grpc.health.v1``), built at import time.

``inference.proto`` and ``health.proto`` are the sources; ``*_descriptor.py`` are
their compiled descriptors (generated, committed; ``make proto`` rewrites it). The message
classes are made from it here, in a descriptor pool of cachemesh's own rather
than protobuf's default one: tritonclient declares the same ``inference.*``
names in the default pool, and a process holding both (a test, an app that
embeds the server and calls another) would fail with "duplicate symbol".
Generated ``_pb2`` modules were rejected because they check the protobuf
version that wrote them and fail under an older runtime.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool, message_factory

from . import health_descriptor, inference_descriptor

POOL = descriptor_pool.DescriptorPool()
FILE = POOL.AddSerializedFile(inference_descriptor.FILE_DESCRIPTOR)
SERVICE = FILE.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name  # "inference.GRPCInferenceService"
HEALTH_FILE = POOL.AddSerializedFile(health_descriptor.FILE_DESCRIPTOR)
HEALTH = HEALTH_FILE.services_by_name["Health"]
HEALTH_NAME = HEALTH.full_name  # "grpc.health.v1.Health"


def message(name: str) -> Any:
    """The class of a message: "ModelInferRequest", "ModelInferResponse.InferOutputTensor"."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


ServerLiveResponse = message("ServerLiveResponse")
ServerReadyResponse = message("ServerReadyResponse")
ModelReadyResponse = message("ModelReadyResponse")
ServerMetadataResponse = message("ServerMetadataResponse")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
ModelStreamInferResponse = message("ModelStreamInferResponse")
RepositoryIndexResponse = message("RepositoryIndexResponse")
RepositoryModelLoadResponse = message("RepositoryModelLoadResponse")
RepositoryModelUnloadResponse = message("RepositoryModelUnloadResponse")
ModelConfigResponse = message("ModelConfigResponse")
ModelStatisticsResponse = message("ModelStatisticsResponse")
HealthCheckResponse = message_factory.GetMessageClass(
    POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))
SERVING = HealthCheckResponse.SERVING
NOT_SERVING = HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = HealthCheckResponse.SERVICE_UNKNOWN


def methods(service: Any = SERVICE) -> dict[str, tuple[Any, Any, bool, bool]]:
    """Each RPC of a service: (request class, response class, client streams, server streams)."""
    return {m.name: (message_factory.GetMessageClass(m.input_type),
                     message_factory.GetMessageClass(m.output_type),
                     m.client_streaming, m.server_streaming) for m in service.methods}
