"""The KServe v2 / Open Inference Protocol on tensorwire's port, spoken by NVIDIA's own
tritonclient over real gRPC: health, metadata, every datatype, raw and typed contents,
requested outputs, errors, streams, statistics, the repository, and the same answers
as tensorwire.v1."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import start
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.kserve import ARRAYS, X, infer_input, same
from support.repo_fixtures import expected_scaler, make_broken_model, make_repository
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

import tensorwire as tw
from tensorwire_server.kserve.v2 import grpc_service_pb2 as ours
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(60)

serving = contextmanager(start)

TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[tpb_grpc.GRPCInferenceServiceStub]:
    """tritonclient's own generated stub, for requests its helpers do not build."""
    with grpc.insecure_channel(address) as channel:
        yield tpb_grpc.GRPCInferenceServiceStub(channel)


# ---------------------------------------------------------------- health and metadata


def test_live_ready_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7")
    assert not client.is_model_ready("no-such-model")
    metadata = client.get_server_metadata()
    assert metadata.name == "tensorwire"
    assert {"model_repository", "statistics"} <= set(metadata.extensions)


def test_model_metadata_of_the_builtins(client: triton.InferenceServerClient) -> None:
    for name, datatype in (("mlp", "FP32"), ("mlp64", "FP64")):
        metadata = client.get_model_metadata(name)
        assert (metadata.name, list(metadata.versions)) == (name, ["1"])
        assert metadata.platform == "pytorch_builtin"
        [given] = metadata.inputs
        [made] = metadata.outputs
        assert (given.name, given.datatype, list(given.shape)) == ("input", datatype, [-1, 16])
        assert (made.name, made.datatype, list(made.shape)) == ("output", datatype, [-1, 4])
    # identity takes any datatype and rank: the protocol has no wildcard, so neither is set.
    identity = client.get_model_metadata("identity", "1")
    assert [(t.name, t.datatype, list(t.shape)) for t in identity.inputs] == [("input", "", [])]
    # echo takes inputs of any names: it lists none.
    assert not client.get_model_metadata("echo").inputs
    config = client.get_model_config("mlp").config
    assert (config.name, config.max_batch_size, config.backend) == ("mlp", 1024, "tensorwire")
    assert config.input[0].data_type == triton_config.TYPE_FP32
    assert list(config.input[0].dims) == [16]  # without the batch dimension
    assert config.HasField("dynamic_batching")


def test_unknown_models_and_malformed_versions(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("no-such-model")
    assert status(unknown) == "StatusCode.NOT_FOUND"
    assert "no-such-model" in unknown.value.message()
    with pytest.raises(InferenceServerException) as absent:
        client.get_model_config("mlp", "2")
    assert status(absent) == "StatusCode.NOT_FOUND"
    for bad in ("latest", "-1", "0", "1.0"):
        with pytest.raises(InferenceServerException) as malformed:
            client.get_model_metadata("mlp", bad)
        assert status(malformed) == "StatusCode.INVALID_ARGUMENT"
        assert "not a version number" in malformed.value.message()


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_every_datatype_travels_raw_and_exact(
    client: triton.InferenceServerClient, datatype: str
) -> None:
    arr = ARRAYS[datatype]
    result = client.infer("identity", [infer_input("input", arr, datatype)])
    [output] = result.get_response().outputs
    assert (output.name, output.datatype, list(output.shape)) == (
        "output",
        datatype,
        list(arr.shape),
    )
    assert same(result.as_numpy("output"), arr)


def test_the_builtin_models_answer_as_tensorwire_v1_does(
    client: triton.InferenceServerClient, address: str
) -> None:
    with tw.Client(address) as v1:
        for name, x in (("mlp", X), ("mlp64", X.astype(np.float64))):
            result = client.infer(name, [infer_input("input", x)])
            assert result.get_response().model_version == "1"
            assert same(result.as_numpy("output"), v1.infer(name, x)["output"])
        arrays = {"a": ARRAYS["BF16"], "b": ARRAYS["INT64"], "c": ARRAYS["BOOL"]}
        result = client.infer("echo", [infer_input(n, a) for n, a in arrays.items()])
        answered = v1.infer("echo", arrays)
        for name, arr in arrays.items():
            assert same(result.as_numpy(name), arr)
            assert same(answered[name], arr)
        x = np.linspace(-2, 2, 5)
        y = np.linspace(1, 3, 5)
        result = client.infer("two_heads", [infer_input("x", x), infer_input("y", y)])
        for name, arr in v1.infer("two_heads", {"x": x, "y": y}).items():
            assert same(result.as_numpy(name), arr)


def test_requested_outputs_are_returned_in_their_order(
    client: triton.InferenceServerClient,
) -> None:
    x = np.array([0.5, 1.0])
    y = np.array([2.0, 4.0])
    inputs = [infer_input("x", x), infer_input("y", y)]
    result = client.infer(
        "two_heads", inputs, outputs=[triton.InferRequestedOutput("prod")], request_id="r-1"
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["prod"]
    assert response.id == "r-1"
    assert same(result.as_numpy("prod"), np.sin(x) * y)
    assert result.as_numpy("sum") is None
    both = client.infer(
        "two_heads",
        inputs,
        outputs=[triton.InferRequestedOutput("sum"), triton.InferRequestedOutput("prod")],
    )
    assert [o.name for o in both.get_response().outputs] == ["sum", "prod"]
    assert same(both.as_numpy("sum"), x + y)
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("two_heads", inputs, outputs=[triton.InferRequestedOutput("nope")])
    assert status(unknown) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as classified:
        client.infer("two_heads", inputs, outputs=[triton.InferRequestedOutput("sum", 3)])
    assert status(classified) == "StatusCode.INVALID_ARGUMENT"
    assert "classification is not supported" in classified.value.message()


def test_a_large_tensor_travels(client: triton.InferenceServerClient) -> None:
    big = np.random.default_rng(1).standard_normal((1024, 8192)).astype(np.float32)  # 32 MiB
    assert same(client.infer("identity", [infer_input("input", big)]).as_numpy("output"), big)


@pytest.mark.parametrize("datatype", list(TYPED_FIELDS))
def test_typed_contents_in_and_out(stub: tpb_grpc.GRPCInferenceServiceStub, datatype: str) -> None:
    arr = ARRAYS[datatype]
    request = tpb.ModelInferRequest(model_name="identity")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=arr.shape)
    getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(arr.ravel().tolist())
    raw = stub.ModelInfer(request, timeout=10)
    assert raw.raw_output_contents[0] == arr.tobytes()  # raw unless asked otherwise
    request.outputs.add(name="output").parameters["binary_data"].bool_param = False
    typed = stub.ModelInfer(request, timeout=10)
    assert not typed.raw_output_contents
    [output] = typed.outputs
    values = getattr(output.contents, TYPED_FIELDS[datatype])
    assert same(np.array(values, dtype=arr.dtype).reshape(arr.shape), arr)
    # The request-wide parameter asks the same for every output.
    del request.outputs[:]
    request.parameters["binary_data_output"].bool_param = False
    assert stub.ModelInfer(request, timeout=10).outputs[0] == output


def call_code(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failed:
        call(request, timeout=10)
    return failed.value.code(), failed.value.details()  # type: ignore[attr-defined]


def test_malformed_inputs_are_invalid_argument_and_the_server_goes_on(
    client: triton.InferenceServerClient, stub: tpb_grpc.GRPCInferenceServiceStub
) -> None:
    cases: list[tuple[str, tpb.ModelInferRequest, str]] = []

    def request(datatype: str, shape: list[int], **fields: Any) -> tpb.ModelInferRequest:
        message = tpb.ModelInferRequest(model_name="identity", **fields)
        message.inputs.add(name="input", datatype=datatype, shape=shape)
        return message

    cases.append(("short raw", request("FP32", [2, 3], raw_input_contents=[b"\0" * 20]), "24"))
    cases.append(("BYTES", request("BYTES", [1], raw_input_contents=[b"\1\0\0\0a"]), "BYTES"))
    cases.append(("unknown", request("FP8", [1], raw_input_contents=[b"\0"]), "FP8"))
    cases.append(("negative", request("FP32", [-1], raw_input_contents=[b""]), "negative"))
    cases.append(("no data", request("FP32", [2]), "no data"))
    two = request("INT8", [1], raw_input_contents=[b"\0", b"\0"])
    cases.append(("raw count", two, "2 entries for 1 inputs"))
    typed_fp16 = request("FP16", [1])
    typed_fp16.inputs[0].contents.fp32_contents.append(1.0)
    cases.append(("typed FP16", typed_fp16, "raw_input_contents"))
    out_of_range = request("INT8", [1])
    out_of_range.inputs[0].contents.int_contents.append(300)
    cases.append(("INT8 range", out_of_range, "outside the range of INT8"))
    wrong_field = request("INT32", [1])
    wrong_field.inputs[0].contents.fp32_contents.append(1.0)
    cases.append(("wrong field", wrong_field, "fp32_contents"))
    typed_out = request("FP16", [1], raw_input_contents=[b"\0\0"])
    typed_out.parameters["binary_data_output"].bool_param = False
    cases.append(("typed FP16 out", typed_out, "binary_data true"))
    mixed = tpb.ModelInferRequest(model_name="echo", raw_input_contents=[b"\0", b"\0"])
    mixed.inputs.add(name="a", datatype="INT8", shape=[1])
    mixed.inputs.add(name="b", datatype="INT8", shape=[1])
    mixed.outputs.add(name="a").parameters["binary_data"].bool_param = False
    mixed.outputs.add(name="b")
    cases.append(("raw and typed outputs", mixed, "one way or the other"))
    sequence = request("INT8", [1], raw_input_contents=[b"\0"])
    sequence.parameters["sequence_id"].int64_param = 7
    cases.append(("sequence", sequence, "sequences are not supported"))
    for what, message, expected in cases:
        code, details = call_code(stub.ModelInfer, message)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, details)
        assert expected in details, (what, details)
    # The model's own signature: a wrong shape and a wrong datatype.
    with pytest.raises(InferenceServerException) as shape:
        client.infer("mlp", [infer_input("input", np.ones((2, 15), np.float32))])
    assert status(shape) == "StatusCode.INVALID_ARGUMENT"
    assert "shape [2, 15]" in shape.value.message()
    with pytest.raises(InferenceServerException) as dtype:
        client.infer("mlp", [infer_input("input", np.ones((2, 16), np.float64))])
    assert status(dtype) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no-such-model", [infer_input("input", X)])
    assert status(unknown) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as version:
        client.infer("mlp", [infer_input("input", X)], model_version="3")
    assert status(version) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as raised:
        client.infer("raises", [infer_input("x", X)])
    assert status(raised) == "StatusCode.INVALID_ARGUMENT"
    assert client.infer("mlp", [infer_input("input", X)]).as_numpy("output").shape == (8, 4)


def test_malformed_messages_are_answered_and_a_stream_goes_on(address: str) -> None:
    garbage = b"\x3a\xff\xff\xff\xff\x0f"  # field 7 claiming more bytes than follow
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        code, details = call_code(infer, garbage)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        good = tpb.ModelInferRequest(model_name="identity", id="after", raw_input_contents=[b"\1"])
        good.inputs.add(name="input", datatype="BOOL", shape=[1])
        first, second = (
            tpb.ModelStreamInferResponse.FromString(raw)
            for raw in stream(iter([garbage, good.SerializeToString()]), timeout=10)
        )
    assert "malformed" in first.error_message
    assert not second.error_message and second.infer_response.id == "after"
    assert second.infer_response.raw_output_contents == [b"\1"]


def test_a_stream_answers_every_request_in_order(
    client: triton.InferenceServerClient, address: str
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        sent = [
            ("mlp", [infer_input("input", X)]),
            ("no-such-model", [infer_input("input", X)]),
            ("mlp", [infer_input("input", np.ones((2, 3), np.float32))]),
            ("identity", [infer_input("input", ARRAYS["BF16"])]),
        ]
        for i, (model, inputs) in enumerate(sent):
            client.async_stream_infer(model, inputs, request_id=str(i))
        got = [answers.get(timeout=20) for _ in sent]
    finally:
        client.stop_stream()
    (first, ok), (_, unknown), (_, shape), (last, fine) = got
    assert ok is None and fine is None
    assert first.get_response().id == "0"
    with tw.Client(address) as v1:
        assert same(first.as_numpy("output"), v1.infer("mlp", X)["output"])
    assert "not found" in unknown.message()
    assert "shape [2, 3]" in shape.message()
    assert same(last.as_numpy("output"), ARRAYS["BF16"])


# ---------------------------------------------------------------- statistics, repository


def test_statistics_count_v2_requests(client: triton.InferenceServerClient) -> None:
    def mlp64_requests() -> int:
        [stats] = client.get_inference_statistics("mlp64").model_stats
        return int(stats.inference_stats.success.count)

    before = mlp64_requests()
    client.infer("mlp64", [infer_input("input", X.astype(np.float64))])
    assert mlp64_requests() == before + 1
    every = client.get_inference_statistics().model_stats
    assert {"mlp", "mlp64", "identity"} <= {s.name for s in every}
    with pytest.raises(InferenceServerException) as unknown:
        client.get_inference_statistics("no-such-model")
    assert status(unknown) == "StatusCode.NOT_FOUND"


def test_load_and_unload_need_explicit_model_control(
    client: triton.InferenceServerClient,
) -> None:
    for action in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as refused:
            action("mlp")
        assert status(refused) == "StatusCode.FAILED_PRECONDITION"


def test_a_repository_loads_and_unloads_through_v2(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo")
    make_broken_model(root)
    settings = Settings(port=0, device="cpu", model_repo=str(root), model_control="explicit")
    with serving(settings) as address, triton.InferenceServerClient(address) as client:
        assert list(client.get_model_metadata("scaler").versions) == ["2", "1"]
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        for version in ("1", "2"):
            result = client.infer("scaler", [infer_input("input", x)], model_version=version)
            assert result.get_response().model_version == version
            assert same(result.as_numpy("output"), expected_scaler(int(version), x))
        config = client.get_model_config("scaler").config
        assert config.version_policy.HasField("all")
        assert config.dynamic_batching.max_queue_delay_microseconds == 1000
        index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
        assert index["scaler", "2"].state == "READY"
        assert index["broken", "1"].state == "UNAVAILABLE" and index["broken", "1"].reason
        client.unload_model("scaler")
        assert not client.is_model_ready("scaler")
        unloaded = [m for m in client.get_model_repository_index().models if m.name == "scaler"]
        assert [(m.state, m.reason) for m in unloaded] == [("UNAVAILABLE", "unloaded")]
        client.load_model("scaler")
        assert client.is_model_ready("scaler", "2")
        with pytest.raises(InferenceServerException) as inline:
            client.load_model("scaler", config='{"max_batch_size": 4}')
        assert status(inline) == "StatusCode.INVALID_ARGUMENT"


# ---------------------------------------------------------------- the port and the wire


def test_reflection_lists_both_protocols_on_one_port(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        def ask(**request: str) -> reflection_pb2.ServerReflectionResponse:
            (response,) = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10
            )
            return response

        services = {s.name for s in ask(list_services="").list_services_response.service}
        assert {"tensorwire.v1.TensorService", "inference.GRPCInferenceService"} <= services
        found = ask(file_containing_symbol="inference.GRPCInferenceService")
        [blob] = found.file_descriptor_response.file_descriptor_proto
        proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
        assert proto.package == "inference"
        methods = {m.name for m in proto.service[0].method}
        assert {"ModelInfer", "ModelStreamInfer", "RepositoryModelLoad"} <= methods
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_every_field_matches_the_published_protocol() -> None:
    """Each message and enum tensorwire declares has the name, numbers, types and
    labels that tritonclient's copy of the protocol has: the same bytes on the wire."""
    theirs = tpb.DESCRIPTOR.pool
    checked = 0
    for message in _messages(ours.DESCRIPTOR.message_types_by_name.values()):
        reference = theirs.FindMessageTypeByName(message.full_name)
        for field in message.fields:
            expected = reference.fields_by_number[field.number]
            assert (field.name, field.type, field.is_repeated) == (
                expected.name,
                expected.type,
                expected.is_repeated,
            ), field.full_name
            if field.message_type is not None:
                assert field.message_type.full_name == expected.message_type.full_name
            checked += 1
    for enum in [*ours.DESCRIPTOR.enum_types_by_name.values()]:
        reference_enum = theirs.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {
            v.name: v.number for v in reference_enum.values
        }
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    reference_service = theirs.FindServiceByName("inference.GRPCInferenceService")
    for method in service.methods:
        expected_method = reference_service.methods_by_name[method.name]
        assert method.input_type.full_name == expected_method.input_type.full_name
        assert method.output_type.full_name == expected_method.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (
            expected_method.client_streaming,
            expected_method.server_streaming,
        )
    assert checked > 100


def _messages(messages: Any) -> Iterator[Any]:
    for message in messages:
        yield message
        yield from _messages(message.nested_types)


def test_v2_calls_are_counted_and_gated_like_tensorwires_own() -> None:
    infer_token, admin_token = "i" * 32, "a" * 32
    settings = Settings(
        port=0, device="cpu", tokens=f"reader infer {infer_token};root admin {admin_token}"
    )
    server = TensorwireServer(settings, build_engine(settings))
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        with triton.InferenceServerClient(address) as client:
            assert client.is_server_live() and client.is_server_ready()  # no token needed
            with pytest.raises(InferenceServerException) as anonymous:
                client.is_model_ready("mlp")
            assert status(anonymous) == "StatusCode.UNAUTHENTICATED"
            reader = {"authorization": f"Bearer {infer_token}"}
            assert client.is_model_ready("mlp", headers=reader)
            client.infer("mlp", [infer_input("input", X)], headers=reader)
            with pytest.raises(InferenceServerException) as denied:
                client.infer(
                    "mlp",
                    [infer_input("input", X)],
                    headers={"authorization": f"Bearer {admin_token}"},
                )
            assert status(denied) == "StatusCode.PERMISSION_DENIED"
        sample = server.metrics.registry.get_sample_value
        labels = {"method": "/inference.GRPCInferenceService/ModelInfer", "target": "mlp"}
        assert sample("tensorwire_requests_total", {**labels, "code": "OK"}) == 1
    finally:
        server.stop(None)


def test_an_idle_stream_is_closed(tmp_path: Path) -> None:
    settings = Settings(port=0, device="cpu", max_stream_seconds=0.5)
    with serving(settings) as address, grpc.insecure_channel(address) as channel:
        stub = tpb_grpc.GRPCInferenceServiceStub(channel)
        started = time.monotonic()
        never: queue.Queue[tpb.ModelInferRequest] = queue.Queue()
        responses = stub.ModelStreamInfer(iter(never.get, None), timeout=20)
        with pytest.raises(grpc.RpcError) as closed:
            next(responses)
        assert closed.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
        assert time.monotonic() - started < 10
