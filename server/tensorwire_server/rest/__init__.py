"""The KServe v2 / Open Inference Protocol over HTTP/REST, with Triton's extensions that
``tritonclient.http`` calls (binary tensor data, the model repository, statistics,
system and CUDA shared memory), on a port of its own beside gRPC: ``listener`` serves
it (aiohttp's low-level server, on the gRPC server's own event loop), ``routes`` names
each URL's method, ``endpoints`` answers them, ``infer_json`` and ``infer_reply`` turn
an inference request's JSON and binary body into the protocol's messages and back,
``body`` reads a request's body within its limits, ``replies`` writes JSON and errors.

Every call passes the gRPC service's gate (transport.passage: the same tokens, scopes,
budgets, deadlines, metrics and access log) and is answered by the same transport-free
``kserve.protocol.InferenceServicer``; nothing of the protocol is answered twice.

May import: ``kserve`` (the protocol, its codec and messages), ``transport`` (the gate,
the executor), ``telemetry``, the client's wire layer and the package root's shared
modules. Never torch.
"""

from tensorwire_server.rest.listener import RestServer

__all__ = ["RestServer"]
