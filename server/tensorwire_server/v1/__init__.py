"""The tensorwire.v1 gRPC service (the contract in ``tensorwire/v1/tensorwire.proto``):
``servicer`` translates its RPCs (wire messages -> calls on the service core -> wire
messages), ``describe`` words what it reports of the server and its models,
``handlers`` serves its methods over gRPC (where each runs), and ``streams`` the
streamed methods' payloads as chunks or over the data port.

May import: ``core``, ``transport``, ``dataport``, ``models`` (for what it reports),
the client's wire layer and the package root's shared modules. Never torch.
"""

from tensorwire_server.v1.handlers import SERVICE, tensor_service_handler
from tensorwire_server.v1.servicer import TensorServicer

__all__ = ["SERVICE", "TensorServicer", "tensor_service_handler"]
