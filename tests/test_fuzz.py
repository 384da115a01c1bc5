"""Bad input at scale: over 10 000 malformed requests against one server process.

Four generators, every RPC of the service (named from its descriptor, sent through a raw
channel as bytes so that nothing on our side can tidy a request up):

- raw bytes: random bytes, wire-format field soup (huge and overlong varints, wrong
  wire types, groups, length prefixes that lie) and nesting deeper than any parser allows;
- mutations of valid requests: bit flips, truncation, insertions, deletions,
  duplicated and spliced fields, lying length prefixes, requests sent to the wrong RPC;
- hostile values in well-formed messages (hypothesis strategies): unknown dtypes,
  negative, overflowing and huge shapes, payloads that disagree with them, bool bytes
  other than 0 and 1, odd names, unknown models and functions, wrong arguments, wrt
  and grad_outputs that do not fit; each sent unary and as a stream;
- malformed streams: parts in any order, parts that are not parts, inline data,
  short and overlong payloads, declared allocations far past the machine's memory.

Every request known to be malformed must be answered with a non-OK status; no answer
may be INTERNAL or UNKNOWN (a server bug) or late, every error names what was wrong,
and an OK answer must parse. The server is a subprocess so that a crash shows; at the
end it is alive, its memory has not grown, and a correct request gets its exact answer.
What the fuzzing found is pinned in FOUND. Hypothesis runs derandomized, without a
database or shrinking, and requests are serialized deterministically: every run sends
the same requests.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import TESTS, spawn_server
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tensorwire import Client
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire import codec, framing, streaming
from tensorwire.wire.dtypes import NUMPY_BY_WIRE, WIRE_BY_NAME
from tensorwire.wire.protocol import CHANNEL_OPTIONS, SESSION_KEY
from tensorwire_server.functions import FUNCTIONS

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


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fuzzer() -> Iterator[Fuzzer]:
    """A server process (CPU, built-in and toy models) and a raw channel to it, warmed
    up (every valid request three times, then large uploads cut short) so that its RSS
    after that is the baseline."""
    flags = [f"--model={name}=toy_models:{name}" for name in TOYS]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        # Two batches in flight at a time: every request must be parsed, none shed.
        env.setenv("TENSORWIRE_MAX_CONCURRENT_REQUESTS", "1024")
        # Puts that succeed stay in the fuzzer's session: bounded well below RSS_SLACK.
        env.setenv("TENSORWIRE_SESSION_QUOTA_BYTES", str(16 << 20))
        # Buffers of a MiB or more straight from and back to the kernel (glibc would
        # otherwise keep freed ones for reuse): RSS then shows what is still held.
        env.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        with (
            spawn_server("--device", "cpu", *flags) as (proc, address, log),
            grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel,
        ):
            fuzz = Fuzzer(Server(proc, address, log), channel)
            opened = channel.unary_unary(METHODS["OpenSession"].path)(b"", timeout=CALL_TIMEOUT)
            session = pb.OpenSessionResponse.FromString(opened).session
            fuzz.metadata = ((SESSION_KEY, session),)
            for _ in range(3):
                fuzz.send(
                    "valid",
                    [(n, raw, False) for n, raw in VALID_BYTES],
                    [(n, parts, False) for n, parts in VALID_STREAMS.values()],
                )
            fuzz.settle()
            assert set(fuzz.codes) == {("valid", "OK")}, (fuzz.codes, fuzz.failures)
            large_uploads_cut_short(fuzz, "warm-up")
            fuzz.baseline = fuzz.server.rss()
            yield fuzz


def large_uploads_cut_short(fuzz: Fuzzer, kind: str) -> None:
    """Uploads of 8 MiB tensors (128 MiB in all) that end 2 MiB short or run 2 MiB
    over, a few at a time: each buffer must go back when its stream is refused."""
    header, mib = _header("InferStream", [8 << 20]), part(2, bytes(1 << 20))
    for _ in range(4):
        fuzz.send(kind, streams=[("InferStream", [header, *[mib] * n], True) for n in (6, 10) * 2])
    fuzz.settle()


# ------------------------------------------------------------------ (a) raw bytes

SPECIAL_NUMBERS = [0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 2**29 - 1, 2**29, 2**32, 2**61]
numbers = st.one_of(st.integers(1, 9), st.sampled_from(SPECIAL_NUMBERS))
varint_values = st.one_of(
    st.integers(0, 300),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]),
    st.integers(-(2**63), 2**64 - 1),
)


@st.composite
def wire_field(draw: st.DrawFn, inner: st.SearchStrategy[bytes] | None = None) -> bytes:
    """One field of any wire type, well-formed or not."""
    number = draw(numbers)
    wire_type = draw(st.integers(0, 7))
    if wire_type == 0:
        return key(number, 0) + varint(draw(varint_values))
    if wire_type in (1, 5):
        return key(number, wire_type) + draw(st.binary(max_size=10))
    if wire_type == 2:
        body = (
            draw(inner)
            if inner is not None and draw(st.booleans())
            else draw(st.binary(max_size=40))
        )
        lie = draw(st.sampled_from([0, 0, 0, 1, -1, 7, 2**31, 2**62]))
        return key(number, 2) + varint(max(len(body) + lie, 0)) + body
    if wire_type == 3 and inner is not None:  # a group, ended or not
        return key(number, 3) + draw(inner) + draw(st.sampled_from([key(number, 4), b""]))
    return key(number, wire_type) + draw(st.binary(max_size=4))


field_soup = st.recursive(
    st.lists(wire_field(), max_size=6).map(b"".join),
    lambda inner: st.lists(wire_field(inner), min_size=1, max_size=4).map(b"".join),
    max_leaves=12,
)
# Around the parsers' limits (protobuf's 100, our splicer's 64) and far past them.
depths = st.integers(1, 120) | st.sampled_from(
    [31, 32, 33, 49, 50, 51, 63, 64, 65, 99, 100, 101, 3000]
)
raw_bytes = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=1, max_size=3000),
    field_soup,
    field_soup.map(lambda b: b + delimited(15, bytes(70_000))),  # past INLINE_LIMIT
    depths.map(nested),
    depths.map(lambda d: key(3, 3) * d + key(3, 4) * d),  # unknown groups in groups
    depths.map(nested_values),
    depths.map(lambda d: nested_values(d) + delimited(15, bytes(70_000))),
    st.sampled_from(
        [
            b"",
            b"\xff" * 11,  # an overlong key
            b"\x08" + b"\xff" * 10 + b"\x01",  # an overlong value
            b"\x0a" + varint(2**63) + b"x",  # a length past the end
            b"\x12\xff\xff\xff\xff\x0f",  # a 4 GiB length, no body
            b"\x0f",  # wire type 7
            b"\x0c",  # an end group with no start
            b"\x0b" * 200,  # groups never ended
            b"\x00",  # field number 0
            bytes(range(256)),
        ]
    ),
)


def test_random_bytes_to_every_method_are_refused(fuzzer: Fuzzer) -> None:
    @settings(FUZZ, max_examples=110)
    @given(
        st.lists(
            st.tuples(st.sampled_from(list(METHODS)), raw_bytes, st.integers(0, 3)),
            min_size=40,
            max_size=40,
        )
    )
    def run(cases: list[tuple[str, bytes, int]]) -> None:
        unary, streams = [], []
        for name, raw, where in cases:
            method = METHODS[name]
            if not method.streamed:
                unary.append((name, raw, unary_malformed(method, raw)))
                continue
            # As a whole part, as a header, as a chunk, or after a good header.
            good = SEEDS[name][0]
            parts = [[raw], [part(1, raw)], [part(2, raw)], [good[0], raw]][where]
            streams.append((name, parts, stream_malformed(method, parts)))
        fuzzer.send("raw", unary, streams)

    run()
    fuzzer.assert_clean("raw", at_least=2000)  # session RPCs take most bytes


# ------------------------------------------------------------------ (b) mutations


def _all_fields(
    raw: bytes, start: int, end: int, depth: int = 0
) -> Iterator[tuple[int, int, int, int]]:
    """Every field at every depth, guessing that length-delimited bodies are messages."""
    view = memoryview(raw)
    try:
        fields = list(framing.fields(view, start, end))
    except Exception:
        return
    for _, wire_type, s, b, e in fields:
        yield s, b, e, wire_type
        if wire_type == 2 and depth < 8 and e - b <= 2048:  # not into tensor payloads
            yield from _all_fields(raw, b, e, depth + 1)


def mutate(raw: bytes, other: bytes, rng: random.Random) -> bytes:
    """One to four random mutations of a serialized message."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        fields = list(_all_fields(bytes(data), 0, len(data)))
        if op == 0 and data:  # flip bits
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del data[rng.randrange(len(data) + 1) :]
        elif op == 2:  # insert random bytes
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 12))
        elif op == 3 and data:  # delete a range
            at = rng.randrange(len(data))
            del data[at : at + rng.randint(1, 16)]
        elif op == 4 and fields:  # duplicate a field in place
            s, _, e, _ = rng.choice(fields)
            data[e:e] = data[s:e]
        elif op == 5:  # splice in a field of another request
            theirs = list(_all_fields(other, 0, len(other)))
            if theirs:
                s, _, e, _ = rng.choice(theirs)
                at = rng.choice([0, len(data), *(f[0] for f in fields)])
                data[at:at] = other[s:e]
        elif op == 6 and fields:  # a length prefix that lies
            delimited_fields = [f for f in fields if f[3] == 2]
            if delimited_fields:
                s, b, e, _ = rng.choice(delimited_fields)
                size = e - b
                lie = rng.choice([size + 1, size - 1, size * 2 + 3, 0, 2**31, 2**63 - 1, 2**64 - 1])
                head = bytes(data[s:b])
                key_end = len(head) - len(varint(size))
                data[s + key_end : b] = varint(max(lie, 0))
        elif op == 7 and fields:  # the same length in more bytes, past ten or not
            s, b, e, w = rng.choice(fields)
            if w == 2 and data[s] < 0x80:  # a one-byte key
                data[s + 1 : b] = overlong(e - b, rng.choice([2, 5, 10, 11, 16]))
        elif op == 8 and fields:  # change a field's wire type
            s, _, _, w = rng.choice(fields)
            if data[s] < 0x80:
                data[s] = data[s] & ~7 | rng.choice([t for t in range(8) if t != w])
    return bytes(data)


def test_mutated_valid_requests_are_refused_or_answered(fuzzer: Fuzzer) -> None:
    @settings(FUZZ, max_examples=80)
    @given(
        st.lists(
            st.tuples(
                st.integers(0, len(VALID_BYTES) - 1),
                st.integers(0, len(VALID_BYTES) - 1),
                st.integers(0, 2**32 - 1),
                st.sampled_from([None, None, None, *UNARY]),
            ),
            min_size=50,
            max_size=50,
        )
    )
    def run(cases: list[tuple[int, int, int, str | None]]) -> None:
        unary, streams = [], []
        for base, donor, seed, elsewhere in cases:
            rng = random.Random(seed)
            name, raw = VALID_BYTES[base]
            mutated = mutate(raw, VALID_BYTES[donor][1], rng)
            target = elsewhere or name  # now and then, the request of another RPC
            unary.append((target, mutated, unary_malformed(METHODS[target], mutated)))
            if base in VALID_STREAMS and rng.random() < 0.3:
                # The request streamed, its header part mutated.
                good = VALID_STREAMS[base][1]
                parts = [mutate(good[0], VALID_BYTES[donor][1], rng), *good[1:]]
                streams.append((TWIN[name], parts, stream_malformed(METHODS[TWIN[name]], parts)))
        fuzzer.send("mutated", unary, streams)

    run()
    fuzzer.assert_clean("mutated", at_least=3500)


# ------------------------------------------------------------------ (c) hostile values

WIRE_DTYPES = sorted(NUMPY_BY_WIRE)
SMALL_INTS = st.integers(-3, 8)
# Far past any memory (a size from them fails to allocate at once) or past int64.
HUGE_INTS = st.sampled_from([2**40, -(2**40), 2**62, -(2**62), 2**63 - 1, -(2**63)])
FLOATS = st.one_of(
    st.floats(-10, 10),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 5e-324, -0.0]),
)
names = st.one_of(
    st.sampled_from(["", "input", "output", "x", "y", "sum", "prod", "a", "0", "1", "-1"]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    st.sampled_from(["\x00", "名前", "é\u0301", "input ", "a" * 10_000, "b" * 100_000]),
)
dims = st.one_of(
    st.integers(0, 4),
    st.sampled_from([-1, -(2**63), 2**31, 2**32, 2**40, 2**62, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)


@dataclass(frozen=True)
class Hostile:
    """A generated message part and whether it is certainly refused where it is used."""

    message: Any
    bad: bool


@st.composite
def good_tensor(
    draw: st.DrawFn, dtypes: Sequence[int] = WIRE_DTYPES, ndim: int | None = None
) -> Hostile:
    """A valid tensor: known dtype, small shape, exactly its bytes (bool: 0 or 1)."""
    dtype = draw(st.sampled_from(dtypes))
    rank = draw(st.integers(0, 3)) if ndim is None else ndim
    shape = draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank))
    size = int(np.prod(shape)) * NUMPY_BY_WIRE[dtype].itemsize
    data = draw(st.binary(min_size=size, max_size=size))
    if dtype == pb.DTYPE_BOOL:
        data = bytes(b & 1 for b in data)
    return Hostile(pb.Tensor(dtype=dtype, shape=shape, data=data), False)


@st.composite
def bad_tensor(draw: st.DrawFn) -> Hostile:
    """A tensor every receiver must refuse, one fault at a time."""
    tensor: pb.Tensor = draw(good_tensor()).message
    fault = draw(st.integers(0, 7))
    if fault == 0:
        tensor.dtype = pb.DTYPE_UNSPECIFIED
    elif fault == 1:
        tensor.dtype = draw(
            st.integers(len(WIRE_DTYPES) + 1, 2**31 - 1) | st.integers(-(2**31), -1)
        )
    elif fault == 2:
        tensor.shape.insert(
            draw(st.integers(0, len(tensor.shape))), draw(st.integers(-(2**63), -1))
        )
    elif fault == 3:  # more elements than int64 counts
        tensor.shape[:] = [2**40, 2**40, *draw(st.lists(st.integers(1, 3), max_size=2))]
    elif fault == 4:  # a payload that disagrees with the shape
        size = len(tensor.data)
        tensor.data = draw(st.binary(max_size=64).filter(lambda b: len(b) != size))
    elif fault == 5:  # bool bytes other than 0 and 1
        count = draw(st.integers(1, 6))
        tensor.dtype, tensor.shape[:] = pb.DTYPE_BOOL, [count]
        tensor.data = draw(st.binary(min_size=count, max_size=count).filter(lambda b: max(b) > 1))
    elif fault == 6:  # more dimensions than an array has
        tensor.shape[:], tensor.data = (
            [1] * draw(st.integers(65, 100)),
            bytes(NUMPY_BY_WIRE[tensor.dtype].itemsize),
        )
    else:  # an empty tensor whose other dimensions overflow: no array has that shape
        tensor.shape[:] = [
            0,
            *draw(st.sampled_from([[2**62, 2**62], [2**63 - 1, 2], [2**40, 2**40, 2**40]])),
        ]
        tensor.data = b""
    return Hostile(tensor, True)


@st.composite
def any_tensor(draw: st.DrawFn) -> Hostile:
    """Fields drawn independently: valid or not, nobody knows beforehand."""
    dtype = draw(st.sampled_from(WIRE_DTYPES) | st.integers(-(2**31), 2**31 - 1))
    shape = draw(st.lists(dims, max_size=5))
    data = draw(st.binary(max_size=48))
    return Hostile(pb.Tensor(dtype=dtype, shape=shape, data=data), False)


floating = [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_INT64]
tensors = st.one_of(good_tensor(), good_tensor(floating), bad_tensor(), any_tensor())


def _value(kind: str, payload: Any) -> pb.Value:
    value = pb.Value()
    if kind == "tensor":
        value.tensor.CopyFrom(payload)
    elif kind == "list_value":
        value.list_value.SetInParent()
        value.list_value.values.extend(payload)
    elif kind != "empty":
        setattr(value, kind, payload)
    return value


leaf_values = st.one_of(
    tensors.map(lambda h: Hostile(_value("tensor", h.message), h.bad)),
    st.booleans().map(lambda b: Hostile(_value("bool_value", b), False)),
    (SMALL_INTS | HUGE_INTS).map(lambda i: Hostile(_value("int_value", i), False)),
    FLOATS.map(lambda f: Hostile(_value("float_value", f), False)),
    names.map(lambda s: Hostile(_value("string_value", s), False)),
    st.just(Hostile(_value("none_value", True), False)),
    st.just(Hostile(_value("empty", None), True)),  # no kind set
)
values = st.recursive(
    leaf_values,
    lambda inner: st.lists(inner, max_size=4).map(
        lambda items: Hostile(
            _value("list_value", [h.message for h in items]), any(h.bad for h in items)
        )
    ),
    max_leaves=6,
)
kwarg_names = st.one_of(
    st.sampled_from(
        [
            "dim",
            "keepdim",
            "dtype",
            "out",
            "p",
            "n",
            "k",
            "input",
            "other",
            "weight",
            "bias",
            "reduction",
            "inplace",
            "equation",
            "min",
            "max",
            "kernel_size",
            "stride",
            "",
            "self",
        ]
    ),
    names,
)
models = st.sampled_from(sorted(MODELS)) | names
functions = st.one_of(
    st.sampled_from(FUNCTION_NAMES),
    st.sampled_from(
        [
            "matmul_",
            "torch.matmul",
            "linalg",
            "__import__",
            "eval",
            "os.system",
            "load",
            "save",
            "zeros",
            "manual_seed",
            "add_",
            "nn.functional.dropout",
        ]
    ),
    names,
)


def model_inputs(model: str) -> st.SearchStrategy[list[tuple[str, Hostile]]]:
    """Named inputs: sometimes exactly what ``model`` takes, else anything."""
    fitting: dict[str, st.SearchStrategy[list[tuple[str, Hostile]]]] = {
        "mlp": st.tuples(st.just(""), good_tensor([pb.DTYPE_FLOAT32], 2)).map(lambda p: [p]),
        "two_heads": st.tuples(
            st.tuples(st.just("x"), good_tensor([pb.DTYPE_FLOAT64], 1)),
            st.tuples(st.just("y"), good_tensor([pb.DTYPE_FLOAT64], 1)),
        ).map(list),
    }
    anything = st.lists(st.tuples(names, tensors), max_size=4)
    return fitting.get(model, anything) | anything


@st.composite
def hostile_infer(draw: st.DrawFn) -> tuple[pb.InferRequest, bool]:
    model = draw(models)
    inputs = draw(model_inputs(model))
    outputs = draw(st.lists(names, max_size=2))
    message = pb.InferRequest(
        model=model,
        inputs=[pb.NamedTensor(name=n, tensor=h.message) for n, h in inputs],
        outputs=outputs,
    )
    return message, model not in MODELS or any(h.bad for _, h in inputs)


@st.composite
def hostile_call(draw: st.DrawFn) -> tuple[pb.CallRequest, bool]:
    function = draw(functions)
    args = draw(st.lists(values, max_size=4))
    kwargs = draw(st.dictionaries(kwarg_names, values, max_size=3))
    message = pb.CallRequest(function=function, args=[h.message for h in args])
    for name, h in kwargs.items():
        message.kwargs[name].CopyFrom(h.message)
    bad = (
        function not in FUNCTIONS
        or any(h.bad for h in [*args, *kwargs.values()])
        or "out" in kwargs
        or (
            kwargs.get("dtype") is not None
            and kwargs["dtype"].message.WhichOneof("kind") == "string_value"
            and kwargs["dtype"].message.string_value not in WIRE_BY_NAME
        )
    )
    return message, bad


@st.composite
def hostile_grad(draw: st.DrawFn) -> tuple[pb.GradRequest, bool]:
    grad_outputs = draw(st.lists(st.tuples(names, tensors), max_size=2))
    message = pb.GradRequest(
        grad_outputs=[pb.NamedTensor(name=n, tensor=h.message) for n, h in grad_outputs],
        param_grads=draw(st.booleans()),
    )
    bad = any(h.bad for _, h in grad_outputs)
    if draw(st.booleans()):
        call_message, call_bad = draw(hostile_call())
        message.function = call_message.function
        message.args.extend(call_message.args)
        for name, value in call_message.kwargs.items():
            message.kwargs[name].CopyFrom(value)
        # Inputs are named by position, so names mostly from those, in any order.
        wrt = draw(st.lists(st.sampled_from(["0", "1", "2"]) | names, max_size=3))
        # A name that is no position is never an input.
        bad |= call_bad or message.param_grads or any(not w.isdecimal() for w in wrt)
    else:
        infer_message, infer_bad = draw(hostile_infer())
        if infer_message.model or draw(st.booleans()):
            message.model = infer_message.model
        message.inputs.extend(infer_message.inputs)
        given = {nt.name for nt in infer_message.inputs}
        known = MODEL_INPUTS.get(infer_message.model, given)
        wrt = draw(st.lists(st.sampled_from(sorted(known) or [""]) | names, max_size=3))
        bad |= infer_bad or any(w not in known for w in wrt)
    message.wrt.extend(wrt)
    bad |= len(set(wrt)) < len(wrt)  # a name twice
    return message, bad


hostile = st.one_of(
    hostile_infer().map(lambda m: ("Infer", *m)),
    hostile_grad().map(lambda m: ("Grad", *m)),
    hostile_call().map(lambda m: ("Call", *m)),
)


def test_hostile_values_in_well_formed_messages_are_refused(fuzzer: Fuzzer) -> None:
    @settings(FUZZ, max_examples=60)
    @given(st.lists(st.tuples(hostile, st.integers(0, 2**32 - 1)), min_size=16, max_size=16))
    def run(cases: list[tuple[tuple[str, Message, bool], int]]) -> None:
        unary, streams = [], []
        for (name, message, bad), seed in cases:
            raw = message.SerializeToString(deterministic=True)
            unary.append((name, raw, bad or unary_malformed(METHODS[name], raw)))
            # The same request streamed: data in chunks cut anywhere.
            parts = to_stream(raw, METHODS[name].request.DESCRIPTOR, random.Random(seed))
            streams.append((TWIN[name], parts, bad or stream_malformed(METHODS[TWIN[name]], parts)))
        fuzzer.send("hostile", unary, streams)

    run()
    fuzzer.assert_clean("hostile", at_least=1000)


# ------------------------------------------------------------------ (d) malformed streams


def _header(name: str, shape: list[int], dtype: int = pb.DTYPE_UINT8) -> bytes:
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


HUGE_SHAPES = [[2**60], [2**40, 2**40], [2**31, 2**31], [2**62, 4], [2**41], [2**20] * 3]


def random_part(name: str, good: list[bytes], rng: random.Random) -> bytes:
    """A part that may or may not belong in the stream of ``name``."""
    choice = rng.randrange(13)
    if choice == 0:
        return good[0]  # a (second?) good header
    if choice == 1:
        return rng.choice(good[1:] or good)  # a good chunk, maybe out of place
    if choice == 2:
        return part(2, rng.randbytes(rng.choice([0, 1, 7, 64, 300])))
    if choice == 3:  # a header with its data inline
        twin = name.removesuffix("Stream")
        return part(1, rng.choice([raw for n, raw in VALID_BYTES if n == twin] or [b""]))
    if choice == 4:
        return _header(name, rng.choice(HUGE_SHAPES), rng.choice(WIRE_DTYPES))
    if choice == 5:
        return b""
    if choice == 6:
        return rng.randbytes(rng.randrange(40))
    if choice == 7:  # header and chunk in one part: the last wins
        body = rng.choice(good[1:] or good)
        return good[0] + body if rng.random() < 0.5 else body + good[0]
    if choice == 8:
        return key(3, 0) + varint(rng.randrange(2**64))  # an unknown field only
    if choice == 9:
        return key(1, 0) + varint(5)  # the header field as a varint
    if choice == 10:  # the header of another RPC
        return rng.choice([p for n, p in VALID_STREAMS.values() if n != name])[0]
    if choice == 11:
        return part(1, mutate(bytes(framing.split_part(good[0])[1]), good[0], rng))
    return part(2, b"")  # an empty chunk


def malformed_stream(name: str, rng: random.Random) -> list[bytes]:
    good = rng.choice(SEEDS[name])
    how = rng.randrange(8)
    if how == 0:  # nothing but random parts
        return [random_part(name, good, rng) for _ in range(rng.randrange(6))]
    parts = list(good)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(parts) + 1)
        op = rng.randrange(6)
        if op == 0 and parts:
            del parts[min(at, len(parts) - 1)]
        elif op == 1 and parts:
            parts.insert(at, parts[min(at, len(parts) - 1)])
        elif op == 2 and len(parts) > 1:
            i, j = rng.sample(range(len(parts)), 2)
            parts[i], parts[j] = parts[j], parts[i]
        elif op == 3 and len(parts) > 1:  # a part short by some bytes
            i = rng.randrange(1, len(parts))
            parts[i] = parts[i][: -rng.randint(1, 5)]
        elif op == 4:  # one chunk too many
            parts.append(part(2, rng.randbytes(rng.randint(1, 9))))
        else:
            parts.insert(at, random_part(name, good, rng))
    return parts


def test_malformed_streams_are_refused(fuzzer: Fuzzer) -> None:
    @settings(FUZZ, max_examples=60)
    @given(
        st.lists(
            st.tuples(st.sampled_from(STREAMS), st.integers(0, 2**32 - 1)), min_size=40, max_size=40
        )
    )
    def run(cases: list[tuple[str, int]]) -> None:
        streams = []
        for name, seed in cases:
            parts = malformed_stream(name, random.Random(seed))
            streams.append((name, parts, stream_malformed(METHODS[name], parts)))
        fuzzer.send("streams", streams=streams)

    run()
    large_uploads_cut_short(fuzzer, "streams")  # their buffers must go back: see below
    fuzzer.assert_clean("streams", at_least=2000)


# ------------------------------------------------------------------ the aftermath


def test_a_declared_huge_allocation_is_refused_at_once(fuzzer: Fuzzer) -> None:
    """A header declaring exabytes is answered as soon as it arrives, while the client
    still holds its stream open; a unary request declaring as much, at once too."""
    with grpc.insecure_channel(fuzzer.server.address, options=CHANNEL_OPTIONS) as channel:
        # GetStream's request declares no tensor: nothing to allocate.
        for name in (s for s in STREAMS if s != "GetStream"):
            for shape in HUGE_SHAPES:
                release = threading.Event()

                def upload(
                    header: bytes = _header(name, shape), release: threading.Event = release
                ) -> Iterator[bytes]:
                    yield header
                    release.wait(CALL_TIMEOUT)  # the stream stays open

                began = time.monotonic()
                responses = channel.stream_stream(METHODS[name].path)(
                    upload(), timeout=CALL_TIMEOUT
                )
                with pytest.raises(grpc.RpcError) as info:
                    list(responses)
                release.set()
                seconds = time.monotonic() - began
                code, details = info.value.code(), info.value.details()  # type: ignore[attr-defined]
                refusals = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
                assert code in refusals, (name, shape, code, details)
                assert re.search(r"cannot allocate|more than|too large|dimension", details), details
                assert seconds < 5, (name, shape, seconds)
        for shape in HUGE_SHAPES:
            request = pb.InferRequest(
                model="identity",
                inputs=[pb.NamedTensor(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=shape))],
            )
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(METHODS["Infer"].path)(
                    request.SerializeToString(), timeout=CALL_TIMEOUT
                )
            assert info.value.code() in REFUSALS  # type: ignore[attr-defined]
            assert time.monotonic() - began < 5


def _tensor(shape: list[int], data: bytes = b"", dtype: int = pb.DTYPE_UINT8) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


def _identity(tensor: pb.Tensor) -> bytes:
    inputs = [pb.NamedTensor(tensor=tensor)]
    return pb.InferRequest(model="identity", inputs=inputs).SerializeToString()


def _echo(count: int, repeat_last: bool = False) -> bytes:
    names = [f"n{i}" for i in range(count)] + ([f"n{count - 1}"] if repeat_last else [])
    inputs = [pb.NamedTensor(name=n, tensor=_tensor([0])) for n in names]
    return pb.InferRequest(model="echo", inputs=inputs).SerializeToString()


def _call(function: str, *args: pb.Value, **kwargs: pb.Value) -> bytes:
    message = pb.CallRequest(function=function, args=args, kwargs=kwargs)
    return message.SerializeToString(deterministic=True)


_X = pb.Value(tensor=_tensor([1, 3, 4], bytes(48), pb.DTYPE_FLOAT32))
_EYE = pb.Value(tensor=_tensor([2, 2], np.eye(2).tobytes(), pb.DTYPE_FLOAT64))
# What this suite found, each once more: (method, request, status, what the message says).
FOUND = [
    # A shape NumPy cannot make was a ValueError deep in the decoder: INTERNAL.
    ("Infer", _identity(_tensor([1] * 65, b"\0")), "INVALID_ARGUMENT", "65 dimensions"),
    ("Infer", _identity(_tensor([0, 2**62, 2**62])), "INVALID_ARGUMENT", "too large"),
    (
        "Call",
        _call("sum", pb.Value(tensor=_tensor([0, 2**63 - 1, 2]))),
        "INVALID_ARGUMENT",
        "too large",
    ),
    # torch ran for hours on these, or crashed the process, instead of refusing them.
    (
        "Call",
        _call("nn.functional.max_pool1d", _X, pb.Value(int_value=2**32)),
        "INVALID_ARGUMENT",
        "kernel_size",
    ),
    (
        "Call",
        _call("nn.functional.max_pool1d", _X, kernel_size=pb.Value(int_value=2**63 - 1)),
        "INVALID_ARGUMENT",
        "kernel_size",
    ),
    (
        "Call",
        _call("linalg.matrix_power", _EYE, pb.Value(int_value=-(2**63))),
        "INVALID_ARGUMENT",
        "greater than",
    ),
    # A name twice in wrt was a ValueError in the engine: INTERNAL.
    (
        "Grad",
        pb.GradRequest(
            model="identity",
            inputs=[pb.NamedTensor(tensor=_tensor([2], bytes(16), pb.DTYPE_FLOAT64))],
            wrt=["input", "input"],
            grad_outputs=[pb.NamedTensor(tensor=_tensor([2], bytes(16), pb.DTYPE_FLOAT64))],
        ).SerializeToString(),
        "INVALID_ARGUMENT",
        "more than once",
    ),
    # Duplicate names were looked for in quadratic time, holding the GIL: 30 000
    # inputs stalled the whole server for 10 s, 40 000 for 18 (past CALL_TIMEOUT).
    ("Infer", _echo(40_000, repeat_last=True), "INVALID_ARGUMENT", "given more than once"),
    ("Infer", _echo(40_000), "OK", ""),
    # Client-supplied names and lists of them were quoted whole: past 8 KiB the status
    # did not fit gRPC's metadata, and the client got RESOURCE_EXHAUSTED ("metadata size
    # exceeds limit") instead of the error.
    ("Infer", pb.InferRequest(model="m" * 100_000).SerializeToString(), "NOT_FOUND", "characters"),
    ("Call", _call("sum", **{"k" * 100_000: pb.Value()}), "INVALID_ARGUMENT", "empty value"),
    (
        "Grad",
        pb.GradRequest(
            model="echo", inputs=pb.InferRequest.FromString(_echo(20_000)).inputs, wrt=["zzz"]
        ).SerializeToString(),
        "INVALID_ARGUMENT",
        "in all",
    ),
]


def test_what_fuzzing_found_stays_fixed(fuzzer: Fuzzer) -> None:
    with grpc.insecure_channel(fuzzer.server.address, options=CHANNEL_OPTIONS) as channel:
        for name, raw, code, match in FOUND:
            try:
                channel.unary_unary(METHODS[name].path)(raw, timeout=CALL_TIMEOUT)
                got, details = "OK", ""
            except grpc.RpcError as exc:
                got, details = exc.code().name, exc.details()  # type: ignore[attr-defined]
            assert (got, match in details) == (code, True), (name, raw[:100], got, details)
    # Gradients were named in the inputs' order, whatever wrt's: y's came back as x's.
    x, y = np.array([0.5, 2.0]), np.array([3.0, -1.0])
    with Client(fuzzer.server.address, timeout=30) as client:
        result = client.grad(
            "two_heads", {"x": x, "y": y}, wrt=["y", "x"], grad_outputs={"prod": np.ones(2)}
        )
    np.testing.assert_allclose(result.grads["y"], np.sin(x))
    np.testing.assert_allclose(result.grads["x"], np.cos(x) * y)


def test_the_server_survives_serves_correctly_and_kept_no_memory(fuzzer: Fuzzer) -> None:
    assert fuzzer.server.proc.poll() is None, "the server died:\n" + fuzzer.log_tail()
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    with Client(fuzzer.server.address, timeout=30) as client:
        out = client.infer("identity", x)["output"]
        assert out.dtype == x.dtype and out.tobytes() == x.tobytes()
        big = np.arange(3 << 20, dtype=np.uint8)  # streamed both ways
        assert client.infer("identity", big)["output"].tobytes() == big.tobytes()
    generators = {"raw", "mutated", "hostile", "streams"}
    if generators <= set(fuzzer.sent):
        assert sum(fuzzer.malformed[g] for g in generators) >= 10_000, dict(fuzzer.malformed)
    assert fuzzer.slowest < CALL_TIMEOUT
    assert not fuzzer.failures
    # Against the RSS after the warm-up, which ran the large uploads once already.
    grown = fuzzer.server.rss() - fuzzer.baseline
    assert grown < RSS_SLACK, f"server RSS grew by {grown >> 20} MiB over the storm"
