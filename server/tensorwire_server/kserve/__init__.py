"""The KServe v2 / Open Inference Protocol (inference.GRPCInferenceService), served beside
tensorwire.v1 on the same port and over the same models: ``protocol`` answers its
methods over the service core for any transport, ``servicer`` serves them as gRPC
RPCs (the rest package as HTTP), ``codec`` its tensors, ``describe`` what it says about models and
``placements`` which of a caller's shared-memory regions a request names; ``v2`` holds
the generated messages.

May import: ``core``, ``transport``, ``engine``, ``models``, ``regions``, ``device``,
the client's wire layer and the package root's shared modules. Its servicer never
imports torch.
"""

from tensorwire_server.kserve.reflection import reflection_pool
from tensorwire_server.kserve.servicer import (
    SERVICE,
    InferenceServicer,
    inference_service_handler,
)

__all__ = ["SERVICE", "InferenceServicer", "inference_service_handler", "reflection_pool"]
