"""TLS, mutual TLS, bearer tokens and scopes, on every RPC of every service served."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from conftest import on_device
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.v1 import tensorwire_pb2_grpc as pb_grpc
from tensorwire.wire.protocol import CHANNEL_OPTIONS
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings
from tensorwire_server.transport.security import (
    AUTHENTICATED,
    METHOD_SCOPES,
    PUBLIC,
    SCOPES,
    SESSION,
    Tokens,
    is_loopback,
    scope_of,
    with_derived,
)

TIMEOUT = 10


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return build_engine(on_device(Settings(device="cpu")))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files: the CA, the server's certificate and key, a client's, and a client of
    another CA."""
    root = tmp_path_factory.mktemp("pki")
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@tensorwire.test")
    stranger = trustme.CA().issue_cert("client@tensorwire.test")
    files = {
        "ca": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
        "stranger_cert": stranger.cert_chain_pems[0],
        "stranger_key": stranger.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = root / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    return paths


def serving(settings: Settings, engine) -> Iterator[str]:  # type: ignore[no-untyped-def]
    server = TensorwireServer(settings, engine)
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(None)


def info(channel: grpc.Channel, token: str | None = None) -> pb.InfoResponse:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    stub = pb_grpc.TensorServiceStub(channel)
    response: pb.InfoResponse = stub.Info(pb.InfoRequest(), timeout=TIMEOUT, metadata=metadata)
    return response


def secure(address: str, pki: dict[str, Path], cert: str | None = None) -> grpc.Channel:
    pair = {}
    if cert:
        pair = {
            "certificate_chain": pki[f"{cert}_cert"].read_bytes(),
            "private_key": pki[f"{cert}_key"].read_bytes(),
        }
    credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), **pair)
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_address(pki: dict[str, Path], engine) -> Iterator[str]:  # type: ignore[no-untyped-def]
    settings = Settings(
        port=0, device="cpu", tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"])
    )
    yield from serving(settings, engine)


@pytest.fixture(scope="module")
def mtls_address(pki: dict[str, Path], engine) -> Iterator[str]:  # type: ignore[no-untyped-def]
    settings = Settings(
        port=0,
        device="cpu",
        tls_cert=str(pki["server_cert"]),
        tls_key=str(pki["server_key"]),
        tls_client_ca=str(pki["ca"]),
    )
    yield from serving(settings, engine)


def test_tls_serves_a_client_that_trusts_its_ca(tls_address: str, pki: dict[str, Path]) -> None:
    with secure(tls_address, pki) as channel:
        assert "identity" in [m.name for m in info(channel).models]


def test_tls_refuses_plain_text_and_clients_that_do_not_trust_it(
    tls_address: str, ca: trustme.CA
) -> None:
    with (
        grpc.insecure_channel(tls_address) as channel,
        pytest.raises(grpc.RpcError) as plain,
    ):
        info(channel)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    other = grpc.ssl_channel_credentials(trustme.CA().cert_pem.bytes())
    with grpc.secure_channel(tls_address, other) as channel, pytest.raises(grpc.RpcError) as bad:
        info(channel)
    assert bad.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mutual_tls_needs_a_client_certificate_from_its_ca(
    mtls_address: str, pki: dict[str, Path]
) -> None:
    with secure(mtls_address, pki, cert="client") as channel:
        assert info(channel).models
    for cert in (None, "stranger"):
        with secure(mtls_address, pki, cert=cert) as channel, pytest.raises(grpc.RpcError) as exc:
            info(channel)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, cert  # type: ignore[attr-defined]


def test_tls_settings_are_checked_at_start(pki: dict[str, Path], engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        TensorwireServer(Settings(port=0, tls_cert=str(pki["server_cert"])), engine)
    with pytest.raises(ValueError, match="cannot read tls_key /nonexistent"):
        TensorwireServer(
            Settings(port=0, tls_cert=str(pki["server_cert"]), tls_key="/nonexistent"), engine
        )


def test_plain_text_off_loopback_is_refused_unless_asked_for(engine) -> None:  # type: ignore[no-untyped-def]
    # Refused before anything binds, so no port opens beyond loopback.
    with pytest.raises(ValueError, match=r"refusing to listen in plain text on 0\.0\.0\.0"):
        TensorwireServer(Settings(host="0.0.0.0", port=0), engine)
    assert is_loopback("127.0.0.1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("::")


# ---------------------------------------------------------------- tokens and scopes

TOKENS = {scope: secrets.token_urlsafe(24) for scope in SCOPES}
ALL = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def guarded(engine) -> Iterator[str]:  # type: ignore[no-untyped-def]
    # One token per scope, each holding that scope alone, and one holding all.
    lines = [f"only-{scope} {scope} {token}" for scope, token in TOKENS.items()]
    lines.append(f"root * {ALL}")
    yield from serving(Settings(port=0, device="cpu", tokens=";".join(lines)), engine)


def served_methods(channel: grpc.Channel) -> list[tuple[str, bool, bool]]:
    """Every method of every service the server lists by reflection:
    (path, client streaming, server streaming)."""
    from google.protobuf import descriptor_pb2

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    metadata = [("authorization", f"Bearer {ALL}")]

    def ask(**request: str) -> reflection_pb2.ServerReflectionResponse:
        (response,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**request)]),
            timeout=TIMEOUT,
            metadata=metadata,
        )
        return response

    methods = []
    for service in ask(list_services="").list_services_response.service:
        found = ask(file_containing_symbol=service.name).file_descriptor_response
        for blob in found.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
            for svc in proto.service:
                if f"{proto.package}.{svc.name}" != service.name:
                    continue
                for m in svc.method:
                    path = f"/{service.name}/{m.name}"
                    methods.append((path, m.client_streaming, m.server_streaming))
    return methods


def call(
    channel: grpc.Channel, method: tuple[str, bool, bool], token: str | None
) -> grpc.StatusCode:
    """Call ``method`` with an empty request; its status code (OK if it answered)."""
    path, client_streaming, server_streaming = method
    metadata = [("authorization", f"Bearer {token}")] if token else None
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(client_streaming, server_streaming)]
    request = iter([b""]) if client_streaming else b""
    try:
        result = kind(path)(request, timeout=TIMEOUT, metadata=metadata)
        if server_streaming:
            next(iter(result), None)  # Watch streams on: its first answer is enough
            result.cancel()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def test_every_served_method_has_a_scope_and_is_enforced(guarded: str) -> None:
    with grpc.insecure_channel(guarded, options=CHANNEL_OPTIONS) as channel:
        methods = served_methods(channel)
        services = {path.split("/")[1] for path, _, _ in methods}
        assert {
            "tensorwire.v1.TensorService",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
        } <= services
        for method in methods:
            path = method[0]
            assert path in METHOD_SCOPES, f"{path} has no scope of its own"
            scope = scope_of(path)
            anonymous = call(channel, method, None)
            forged = call(channel, method, "x" * 32)
            if scope == PUBLIC:
                assert anonymous not in (grpc.StatusCode.UNAUTHENTICATED,), path
                continue
            assert anonymous == grpc.StatusCode.UNAUTHENTICATED, path
            assert forged == grpc.StatusCode.UNAUTHENTICATED, path
            # A scope of its own, or a derived one (SESSION) that some scopes grant.
            grants = {
                s for s in TOKENS if scope == AUTHENTICATED or scope in with_derived(frozenset({s}))
            }
            denied = [t for s, t in TOKENS.items() if s not in grants]
            for token in denied:
                assert call(channel, method, token) == grpc.StatusCode.PERMISSION_DENIED, path
            allowed = [ALL] + [TOKENS[s] for s in grants]
            for token in allowed:
                code = call(channel, method, token)
                assert code not in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ), (path, code)


def test_refusals_name_what_is_missing_and_never_the_token(
    guarded: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bogus = secrets.token_urlsafe(24)
    with grpc.insecure_channel(guarded, options=CHANNEL_OPTIONS) as channel:
        with pytest.raises(grpc.RpcError) as missing:
            info(channel)
        assert "needs a bearer token" in missing.value.details()  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as unknown:
            info(channel, bogus)
        assert unknown.value.details() == "the bearer token is not valid"  # type: ignore[attr-defined]
        stub = pb_grpc.TensorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            stub.Grad(
                pb.GradRequest(model="mlp"),
                timeout=TIMEOUT,
                metadata=[("authorization", f"Bearer {TOKENS['infer']}")],
            )
        assert denied.value.details() == (  # type: ignore[attr-defined]
            "token 'only-infer' lacks the 'grad' scope that /tensorwire.v1.TensorService/Grad needs"
        )
    logged = caplog.text
    for token in (bogus, *TOKENS.values(), ALL):
        assert token not in logged
        assert token not in repr(Settings(tokens=f"a * {token}"))


def test_without_tokens_everything_is_open(engine) -> None:  # type: ignore[no-untyped-def]
    for address in serving(Settings(port=0, device="cpu"), engine):
        with grpc.insecure_channel(address) as channel:
            assert info(channel).models


def test_token_files_are_parsed_strictly(tmp_path: Path) -> None:
    good = tmp_path / "tokens"
    good.write_text(f"# operators\nalice infer,grad {ALL}  # her laptop\n\nbob * {'b' * 20}\n")
    tokens = Tokens.load(str(good), f"carol call {'c' * 20}")
    assert len(tokens) == 3
    alice = tokens.identify(ALL)
    assert alice is not None and alice.name == "alice" and alice.scopes == {"infer", "grad"}
    assert tokens.identify("b" * 20).scopes == {*SCOPES, SESSION}  # type: ignore[union-attr]
    assert tokens.identify("c" * 20).scopes == {"call"}  # type: ignore[union-attr]
    assert tokens.identify("nope" * 8) is None
    cases = {
        "alice infer": "expected NAME SCOPES TOKEN",
        f"alice fly {'x' * 20}": "unknown scope fly",
        "alice infer short": "shorter than 16 characters",
    }
    for text, message in cases.items():
        with pytest.raises(ValueError, match=message) as exc:
            Tokens.parse(text, "test")
        assert "x" * 20 not in str(exc.value)
    with pytest.raises(ValueError, match="cannot read tokens file"):
        Tokens.load(str(tmp_path / "missing"), None)


def test_health_needs_no_token(guarded: str) -> None:
    with grpc.insecure_channel(guarded) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
