"""A scripted TensorService for the clients' resilience and security tests: a small real
gRPC server on 127.0.0.1 that fails each attempt as a test says, counts attempts, and
echoes the caller's ``authorization`` metadata and TLS peer back; and the helpers that
run one call through either client."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from tensorwire import AsyncClient, Client
from tensorwire._transport.methods import SERVICE
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import framing, streaming
from tensorwire.wire.codec import Encoder, receive

#: The answer to a request for the data port from a server without one.
NO_DATA_PLANE = framing.part(framing.PART_DATA, [], 0)
#: Answer the part of the response after its header with UNAVAILABLE (streams only).
PARTIAL = "partial"
Action = grpc.StatusCode | str | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def identity(inputs: Any) -> Encoder[pb.InferResponse]:
    """An InferResponse holding ``inputs`` (decoded NamedTensors) as its outputs."""
    encoder = Encoder(pb.InferResponse())
    for name, arr in inputs:
        encoder.named(encoder.message.outputs.add(), name, arr)
    return encoder


class Scripted:
    """A real gRPC server with TensorService's Info, Infer and InferStream, failing
    each attempt as ``script`` says (then answering: Info echoes the caller, Infer
    returns its inputs), counting attempts and the request bytes streams delivered."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.script: dict[str, list[Action]] = {}
        self.always: dict[str, Action] = {}
        self.calls: Counter[str] = Counter()
        self.uploaded: list[int] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Info": grpc.unary_unary_rpc_method_handler(self.info),
            "Infer": grpc.unary_unary_rpc_method_handler(self.infer),
            "InferStream": grpc.stream_stream_rpc_method_handler(self.infer_stream),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
        )
        if credentials is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def fail(self, method: str, *actions: Action, always: Action = None) -> None:
        """Answer the next calls of ``method`` with ``actions``, then with ``always``."""
        self.script[method] = list(actions)
        self.always[method] = always

    def _next(self, method: str) -> Action:
        with self.lock:
            self.calls[method] += 1
            script = self.script.get(method)
            return script.pop(0) if script else self.always.get(method)

    def info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        action = self._next("Info")
        if isinstance(action, grpc.StatusCode):
            context.abort(action, f"scripted {action.name}")
        metadata = dict(context.invocation_metadata())
        peer = context.auth_context().get("x509_common_name", [b""])
        return pb.InfoResponse(
            server_version=str(metadata.get("authorization", "")),
            torch_version=peer[0].decode(),
        ).SerializeToString()

    def infer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        action = self._next("Infer")
        if isinstance(action, grpc.StatusCode):
            context.abort(action, f"scripted {action.name}")
        received = receive(pb.InferRequest, request)
        return identity(received.named(received.message.inputs, "input")).finish()

    def infer_stream(
        self, parts: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        receiver = streaming.StreamReceiver(pb.InferRequest)
        for raw in parts:
            if framing.split_part(raw)[0] == framing.PART_DATA:
                yield NO_DATA_PLANE  # as a server without one answers: chunks, please
                continue
            receiver.feed(raw)
        received = receiver.finish()
        self.uploaded.append(receiver.received)
        action = self._next("InferStream")
        if isinstance(action, grpc.StatusCode):
            context.abort(action, f"scripted {action.name}")
        response = streaming.parts(identity(received.named(received.message.inputs, "input")))
        if action == PARTIAL:
            yield next(response)
            context.abort(grpc.StatusCode.UNAVAILABLE, "support.scripted: gone after the header")
        yield from response


Run = Callable[..., Any]
#: Keywords that go to the method; the others go to the client's constructor.
CALL_KEYWORDS = {"progress"}


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    call = {k: v for k, v in options.items() if k in CALL_KEYWORDS}
    return {k: v for k, v in options.items() if k not in call}, call


def run_sync(target: str, method: str, *args: Any, **options: Any) -> Any:
    """``Client(target, **options).method(*args)``, and close the client."""
    client_options, call_options = _split(options)
    with Client(target, **client_options) as c:
        return getattr(c, method)(*args, **call_options)


def run_async(target: str, method: str, *args: Any, **options: Any) -> Any:
    """The same with an AsyncClient, in a new event loop."""
    client_options, call_options = _split(options)

    async def go() -> Any:
        async with AsyncClient(target, **client_options) as c:
            return await getattr(c, method)(*args, **call_options)

    return asyncio.run(go())


both_clients = pytest.mark.parametrize("run", [run_sync, run_async], ids=["sync", "async"])
