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

import contextlib
import fcntl
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fuzz.found import FOUND
from support.fuzz.harness import Fuzzer, Server
from support.fuzz.hostile import hostile
from support.fuzz.mutations import mutate
from support.fuzz.raw import raw_bytes
from support.fuzz.service import (
    CALL_TIMEOUT,
    FUZZ,
    METHODS,
    REFUSALS,
    RSS_SLACK,
    STREAMS,
    TOYS,
    TWIN,
    UNARY,
    stream_malformed,
    unary_malformed,
)
from support.fuzz.streams import HUGE_SHAPES, large_uploads_cut_short, malformed_stream
from support.fuzz.valid import SEEDS, VALID_BYTES, VALID_STREAMS, stream_header
from support.fuzz.wire import part, to_stream
from support.servers import TESTS, spawn_server

from tensorwire import Client
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.dataport import REQUEST, REQUEST_MAGIC, SHARED_MAGIC, TICKET_BYTES
from tensorwire.wire.protocol import CHANNEL_OPTIONS, SESSION_KEY


@pytest.fixture(scope="module")
def fuzzer() -> Iterator[Fuzzer]:
    """A server process (CPU, built-in and toy models) and a raw channel to it, warmed
    up (every valid request three times, then large uploads cut short) so that its RSS
    after that is the baseline."""
    flags = [f"--model={name}=support.toy_models:{name}" for name in TOYS]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        # Two batches in flight at a time: every request must be parsed, none shed.
        env.setenv("TENSORWIRE_MAX_CONCURRENT_REQUESTS", "1024")
        env.setenv("TENSORWIRE_MAX_CONCURRENT_STREAMS", "1024")
        # What fuzzing found with 40 000 inputs stays fixed where an operator allows them.
        env.setenv("TENSORWIRE_MAX_REQUEST_TENSORS", str(1 << 16))
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
                    header: bytes = stream_header(name, shape), release: threading.Event = release
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


def test_random_bytes_to_the_data_port_are_dropped(fuzzer: Fuzzer) -> None:
    """The data port's port takes anything: random bytes, other protocols, its own
    magic with tickets never issued. Each connection is closed without a byte
    allocated for it; the last test checks the server lived and kept no memory."""
    (port,) = {
        int(m.group(1))
        for line in fuzzer.server.log
        if (m := re.search(r"data port on \S+:(\d+)", line))
    }
    magic = REQUEST_MAGIC
    first_bytes = st.one_of(
        st.binary(min_size=REQUEST.size, max_size=4096),
        st.binary(min_size=TICKET_BYTES, max_size=TICKET_BYTES).map(lambda t: magic + t),
        st.sampled_from([b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]),
    )

    @settings(FUZZ, max_examples=200)
    @given(first_bytes)
    def send(raw: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=CALL_TIMEOUT) as sock:
            with contextlib.suppress(ConnectionError):  # dropped while we still sent
                sock.sendall(raw)
            # Fewer bytes than a preamble: say no more come (unless the server has
            # already dropped the connection, which is the answer wanted anyway).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            # A reset: closed with our bytes unread, which is dropped all the same.
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(64) == b"", "the data port answered bytes it must drop"

    send()


def _descriptors(kind: str) -> list[int]:
    """Descriptors a hostile same-host client might pass along."""
    if kind == "none":
        return []
    if kind == "pipe":
        return list(os.pipe())
    if kind == "devnull":
        return [os.open(os.devnull, os.O_RDONLY)]
    fd = os.memfd_create("fuzz", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    if kind == "sealed":
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return [fd]


@pytest.mark.skipif(not hasattr(socket, "SOCK_SEQPACKET"), reason="same-host socket: Linux")
def test_random_messages_to_the_same_host_socket_are_dropped(fuzzer: Fuzzer) -> None:
    """The same-host socket takes anything from a process in the server's namespace:
    random messages, its own magic with tickets never issued, any descriptors. Each
    connection is closed with nothing mapped and every descriptor closed."""
    (name,) = {
        m.group(1) for line in fuzzer.server.log if (m := re.search(r"same host on @(\S+)", line))
    }
    tickets = st.binary(min_size=TICKET_BYTES, max_size=TICKET_BYTES)
    messages = st.one_of(
        st.binary(min_size=1, max_size=4096),
        tickets.map(lambda t: SHARED_MAGIC + t),
        tickets.map(lambda t: REQUEST_MAGIC + t),
    )
    kinds = st.sampled_from(["none", "pipe", "devnull", "memfd", "sealed"])
    descriptors = f"/proc/{fuzzer.server.proc.pid}/fd"
    before = len(os.listdir(descriptors))

    @settings(FUZZ, max_examples=200)
    @given(messages, kinds)
    def send(raw: bytes, kind: str) -> None:
        fds = _descriptors(kind)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(CALL_TIMEOUT)
                sock.connect("\0" + name)
                with contextlib.suppress(ConnectionError):  # dropped while we still sent
                    socket.send_fds(sock, [raw], fds)
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(64) == b"", "the same-host socket answered a stranger"
        finally:
            for fd in fds:
                os.close(fd)

    send()
    # Every descriptor that arrived was closed (connection threads finish at once).
    deadline = time.monotonic() + 10
    while len(os.listdir(descriptors)) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir(descriptors)) <= before, "the server kept descriptors it was sent"


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
