"""The KServe v2 REST API spoken by NVIDIA's own tritonclient.http and .http.aio over a
real socket: health, metadata, every datatype as binary and JSON data, requested
outputs, errors with their HTTP status, statistics, the repository, system shared
memory, the same answers as gRPC's, bearer tokens and TLS."""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
import tritonclient.utils.shared_memory as shm
import trustme
from conftest import TOY_MODELS
from support.kserve import ARRAYS, X, same
from support.repo_fixtures import make_repository
from support.rest import rest_server, send
from tritonclient.utils import InferenceServerException

from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(90)

#: The datatypes JSON numbers carry (FP16 and BF16 travel as binary data only).
JSON_TYPES = [d for d in ARRAYS if d not in ("FP16", "BF16")]


@pytest.fixture(scope="module")
def engine() -> Any:
    return build_engine(Settings(device="cpu", models=TOY_MODELS))


@pytest.fixture(scope="module")
def server(engine: Any) -> Iterator[TensorwireServer]:
    with rest_server(engine, allow_shared_memory=True) as served:
        yield served


@pytest.fixture(scope="module")
def url(server: TensorwireServer) -> str:
    return f"127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url, network_timeout=60)
    yield c
    c.close()


def http_input(
    name: str, arr: np.ndarray, binary: bool, datatype: str | None = None
) -> httpclient.InferInput:
    datatype = datatype or ("BOOL" if arr.dtype == np.bool_ else _datatype(arr))
    tensor = httpclient.InferInput(name, list(arr.shape), datatype)
    tensor.set_data_from_numpy(arr, binary_data=binary)
    return tensor


def _datatype(arr: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(arr.dtype))


# ---------------------------------------------------------------- health and metadata


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7")
    assert not client.is_model_ready("no-such-model")
    server = client.get_server_metadata()
    assert server["name"] == "tensorwire"
    assert "system_shared_memory" in server["extensions"]
    meta = client.get_model_metadata("mlp")
    assert meta["name"] == "mlp" and meta["versions"] == ["1"]
    assert {t["name"] for t in meta["inputs"]} and all("shape" in t for t in meta["inputs"])
    assert client.get_model_metadata("mlp", "1") == meta
    config = client.get_model_config("mlp")
    assert config["name"] == "mlp" and config["backend"] == "tensorwire"


def test_unknown_model_is_404_with_the_v2_error(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("no-such-model")
    assert "no-such-model" in exc.value.message() and "not found" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.infer("no-such-model", [http_input("input", X, True)])
    assert "not found" in exc.value.message()


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("datatype", sorted(ARRAYS))
def test_binary_data_round_trips_every_datatype(
    client: httpclient.InferenceServerClient, datatype: str
) -> None:
    arr = ARRAYS[datatype]
    output = httpclient.InferRequestedOutput("output", binary_data=True)
    result = client.infer("identity", [http_input("input", arr, True, datatype)], outputs=[output])
    assert same(result.as_numpy("output"), arr)
    assert result.get_output("output")["datatype"] == datatype


@pytest.mark.parametrize("datatype", JSON_TYPES)
def test_json_data_round_trips_every_json_datatype(
    client: httpclient.InferenceServerClient, datatype: str
) -> None:
    arr = ARRAYS[datatype]
    output = httpclient.InferRequestedOutput("output", binary_data=False)
    tensor = http_input("input", arr, False, datatype)
    result = client.infer("identity", [tensor], outputs=[output])
    assert same(result.as_numpy("output"), arr)


def test_binary_in_json_out_and_the_mlp_agrees_with_grpc(
    client: httpclient.InferenceServerClient, server: TensorwireServer
) -> None:
    import tritonclient.grpc as grpcclient

    rest = client.infer(
        "mlp",
        [http_input("input", X, True)],
        outputs=[httpclient.InferRequestedOutput("output", binary_data=False)],
        request_id="r-1",
    )
    assert rest.get_response()["id"] == "r-1"
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as g:
        tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        over_grpc = g.infer("mlp", [tensor]).as_numpy("output")
    assert same(rest.as_numpy("output"), over_grpc)


def test_every_output_when_none_is_named(client: httpclient.InferenceServerClient) -> None:
    x = np.arange(3, dtype=np.float64)
    inputs = [http_input("x", x, True), http_input("y", x, False)]  # binary and JSON
    result = client.infer("two_heads", inputs)
    assert {o["name"] for o in result.get_response()["outputs"]} == {"sum", "prod"}
    assert same(result.as_numpy("sum"), x + x)


def test_async_client(url: str) -> None:
    async def run() -> None:
        async with aioclient.InferenceServerClient(url) as c:
            assert await c.is_server_live()
            assert await c.is_model_ready("identity")
            assert (await c.get_model_metadata("identity"))["name"] == "identity"
            tensor = aioclient.InferInput("input", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X, binary_data=True)
            results = await asyncio.gather(*(c.infer("identity", [tensor]) for _ in range(8)))
            for result in results:
                assert same(result.as_numpy("output"), X)
            stats = await c.get_inference_statistics("identity")
            assert stats["model_stats"][0]["inference_count"] >= 8

    asyncio.run(run())


def test_statistics_and_repository_index(client: httpclient.InferenceServerClient) -> None:
    client.infer("identity", [http_input("input", X, True)])
    stats = client.get_inference_statistics("identity")["model_stats"]
    assert stats[0]["name"] == "identity" and stats[0]["inference_count"] >= 1
    assert stats[0]["inference_stats"]["success"]["count"] >= 1
    every = client.get_inference_statistics()["model_stats"]
    assert {"identity", "mlp"} <= {s["name"] for s in every}
    index = client.get_model_repository_index()
    assert {"name": "mlp", "version": "1", "state": "READY", "reason": ""} in index


def test_repository_load_and_unload(engine: Any, tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo")
    settings = {"model_repo": str(repo), "model_control": "explicit", "builtins": False}
    engine = build_engine(Settings(device="cpu", **settings))
    with rest_server(engine, **settings) as served:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}")
        try:
            assert c.is_model_ready("scaler")
            c.unload_model("scaler")
            assert not c.is_model_ready("scaler")
            assert any(
                m["name"] == "scaler" and m["state"] == "UNAVAILABLE"
                for m in c.get_model_repository_index()
            )
            c.load_model("scaler")
            assert c.is_model_ready("scaler")
            with pytest.raises(InferenceServerException, match="not supported"):
                c.load_model("scaler", config='{"backend": "x"}')
        finally:
            c.close()


def test_system_shared_memory(client: httpclient.InferenceServerClient) -> None:
    key = f"tw-rest-{secrets.token_hex(6)}"
    size = X.nbytes
    inp = shm.create_shared_memory_region(key + "-in", "/" + key + "-in", size)
    out = shm.create_shared_memory_region(key + "-out", "/" + key + "-out", size)
    try:
        shm.set_shared_memory_region(inp, [X])
        client.register_system_shared_memory(key + "-in", "/" + key + "-in", size)
        client.register_system_shared_memory(key + "-out", "/" + key + "-out", size)
        status = client.get_system_shared_memory_status()
        assert {r["name"] for r in status} == {key + "-in", key + "-out"}
        assert client.get_system_shared_memory_status(key + "-in")[0]["byte_size"] == size
        tensor = httpclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_shared_memory(key + "-in", size)
        output = httpclient.InferRequestedOutput("output", binary_data=True)
        output.set_shared_memory(key + "-out", size)
        result = client.infer("identity", [tensor], outputs=[output])
        assert result.get_output("output")["shape"] == list(X.shape)
        assert same(shm.get_contents_as_numpy(out, np.float32, list(X.shape)), X)
        client.unregister_system_shared_memory(key + "-in")
        assert [r["name"] for r in client.get_system_shared_memory_status()] == [key + "-out"]
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(inp)
        shm.destroy_shared_memory_region(out)


# ---------------------------------------------------------------- tokens and TLS


def test_bearer_tokens_and_scopes(engine: Any) -> None:
    infer, reader = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    tokens = f"inferrer infer {infer};reader call {reader}"
    with rest_server(engine, tokens=tokens) as served:
        url = f"127.0.0.1:{served.http_port}"
        anonymous = httpclient.InferenceServerClient(url)
        try:
            assert anonymous.is_server_live()  # public, as over gRPC
            with pytest.raises(InferenceServerException, match="bearer token"):
                anonymous.get_server_metadata()
        finally:
            anonymous.close()
        refused = send(served.http_port, "GET", "/v2", headers={"Authorization": "Bearer nope"})
        assert refused.status == 401 and "not valid" in refused.json()["error"]
        c = httpclient.InferenceServerClient(url)
        try:
            auth = {"Authorization": f"Bearer {infer}"}
            result = c.infer("identity", [http_input("input", X, True)], headers=auth)
            assert same(result.as_numpy("output"), X)
            with pytest.raises(InferenceServerException, match="lacks the 'infer' scope"):
                c.infer(
                    "identity",
                    [http_input("input", X, True)],
                    headers={"Authorization": f"Bearer {reader}"},
                )
        finally:
            c.close()
        denied = send(
            served.http_port, "POST", "/v2/models/identity/infer", b"{}",
            {"Authorization": f"Bearer {reader}"},
        )  # fmt: skip
        assert denied.status == 403


def test_tls_with_the_grpc_certificate(engine: Any, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {}
    for name, blob in {
        "cert": cert.cert_chain_pems[0],
        "key": cert.private_key_pem,
        "ca": ca.cert_pem,
    }.items():
        paths[name] = tmp_path / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    with rest_server(engine, tls_cert=str(paths["cert"]), tls_key=str(paths["key"])) as served:
        context = ssl.create_default_context(cafile=str(paths["ca"]))
        reply = send(served.http_port, "GET", "/v2/health/ready", tls=context)
        assert reply.status == 200 and reply.json() == {"ready": True}
        with pytest.raises(Exception):  # noqa: B017 - plain text to a TLS port
            send(served.http_port, "GET", "/v2/health/ready", timeout=5).body  # noqa: B018

        async def infer() -> np.ndarray:
            async with aioclient.InferenceServerClient(
                f"127.0.0.1:{served.http_port}", ssl=True, ssl_context=context
            ) as c:
                tensor = aioclient.InferInput("input", list(X.shape), "FP32")
                tensor.set_data_from_numpy(X, binary_data=True)
                return (await c.infer("identity", [tensor])).as_numpy("output")

        assert same(asyncio.run(infer()), X)
