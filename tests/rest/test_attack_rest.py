"""Hostile input on the REST port: sizes checked before memory is taken (Content-Length
past the limits, header lengths past the body, huge binary_data_size, negative or
overflowing shapes), malformed JSON and HTTP, compressed and chunked bodies, slow and
truncated bodies, too many connections: each a clear 4xx (or 503 for capacity), and
the server goes on answering."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.rest import infer_body, rest_server, send

from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(120)

LIMIT = 1 << 20
JSON_LIMIT = 64 << 10
INFER = "/v2/models/identity/infer"


@pytest.fixture(scope="module")
def server() -> Iterator[TensorwireServer]:
    limits = {
        "max_request_bytes": LIMIT,
        "http_json_bytes": JSON_LIMIT,
        "http_read_timeout": 1.0,
    }
    engine = build_engine(Settings(device="cpu"))
    with rest_server(engine, **limits) as served:
        yield served


@pytest.fixture(scope="module")
def port(server: TensorwireServer) -> int:
    assert server.http_port is not None
    return server.http_port


@pytest.fixture(autouse=True)
def still_serving(port: int) -> Iterator[None]:
    """After each attack, a good request is answered as ever."""
    yield
    body = infer_body([{"name": "input", "shape": [2], "datatype": "INT32", "data": [1, 2]}])
    reply = send(port, "POST", INFER, body)
    assert reply.status == 200 and reply.json()["outputs"][0]["data"] == [1, 2]


def raw(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and read what comes back until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return got


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def binary_request(header: dict[str, object], payload: bytes, length: str | None = None) -> bytes:
    text = json.dumps(header).encode()
    return text + payload, str(len(text)) if length is None else length  # type: ignore[return-value]


# ---------------------------------------------------------------- sizes before memory


def test_content_length_past_the_limit_is_refused_before_the_body(port: int) -> None:
    declared = 1 << 40  # a terabyte nobody sends: refused from the header alone
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n"
        "Content-Type: application/json\r\n\r\n"
    ).encode()
    response = raw(port, head)
    assert status_of(response) == 413 and b"max_request_bytes" in response


def test_json_past_its_own_limit(port: int) -> None:
    body = infer_body(
        [{"name": "input", "shape": [40000], "datatype": "INT8", "data": [1] * 40000}]
    )
    assert len(body) > JSON_LIMIT
    reply = send(port, "POST", INFER, body)
    assert reply.status == 413 and "http_json_bytes" in reply.json()["error"]
    reply = send(
        port, "POST", INFER, b"{}", {"Inference-Header-Content-Length": str(JSON_LIMIT + 1)}
    )
    assert reply.status in (400, 413)


@pytest.mark.parametrize("json_length", [None, str(JSON_LIMIT + 1)])
def test_json_past_its_limit_is_refused_from_the_headers(
    port: int, json_length: str | None
) -> None:
    # No body is sent: waiting for it would end in 408 (http_read_timeout), not 413.
    extra = "" if json_length is None else f"Inference-Header-Content-Length: {json_length}\r\n"
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {JSON_LIMIT + 100}\r\n"
        f"{extra}Content-Type: application/json\r\n\r\n"
    ).encode()
    response = raw(port, head)
    assert status_of(response) == 413 and b"http_json_bytes" in response


@pytest.mark.parametrize(
    ("length", "words"),
    [("99999", "past the end"), ("-1", "not a length"), ("1e3", "not a length"),
     ("9" * 40, "not a length")],
)  # fmt: skip
def test_header_lengths_past_the_body(port: int, length: str, words: str) -> None:
    body = b'{"inputs": []}'
    reply = send(port, "POST", INFER, body, {"Inference-Header-Content-Length": length})
    assert reply.status == 400 and words in reply.json()["error"]


@pytest.mark.parametrize(
    ("size", "words"),
    [(2**62, "past the end"), (-4, "whole number"), ("8", "whole number"),
     (True, "whole number"), (4, "binary data after its JSON")],
)  # fmt: skip
def test_declared_binary_sizes(port: int, size: object, words: str) -> None:
    header = {
        "inputs": [{"name": "input", "shape": [2], "datatype": "INT32",
                    "parameters": {"binary_data_size": size}}]
    }  # fmt: skip
    body, length = binary_request(header, b"\0" * 8)
    reply = send(port, "POST", INFER, body, {"Inference-Header-Content-Length": length})
    assert reply.status == 400 and words in reply.json()["error"], reply.body


@pytest.mark.parametrize(
    "shape",
    [[-1], [2**63], [2**64 + 1], [2**31, 2**31, 2**31], [1.5], ["2"], None, [True]],
)
def test_negative_overflowing_and_absurd_shapes(port: int, shape: object) -> None:
    header = {
        "inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": 8}}]
    }  # fmt: skip
    body, length = binary_request(header, b"\0" * 8)
    reply = send(port, "POST", INFER, body, {"Inference-Header-Content-Length": length})
    assert reply.status == 400, reply.body
    assert reply.json()["error"]


# ---------------------------------------------------------------- malformed JSON and data


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "malformed"),
        (b"not json", "malformed"),
        (b"[1, 2]", "object"),
        (b'{"inputs": {}}', "list"),
        (b'{"inputs": [1]}', "object"),
        (b'{"inputs": [{"name": 3}]}', "name"),
        (b'{"inputs": [{"name": "input", "shape": [2], "datatype": "INT32"}]}', "no data"),
        (b'{"inputs": [{"name": "input", "shape": [2], "datatype": "INT32", "data": ["a", "b"]}]}',
         "strings"),
        (b'{"inputs": [{"name": "input", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}]}',
         "fractions"),
        (b'{"inputs": [{"name": "input", "shape": [2], "datatype": "INT8", "data": [1, 300]}]}',
         "outside the range"),
        (b'{"inputs": [{"name": "input", "shape": [3], "datatype": "INT32", "data": [1, 2]}]}',
         "needs 3"),
        (b'{"inputs": [{"name": "input", "shape": [2], "datatype": "INT32", '
         b'"data": [[1], [2, 3]]}]}', "not a list of numbers"),
        (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}',
         "BYTES"),
        (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "XX", "data": [1]}]}',
         "unknown datatype"),
        (b'{"inputs": [], "parameters": {"binary_data_output": 1}}', "true or false"),
        (b'{"inputs": [], "parameters": {"timeout": -5}}', "microseconds"),
        (b'{"inputs": [], "parameters": {"sequence_id": 7}}', "sequences"),
        (b'{"inputs": [], "parameters": {"x": {"y": 1}}}', "boolean, a number or a string"),
        (b'{"inputs": [], "id": 5}', "string"),
        (b'{"inputs": [], "outputs": [{"name": "o", "parameters": {"binary_data": "yes"}}]}',
         "true or false"),
        (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "INT32", "data": '
         b'[123456789012345678901234567890]}]}', "INT32"),
    ],
)  # fmt: skip
def test_malformed_requests(port: int, body: bytes, words: str) -> None:
    reply = send(port, "POST", INFER, body, {"Content-Type": "application/json"})
    assert reply.status == 400, reply.body
    assert words in reply.json()["error"], reply.json()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                st.sampled_from(["inputs", "outputs", "name", "shape", "datatype", "data",
                                 "parameters", "binary_data_size", "id"]), inner, max_size=5),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    ),
    length=st.one_of(st.none(), st.integers(-3, 400).map(str), st.text(max_size=5)),
)  # fmt: skip
def test_fuzzed_bodies_get_a_4xx(port: int, body: bytes, length: str | None) -> None:
    headers = {}
    if length is not None:
        if not length.isascii() or not length.isprintable() or "\n" in length:
            length = "x"
        headers["Inference-Header-Content-Length"] = length
    reply = send(port, "POST", INFER, body, headers)
    assert reply.status < 500, reply.body
    assert reply.status == 200 or reply.json()["error"]


# ---------------------------------------------------------------- HTTP itself


def test_compressed_bodies_are_not_inflated(port: int) -> None:
    import gzip

    bomb = gzip.compress(b"{" + b" " * (8 << 20) + b"}")
    reply = send(port, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
    assert reply.status == 415 and "uncompressed" in reply.json()["error"]


def test_chunked_bodies_past_the_limit(port: int) -> None:
    chunk = b"x" * 65536
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40)) + b"0\r\n\r\n"
    response = raw(port, head + chunks)
    assert status_of(response) == 413


def test_malformed_http_and_long_lines(port: int) -> None:
    assert status_of(raw(port, b"GARBAGE\r\n\r\n")) == 400
    long_path = b"GET /v2/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert status_of(raw(port, long_path)) in (400, 414)
    header = b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert status_of(raw(port, header)) in (400, 431)


def test_truncated_body_then_the_connection_closes(port: int) -> None:
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b'{"inputs": [')
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    assert got == b"" or status_of(got) == 400


def test_a_stalled_body_is_refused_after_the_read_timeout(port: int) -> None:
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode()
    response = raw(port, head + b'{"inputs": [', wait=30)
    assert status_of(response) == 408 and b"http_read_timeout" in response


def test_a_trickled_body_is_cut_at_the_calls_deadline(port: int) -> None:
    # A byte every 0.3 s never pauses past http_read_timeout (1 s); the call's own
    # deadline (1.5 s) bounds the whole read.
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
        "X-Request-Timeout: 1.5\r\n\r\n"
    ).encode()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=0.3) as sock:
        sock.sendall(head)
        for _ in range(100):  # 30 s at most
            try:
                sock.sendall(b" ")
                got += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if got:
                break
    assert status_of(got) == 408 and b"deadline" in got


def test_a_get_with_a_body_is_answered_without_reading_it(port: int) -> None:
    # A probe's sender declares a body it never sends: the probe is answered at once
    # (no body read holds its place in the public budget).
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        got = sock.recv(65536)
    assert status_of(got) == 200


def test_too_many_connections_are_told_so() -> None:
    engine = build_engine(Settings(device="cpu", builtins=True))
    with rest_server(engine, http_connections=2) as served:
        port = served.http_port
        assert port is not None
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.2)  # both accepted before the third arrives
            response = raw(port, b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(response) == 503 and b"http_connections" in response
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # their places free once the server sees them go
            if send(port, "GET", "/v2/health/live").status == 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the server held closed connections' places")


def test_binary_inputs_are_views_of_the_body(port: int) -> None:
    # A payload of the limit's size is taken (it is no more than max_request_bytes).
    x = np.ones(LIMIT // 4, np.float32)
    header = {"inputs": [{"name": "input", "shape": [x.size], "datatype": "FP32",
                          "parameters": {"binary_data_size": x.nbytes}}],
              "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}  # fmt: skip
    body, length = binary_request(header, x.tobytes())
    reply = send(port, "POST", INFER, body, {"Inference-Header-Content-Length": length})
    assert reply.status == 200
    n = int(reply.headers["inference-header-content-length"])
    assert np.array_equal(np.frombuffer(reply.body[n:], np.float32), x)


def test_a_client_gone_mid_answer_frees_its_call(server: TensorwireServer, port: int) -> None:
    x = np.ones(LIMIT // 4, np.float32)
    header = {"inputs": [{"name": "input", "shape": [x.size], "datatype": "FP32",
                          "parameters": {"binary_data_size": x.nbytes}}],
              "parameters": {"binary_data_output": True}}  # fmt: skip
    body, length = binary_request(header, x.tobytes())
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: {length}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + body)
            sock.recv(64)  # the answer has begun; leave without reading it
    assert server.gate.in_flight.wait_idle(30)  # no call left counted as running
