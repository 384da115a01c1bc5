"""The fuzz suite's harness (tests/v1/test_fuzz.py): the service's methods as the fuzzer
sees them, wire-format primitives, the oracles that say whether a request is
malformed, the Fuzzer that sends batches and checks every answer, and valid requests
to start from."""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, settings

from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import codec, framing, streaming
from tensorwire_server.engine.functions import FUNCTIONS

SERVICE = pb.DESCRIPTOR.services_by_name["TensorService"]
#: Seconds any one request may take: a malformed request is refused at once.
CALL_TIMEOUT = 10.0
#: How much the server's RSS may grow over the storm: allocator slack, far below what
#: keeping the storm's payloads (its large uploads alone are 128 MiB) would cost.
RSS_SLACK = 64 << 20
#: Statuses a malformed request may get: each names the client's mistake.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
#: The models the server runs: the built-ins and three toys.
TOYS = ("quadratic", "two_heads", "raises")
MODELS = frozenset({"identity", "echo", "mlp", "mlp64", *TOYS})
#: Input names of the models with a fixed signature.
MODEL_INPUTS = {
    "identity": {"input"},
    "mlp": {"input"},
    "mlp64": {"input"},
    "quadratic": {"x"},
    "two_heads": {"x", "y"},
    "raises": {"x"},
}
FUNCTION_NAMES = sorted(FUNCTIONS)
# Fewer hypothesis examples, each a batch of requests sent concurrently: the count is
# cheap, generation stays varied, and CI is deterministic (no database, no shrinking).
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


@dataclass(frozen=True)
class Method:
    """One TensorService RPC; for a *Stream RPC, ``request`` and ``response`` are the
    header messages of its parts."""

    name: str
    path: str
    streamed: bool
    request: type[Message]
    response: type[Message]


def _method(descriptor: Any) -> Method:
    def message(name: str) -> type[Message]:
        cls: type[Message] = getattr(pb, name.removesuffix("Part"))
        return cls

    return Method(
        descriptor.name,
        f"/{SERVICE.full_name}/{descriptor.name}",
        descriptor.client_streaming,
        message(descriptor.input_type.name),
        message(descriptor.output_type.name),
    )


METHODS = {m.name: _method(m) for m in SERVICE.methods}
UNARY = [name for name, m in METHODS.items() if not m.streamed]
STREAMS = [name for name, m in METHODS.items() if m.streamed]
TWIN = {name.removesuffix("Stream"): name for name in STREAMS}
assert set(TWIN) <= set(UNARY) and STREAMS, "the service has changed: update this suite"


# ------------------------------------------------------------------ wire primitives


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint; negative values as 64-bit two's complement."""
    value &= (1 << 64) - 1 if value < 0 else (1 << 80) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def overlong(value: int, length: int) -> bytes:
    """``value`` as a varint padded with continuation bytes to ``length`` bytes (a
    decoder refuses more than ten)."""
    out = bytearray(varint(value))
    while len(out) < length:
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def delimited(number: int, body: bytes) -> bytes:
    return key(number, 2) + varint(len(body)) + body


def part(number: int, body: bytes) -> bytes:
    """A *Part message: field 1 a header, field 2 a chunk."""
    return delimited(number, body)


@cache
def nested(depth: int, number: int = 2) -> bytes:
    """``depth`` length-delimited fields, each inside the last."""
    body = b""
    for _ in range(depth):
        body = delimited(number, body)
    return body


@cache
def nested_values(depth: int) -> bytes:
    """A CallRequest whose first argument is a list of a list of ... ``depth`` deep."""
    value = delimited(7, b"\x01")  # none_value
    for _ in range(depth):
        value = delimited(6, delimited(1, value))  # Value.list_value.values
    return delimited(1, b"sum") + delimited(2, value)


def to_stream(raw: bytes, desc: Any, cut: random.Random | int) -> list[bytes]:
    """A serialized request as a stream a client would send: the header with every
    Tensor's data emptied, then the payloads in chunks of ``cut`` bytes, or cut at
    random points when ``cut`` is a Random."""
    payloads: list[bytes] = []

    def swap(body: memoryview) -> bytes:
        payloads.append(bytes(body))
        return b""

    pieces: list[Any] = []
    framing._reframe(memoryview(raw), 0, len(raw), desc, swap, pieces, 0)
    data = b"".join(payloads)
    if isinstance(cut, int):
        points = set(range(0, len(data), cut))
    else:
        points = {cut.randrange(len(data) + 1) for _ in range(cut.randrange(4))}
    cuts = sorted({0, len(data), *points})
    chunks = [data[a:b] for a, b in pairwise(cuts)]
    return [part(1, b"".join(pieces)), *(part(2, c) for c in chunks)]


# ------------------------------------------------------------------ oracles


def names_nothing(message: Message) -> bool:
    """Whether a parsed request names no model or function the server has."""
    if isinstance(message, pb.InferRequest):
        return message.model not in MODELS
    if isinstance(message, pb.CallRequest):
        return message.function not in FUNCTIONS
    if isinstance(message, pb.GradRequest):
        if message.WhichOneof("target") == "function":
            return message.function not in FUNCTIONS
        return message.model not in MODELS
    return False  # InfoRequest takes nothing, so any InfoRequest will do


def unary_malformed(method: Method, raw: bytes) -> bool:
    """Whether the server must refuse ``raw``: it does not parse, or names nothing."""
    try:
        message = method.request.FromString(raw)
    except DecodeError:
        return True
    return names_nothing(message)


def stream_malformed(method: Method, parts: Sequence[bytes]) -> bool:
    """Whether the server must refuse a stream: it is not a header and the chunks it
    declares (the client's own receiver says), or its request names nothing."""
    receiver = streaming.StreamReceiver(method.request)
    try:
        for raw in parts:
            receiver.feed(raw)
        received = receiver.finish()
    except Exception:
        return True
    finally:
        receiver.close()
    return names_nothing(received.message)


# ------------------------------------------------------------------ the harness


@dataclass
class Server:
    proc: Any
    address: str
    log: list[str]

    def rss(self) -> int:
        """The server's resident memory in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@dataclass
class Fuzzer:
    """Sends batches of requests concurrently and checks every answer."""

    server: Server
    channel: grpc.Channel
    sent: Counter[str] = field(default_factory=Counter)  # by generator
    malformed: Counter[str] = field(default_factory=Counter)  # of those, known malformed
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0
    baseline: int = 0  # the server's RSS after warming up
    #: Sent with every request: a session, so that session methods are fuzzed too.
    metadata: tuple[tuple[str, str], ...] = ()

    _pending: list[Callable[[], None]] = field(default_factory=list)

    def send(
        self,
        kind: str,
        unary: Sequence[tuple[str, bytes, bool]] = (),
        streams: Sequence[tuple[str, list[bytes], bool]] = (),
    ) -> None:
        """Start every (method, request, known malformed): unary requests as bytes,
        streams as lists of parts; then check the answers to the previous batch, so
        that the server answers one batch while the next is generated."""
        checks: list[Callable[[], None]] = []
        for name, raw, malformed in unary:
            future = self.channel.unary_unary(METHODS[name].path).future(
                raw, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
            checks.append(self._unary_check(kind, name, raw, malformed, future))
        for name, parts, malformed in streams:
            call = self.channel.stream_stream(METHODS[name].path)(
                iter(parts), timeout=CALL_TIMEOUT, metadata=self.metadata
            )
            checks.append(self._stream_check(kind, name, parts, malformed, call))
        self.settle()
        self._pending = checks

    def settle(self) -> None:
        """Check every answer still unchecked."""
        pending, self._pending = self._pending, []
        for check in pending:
            check()

    def _unary_check(
        self, kind: str, name: str, raw: bytes, malformed: bool, future: Any
    ) -> Callable[[], None]:
        began, ended = time.monotonic(), _timer(future)

        def check() -> None:
            try:
                answer = future.result()
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                answer, code, details = None, exc.code(), exc.details() or ""
            seconds = min(ended[0], time.monotonic()) - began  # the callback may lag
            self._check(kind, METHODS[name], [raw], malformed, code, details, seconds)
            if code is grpc.StatusCode.OK:
                self._parses(kind, METHODS[name], [raw], lambda: _unary_answer(name, answer))

        return check

    def _stream_check(
        self, kind: str, name: str, parts: list[bytes], malformed: bool, call: Any
    ) -> Callable[[], None]:
        began, ended = time.monotonic(), _timer(call)

        def check() -> None:
            try:
                answer = list(call)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                answer, code, details = [], exc.code(), exc.details() or ""
            seconds = min(ended[0], time.monotonic()) - began
            self._check(kind, METHODS[name], parts, malformed, code, details, seconds)
            if code is grpc.StatusCode.OK:
                self._parses(kind, METHODS[name], parts, lambda: _stream_answer(name, answer))

        return check

    def _check(
        self,
        kind: str,
        method: Method,
        request: Sequence[bytes],
        malformed: bool,
        code: grpc.StatusCode,
        details: str,
        seconds: float,
    ) -> None:
        self.sent[kind] += 1
        self.malformed[kind] += malformed
        self.codes[kind, code.name] += 1
        self.slowest = max(self.slowest, seconds)
        problem = None
        if code is grpc.StatusCode.OK:
            if malformed:
                problem = "a malformed request was answered OK"
        elif code not in REFUSALS:
            problem = f"answered {code.name}: {details}"
        elif not details.strip():
            problem = f"answered {code.name} without saying what was wrong"
        elif "metadata" in details:  # gRPC's own limit, not the server's answer
            problem = f"the error was too large to arrive: {code.name}: {details}"
        if problem is None and seconds > CALL_TIMEOUT:
            problem = f"took {seconds:.1f} s"
        if problem is not None:
            self.failures.append(f"{kind} {method.name}: {problem}\n    request {_show(request)}")

    def _parses(
        self, kind: str, method: Method, request: Sequence[bytes], decode: Callable[[], None]
    ) -> None:
        try:
            decode()
        except Exception as exc:
            self.failures.append(
                f"{kind} {method.name}: an OK answer does not parse: {exc!r}\n"
                f"    request {_show(request)}"
            )

    def assert_clean(self, kind: str, at_least: int) -> None:
        """No failures so far, ``at_least`` malformed requests of ``kind`` sent."""
        self.settle()
        assert self.server.proc.poll() is None, (
            f"the server died ({self.server.proc.returncode}):\n" + self.log_tail()
        )
        assert not self.failures, (
            f"{len(self.failures)} bad answers (codes: {dict(self.codes)}); the first:\n"
            + "\n".join(_distinct(self.failures)[:25])
            + "\nserver log:\n"
            + self.log_tail()
        )
        assert self.malformed[kind] >= at_least, (kind, dict(self.sent), dict(self.malformed))

    def log_tail(self) -> str:
        """The server's last log lines but its access log, and every distinct exception
        its tracebacks end in."""
        lines = [line for line in self.server.log if ".access:" not in line]
        raised = {line for line in lines if re.match(r"\w+(Error|Exception)\b", line)}
        return "".join(lines[-60:]) + "exceptions:\n" + "".join(sorted(raised))


def _timer(future: grpc.Future) -> list[float]:
    ended = [float("inf")]
    future.add_done_callback(lambda _: ended.__setitem__(0, time.monotonic()))
    return ended


def _unary_answer(name: str, raw: bytes) -> None:
    received = codec.receive(METHODS[name].response, raw)
    for where, tensor in codec.tensors_in(received.message):
        received.array(tensor, where)


def _stream_answer(name: str, parts: list[bytes]) -> None:
    receiver = streaming.StreamReceiver(METHODS[name].response)
    for raw in parts:
        receiver.feed(raw)
    received = receiver.finish()
    for where, tensor in codec.tensors_in(received.message):
        received.array(tensor, where)


def _show(request: Sequence[bytes]) -> str:
    shown = [raw[:160] + (b"..." if len(raw) > 160 else b"") for raw in request[:4]]
    sizes = [len(raw) for raw in request]
    return f"{shown!r} (part sizes {sizes[:12]})"


def _distinct(failures: list[str]) -> list[str]:
    """One failure per kind of fault: numbers and quoted names do not tell faults apart."""
    seen: dict[str, str] = {}
    for failure in failures:
        head = re.sub(r"\d+|'[^']*'", "#", failure.splitlines()[0])
        seen.setdefault(head, failure)
    return list(seen.values())


# ------------------------------------------------------------------ valid requests


def infer(
    model: str, *inputs: tuple[str, np.ndarray], outputs: Sequence[str] = ()
) -> codec.Encoder[Any]:
    encoder = codec.Encoder(pb.InferRequest(model=model, outputs=outputs))
    for name, arr in inputs:
        encoder.named(encoder.message.inputs.add(), name, arr)
    return encoder


def grad(
    model: str,
    *inputs: tuple[str, np.ndarray],
    wrt: Sequence[str] = (),
    grad_outputs: Sequence[tuple[str, np.ndarray]] = (),
    param_grads: bool = False,
) -> codec.Encoder[Any]:
    encoder = codec.Encoder(pb.GradRequest(model=model, wrt=wrt, param_grads=param_grads))
    for name, arr in inputs:
        encoder.named(encoder.message.inputs.add(), name, arr)
    for name, arr in grad_outputs:
        encoder.named(encoder.message.grad_outputs.add(), name, arr)
    return encoder


def call(
    function: str, *args: Any, wrt: Sequence[str] | None = None, **kwargs: Any
) -> codec.Encoder[Any]:
    message: Message
    if wrt is None:
        message = pb.CallRequest(function=function)
    else:
        message = pb.GradRequest(function=function, wrt=wrt)
    encoder = codec.Encoder(message)
    for i, arg in enumerate(args):
        encoder.value(message.args.add(), arg, f"argument {i}")  # type: ignore[attr-defined]
    for name, arg in kwargs.items():
        encoder.value(message.kwargs[name], arg, name)  # type: ignore[attr-defined]
    return encoder


def put(arr: np.ndarray) -> codec.Encoder[Any]:
    encoder = codec.Encoder(pb.PutRequest())
    encoder.tensor(encoder.message.tensor, arr)
    return encoder


RNG = np.random.default_rng(0)
F32 = RNG.standard_normal((4, 16)).astype(np.float32)
F64 = RNG.standard_normal(5)
BIG = RNG.standard_normal((1100, 16)).astype(np.float32)  # past INLINE_LIMIT: spliced
# (method, request) pairs the server answers OK: the seeds of mutation and streams.
VALID: list[tuple[str, codec.Encoder[Any]]] = [
    ("Info", codec.Encoder(pb.InfoRequest())),
    ("Infer", infer("identity", ("", F32))),
    ("Infer", infer("identity", ("input", np.array([True, False, True])))),
    ("Infer", infer("identity", ("", np.arange(6, dtype=np.uint64).reshape(2, 3)))),
    ("Infer", infer("identity", ("", np.array(1.5 - 2j, np.complex128)))),
    ("Infer", infer("identity", ("", np.zeros((0, 3), np.int16)))),
    ("Infer", infer("echo", ("a", F64), ("b", np.arange(3, dtype=np.int8)))),
    ("Infer", infer("mlp", ("input", F32), outputs=["output"])),
    ("Infer", infer("mlp64", ("", F32.astype(np.float64)))),
    ("Infer", infer("two_heads", ("x", F64), ("y", F64))),
    ("Infer", infer("identity", ("", BIG))),
    ("Grad", grad("mlp", ("", F32), grad_outputs=[("output", np.ones((4, 4), np.float32))])),
    ("Grad", grad("quadratic", ("x", F64), param_grads=True)),
    ("Grad", grad("two_heads", ("x", F64), ("y", F64), wrt=["x"], grad_outputs=[("sum", F64)])),
    ("Grad", grad("mlp", ("", BIG), grad_outputs=[("", np.ones((1100, 4), np.float32))])),
    ("Grad", call("dot", F64, F64, wrt=["0", "1"])),
    ("Grad", call("sum", F32, wrt=[])),
    ("Call", call("matmul", F32, F32.T)),
    ("Call", call("softmax", F32, dim=1)),
    ("Call", call("einsum", "ij,kj->ik", F32, F32)),
    ("Call", call("cat", [F32, F32], dim=0)),
    ("Call", call("sum", F32, dim=[0], keepdim=True, dtype="float64")),
    ("Call", call("clamp", F64, min=None, max=0.5)),
    ("Call", call("linalg.svd", F32)),
    ("Call", call("nn.functional.pad", F32, [1, 2], value=float("nan"))),
    ("Call", call("fft.rfft", BIG)),
    ("Put", put(F32)),
    ("Put", put(BIG)),
]
# Serialized with map entries in a fixed order (protobuf's own order varies from process
# to process), so that mutations, and the whole run, are the same every time.
VALID_BYTES = [
    (name, METHODS[name].request.FromString(e.finish()).SerializeToString(deterministic=True))
    for name, e in VALID
]
# The same requests streamed, by their index in VALID_BYTES: small payloads in 97-byte
# chunks, large ones in a dozen or so.
VALID_STREAMS = {
    i: (
        TWIN[name],
        to_stream(raw, METHODS[name].request.DESCRIPTOR, 97 if len(raw) < 4096 else 6007),
    )
    for i, (name, raw) in enumerate(VALID_BYTES)
    if name in TWIN
}
# Streams to start malformed ones from, by method: the valid ones, or for a method with
# none that answers OK without server state (GetStream needs a handle), a bare header.
SEEDS = {
    name: [p for n, p in VALID_STREAMS.values() if n == name] or [[part(1, b"")]]
    for name in STREAMS
}


def stream_header(name: str, shape: list[int], dtype: int = pb.DTYPE_UINT8) -> bytes:
    """A stream header declaring one tensor of ``shape``, for the request of ``name``."""
    tensor = pb.Tensor(dtype=dtype, shape=shape)  # type: ignore[arg-type]
    message: Message
    if name == "InferStream":
        message = pb.InferRequest(model="identity", inputs=[pb.NamedTensor(tensor=tensor)])
    elif name == "GradStream":
        message = pb.GradRequest(function="sum", args=[pb.Value(tensor=tensor)])
    elif name == "PutStream":
        message = pb.PutRequest(tensor=tensor)
    else:
        message = pb.CallRequest(function="sum", args=[pb.Value(tensor=tensor)])
    return part(1, message.SerializeToString())


def large_uploads_cut_short(fuzz: Fuzzer, kind: str) -> None:
    """Uploads of 8 MiB tensors (128 MiB in all) that end 2 MiB short or run 2 MiB
    over, a few at a time: each buffer must go back when its stream is refused."""
    header, mib = stream_header("InferStream", [8 << 20]), part(2, bytes(1 << 20))
    for _ in range(4):
        fuzz.send(kind, streams=[("InferStream", [header, *[mib] * n], True) for n in (6, 10) * 2])
    fuzz.settle()
