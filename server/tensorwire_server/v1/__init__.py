"""The tensorwire.v1 gRPC service (the contract in ``tensorwire/v1/tensorwire.proto``):
wire messages -> calls on the service core -> wire messages, and the streamed methods'
payloads as chunks or over the data port.

May import: ``core``, ``transport``, ``dataport``, ``models`` (for what it reports),
the client's wire layer and the package root's shared modules. Never torch.
"""
