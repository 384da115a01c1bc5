"""The KServe v2 / Open Inference Protocol (inference.GRPCInferenceService), served beside
tensorwire.v1 on the same port and over the same models: ``servicer`` translates its
RPCs, ``codec`` its tensors and ``describe`` what it says about models."""

from tensorwire_server.kserve.reflection import reflection_pool
from tensorwire_server.kserve.servicer import (
    SERVICE,
    InferenceServicer,
    inference_service_handler,
)

__all__ = ["SERVICE", "InferenceServicer", "inference_service_handler", "reflection_pool"]
