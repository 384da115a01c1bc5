"""The REST API as curl speaks it (plain HTTP/1.1 requests, one connection each), its
responses validated against KServe's v2 REST OpenAPI document (data/rest_predict_v2.yaml,
carried from kserve/kserve) with a real OpenAPI 3.0 validator; the v2 error object with
the HTTP status of its gRPC code; request ids and timeouts in headers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import TOY_MODELS
from openapi_schema_validator import OAS30Validator
from support.rest import infer_body, rest_server, send

from tensorwire.errors import HTTP_STATUS
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(60)

SPEC = yaml.safe_load((Path(__file__).parent / "data" / "rest_predict_v2.yaml").read_text())


def conforms(instance: Any, schema: str) -> None:
    """Raise unless ``instance`` is a valid ``schema`` of the document's components."""
    OAS30Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": SPEC["components"]}
    ).validate(instance)


@pytest.fixture(scope="module")
def server() -> Iterator[TensorwireServer]:
    engine = build_engine(Settings(device="cpu", models=TOY_MODELS))
    with rest_server(engine) as served:
        yield served


@pytest.fixture(scope="module")
def port(server: TensorwireServer) -> int:
    assert server.http_port is not None
    return server.http_port


def test_the_document_covers_the_paths_we_serve(port: int) -> None:
    for path in SPEC["paths"]:
        concrete = path.replace("${MODEL_NAME}", "mlp").replace("${MODEL_VERSION}", "1")
        verb = "post" if "post" in SPEC["paths"][path] else "get"
        if verb == "post":
            body = infer_body(
                [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]
            )
            reply = send(port, "POST", concrete, body, {"Content-Type": "application/json"})
            conforms(reply.json(), "inference_response")
        else:
            reply = send(port, "GET", concrete)
        assert reply.status == 200, (path, reply.body)


def test_server_and_model_metadata(port: int) -> None:
    reply = send(port, "GET", "/v2")
    conforms(reply.json(), "metadata_server_response")
    assert reply.headers["content-type"].startswith("application/json")
    for path in ("/v2/models/mlp", "/v2/models/mlp/versions/1", "/v2/models/identity"):
        reply = send(port, "GET", path)
        conforms(reply.json(), "metadata_model_response")
    mlp = send(port, "GET", "/v2/models/mlp").json()
    assert mlp["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]


def test_infer_json_as_the_document_shows_it(port: int) -> None:
    request = {
        "id": "42",
        "inputs": [
            {"name": "x", "shape": [4], "datatype": "FP64", "data": [[1, 2], [3, 4]]},
            {"name": "y", "shape": [4], "datatype": "FP64", "data": [1, 1.5, 2, 2.5]},
        ],
        "outputs": [{"name": "sum"}],
    }
    conforms(request, "inference_request")
    reply = send(port, "POST", "/v2/models/two_heads/infer", json.dumps(request).encode())
    assert reply.status == 200
    document = reply.json()
    conforms(document, "inference_response")
    assert document["id"] == "42" and document["model_name"] == "two_heads"
    [out] = document["outputs"]
    assert out == {"name": "sum", "datatype": "FP64", "shape": [4], "data": [2, 3.5, 5, 6.5]}


def test_binary_data_as_curl_sends_it(port: int) -> None:
    x = np.arange(12, dtype=np.int16).reshape(3, 4)
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [3, 4], "datatype": "INT16",
                 "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()  # fmt: skip
    reply = send(
        port,
        "POST",
        "/v2/models/identity/infer",
        header + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)),
         "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert reply.status == 200, reply.body
    length = int(reply.headers["inference-header-content-length"])
    document = json.loads(reply.body[:length])
    [out] = document["outputs"]
    assert out["parameters"] == {"binary_data_size": x.nbytes}
    got = np.frombuffer(reply.body[length:], np.int16).reshape(out["shape"])
    assert np.array_equal(got, x)


def test_bf16_and_fp16_travel_as_binary_data_only(port: int) -> None:
    body = infer_body([{"name": "input", "shape": [2], "datatype": "FP16", "data": [1, 2]}])
    reply = send(port, "POST", "/v2/models/identity/infer", body)
    assert reply.status == 400 and "binary data" in reply.json()["error"]
    conforms(reply.json(), "inference_error_response")


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/v2/models/no-such-model", None, 404),
        ("GET", "/v2/models/mlp/versions/7", None, 404),
        ("GET", "/v2/models/mlp/versions/x", None, 400),
        ("POST", "/v2/models/no-such-model/infer", b'{"inputs": []}', 404),
        ("POST", "/v2/models/mlp/infer", b'{"inputs": [}', 400),
        ("GET", "/v2/no/such/endpoint", None, 404),
        ("GET", "/v2/models/mlp/infer", None, 405),
    ],
)
def test_errors_are_the_v2_error_object(
    port: int, method: str, path: str, body: bytes | None, status: int
) -> None:
    reply = send(port, method, path, body)
    assert reply.status == status, reply.body
    conforms(reply.json(), "inference_error_response")
    assert reply.json()["error"]


def test_status_table_covers_every_code() -> None:
    import grpc

    assert {c.name for c in grpc.StatusCode} <= set(HTTP_STATUS)
    assert HTTP_STATUS["NOT_FOUND"] == 404 and HTTP_STATUS["UNAUTHENTICATED"] == 401


def test_request_ids_and_timeouts(port: int) -> None:
    reply = send(port, "GET", "/v2", headers={"X-Request-Id": "curl-123"})
    assert reply.headers["x-request-id"] == "curl-123"
    assert send(port, "GET", "/v2/nope").status == 404
    generated = send(port, "GET", "/v2").headers["x-request-id"]
    assert len(generated) == 32
    late = send(port, "GET", "/v2", headers={"X-Request-Timeout": "0"})
    assert late.status == 504 and "timeout" in late.json()["error"]
    bad = send(port, "GET", "/v2", headers={"X-Request-Timeout": "soon"})
    assert bad.status == 400
    # Triton's timeout parameter (microseconds) bounds a call too: the sleeper's
    # second is past the request's millisecond, and it is answered as such.
    body = infer_body(
        [{"name": "x", "shape": [], "datatype": "FP64", "data": [0.3]}],
        parameters={"timeout": 1},
    )
    slow = send(port, "POST", "/v2/models/sleeper/infer", body)
    assert slow.status == 504, slow.body


def test_rest_calls_are_counted_and_logged_as_grpc_calls_are(
    server: TensorwireServer, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    body = infer_body([{"name": "input", "shape": [1], "datatype": "INT32", "data": [7]}])
    assert send(port, "POST", "/v2/models/identity/infer", body).status == 200
    with caplog.at_level("INFO", logger="tensorwire_server.access"):
        assert send(port, "GET", "/v2/models/no-such-model").status == 404
    registry = server.metrics.registry
    ok = registry.get_sample_value(
        "tensorwire_requests_total",
        {"method": "REST/ModelInfer", "target": "identity", "code": "OK"},
    )
    assert ok is not None and ok >= 1
    missing = registry.get_sample_value(
        "tensorwire_requests_total",
        # An unknown model's name is no label (any caller could grow the series).
        {"method": "REST/ModelMetadata", "target": "unknown", "code": "NOT_FOUND"},
    )
    assert missing is not None and missing >= 1
    assert any("REST/ModelMetadata" in r.getMessage() for r in caplog.records)


def test_a_stop_drains_rest_calls_in_flight() -> None:
    import threading

    engine = build_engine(Settings(device="cpu", models=TOY_MODELS))
    served = TensorwireServer(Settings(port=0, http_port=0, device="cpu"), engine)
    served.start()
    port = served.http_port
    assert port is not None
    body = infer_body([{"name": "x", "shape": [], "datatype": "FP64", "data": [1.0]}])
    replies: list[Any] = []
    caller = threading.Thread(
        target=lambda: replies.append(send(port, "POST", "/v2/models/sleeper/infer", body))
    )
    caller.start()
    deadline = time.monotonic() + 20
    while served.gate.in_flight.wait_idle(0) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the call runs
    served.stop(30)
    caller.join(30)
    assert replies and replies[0].status == 200, replies
    assert replies[0].json()["outputs"][0]["data"] == [1.0]


def test_cuda_shared_memory_on_a_server_without_cuda(port: int) -> None:
    # The module's server has shared memory off: FAILED_PRECONDITION, as over gRPC.
    body = json.dumps({"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64}).encode()
    reply = send(port, "POST", "/v2/cudasharedmemory/region/r/register", body)
    assert reply.status == 400 and reply.json()["error"]
    engine = build_engine(Settings(device="cpu"))
    with rest_server(engine, allow_shared_memory=True) as served:
        assert served.http_port is not None
        reply = send(served.http_port, "POST", "/v2/cudasharedmemory/region/r/register", body)
        assert reply.status == 501, reply.body  # UNIMPLEMENTED: no CUDA device here
        bad = send(served.http_port, "POST", "/v2/cudasharedmemory/region/r/register", b"{}")
        assert bad.status == 400 and "raw_handle" in bad.json()["error"]
        status = send(served.http_port, "GET", "/v2/cudasharedmemory/status")
        assert status.status in (200, 501)
