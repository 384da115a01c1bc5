"""Security of the clients: tokens (never in plain text off this machine, never shown),
TLS and client certificates, from both Client and AsyncClient and the command line,
against ``Scripted`` (tests/support/scripted.py), which echoes the caller's credentials."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from support.scripted import Run, Scripted, both_clients

import tensorwire as tw
from tensorwire import AsyncClient, Client
from tensorwire._transport.channel import is_loopback
from tensorwire.cli import main


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.server.stop(grace=None)


# ---------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("LOCALHOST", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("ipv6:[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("dns://8.8.8.8/localhost:50051", False),
        ("unix:/run/tensorwire.sock", True),
        ("gpu-box:50051", False),
        ("localhost.example.com:1", False),
        ("10.0.0.7:50051", False),
        ("0.0.0.0:50051", False),
        ("[2001:db8::1]:50051", False),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),
        ("dns:///gpu-box:50051", False),
        ("dns:50051", False),
    ],
)
def test_loopback_targets(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_a_token_is_refused_in_plain_text_to_another_machine(cls: type[Any]) -> None:
    for target in ("gpu-box:50051", "10.1.2.3:50051", "dns:///gpu-box:1"):
        with pytest.raises(ValueError, match=f"plain text to {target}") as info:
            cls(target, token="s3cret-token")
        assert "s3cret-token" not in str(info.value)
    for bad in ("", "two words", "line\nbreak", "caf\u00e9"):
        with pytest.raises(ValueError, match="printable ASCII") as info:
            cls("127.0.0.1:1", token=bad)
        assert bad not in str(info.value) or not bad


def test_a_token_never_shows_in_repr() -> None:
    with Client("127.0.0.1:1", token="s3cret-token") as c:
        assert repr(c) == "Client('127.0.0.1:1', secure=False, token=<hidden>)"
        assert "s3cret" not in repr(vars(c))
    with Client("gpu-box:1", tls=True, token="s3cret-token") as c:  # TLS: any target
        assert "s3cret" not in repr(c) and "secure=True" in repr(c)
    assert repr(Client("127.0.0.1:1")) == "Client('127.0.0.1:1', secure=False)"


@both_clients
def test_the_token_travels_as_bearer_metadata_on_every_call(run: Run, scripted: Scripted) -> None:
    scripted.fail("Info", grpc.StatusCode.UNAVAILABLE)  # the retry carries it too
    info = run(scripted.address, "info", timeout=10, token="s3cret-token")
    assert info.server_version == "Bearer s3cret-token"
    assert run(scripted.address, "info", timeout=10).server_version == ""


@both_clients
def test_refused_tokens_map_to_their_errors_without_the_token(run: Run, scripted: Scripted) -> None:
    for code, error in [
        (grpc.StatusCode.UNAUTHENTICATED, tw.UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, tw.PermissionDeniedError),
    ]:
        scripted.fail("Info", code)
        with pytest.raises(error) as info:
            run(scripted.address, "info", timeout=10, token="s3cret-token")
        assert "s3cret" not in str(info.value)


# ---------------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca: trustme.CA
    server: Scripted
    dir: Path

    @property
    def ca_pem(self) -> bytes:
        return bytes(self.ca.cert_pem.bytes())


def _tls_server(ca: trustme.CA, require_client_auth: bool) -> Scripted:
    cert = ca.issue_cert("tensorwire.test", "127.0.0.1")
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    credentials = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), chain)],
        root_certificates=ca.cert_pem.bytes() if require_client_auth else None,
        require_client_auth=require_client_auth,
    )
    return Scripted(credentials)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert("client.test", common_name="client.test")
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    (tmp_path / "client.pem").write_bytes(b"".join(b.bytes() for b in client.cert_chain_pems))
    server = _tls_server(ca, require_client_auth=False)
    yield Pki(ca, server, tmp_path)
    server.server.stop(grace=None)


@both_clients
def test_tls_from_pem_bytes_and_from_paths(run: Run, pki: Pki) -> None:
    address = pki.server.address
    for roots in (pki.ca_pem, str(pki.dir / "ca.pem"), pki.dir / "ca.pem"):
        info = run(address, "info", timeout=10, root_certificates=roots, token="t0k")
        assert info.server_version == "Bearer t0k"
    # The certificate names tensorwire.test and 127.0.0.1; another name must be asked for.
    named = run(
        address, "info", timeout=10, root_certificates=pki.ca_pem, server_name="tensorwire.test"
    )
    assert named.server_version == ""
    with pytest.raises(tw.UnavailableError, match=f"cannot reach tensorwire server at {address}"):
        run(address, "info", timeout=5, root_certificates=pki.ca_pem, server_name="other.test")
    with pytest.raises(tw.UnavailableError):  # plain text to a TLS port
        run(address, "info", timeout=5, retries=0)


@both_clients
def test_a_client_certificate_from_files_identifies_the_client(run: Run, pki: Pki) -> None:
    server = _tls_server(pki.ca, require_client_auth=True)
    try:
        info = run(
            server.address,
            "info",
            timeout=10,
            root_certificates=pki.dir / "ca.pem",
            certificate_chain=pki.dir / "client.pem",
            private_key=str(pki.dir / "client.key"),
        )
        assert info.torch_version == "client.test"  # the peer the server saw
        with pytest.raises(tw.UnavailableError):
            run(server.address, "info", timeout=5, retries=1, root_certificates=pki.ca_pem)
    finally:
        server.server.stop(grace=None)


def test_contradicting_or_unreadable_tls_settings_are_refused(pki: Pki) -> None:
    ca = pki.dir / "ca.pem"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls": False, "root_certificates": ca}, "tls=False contradicts root_certificates"),
        ({"certificate_chain": pki.dir / "client.pem"}, "both certificate_chain and private_key"),
        ({"private_key": pki.dir / "client.key"}, "both certificate_chain and private_key"),
        ({"root_certificates": pki.ca_pem.decode()}, "pass PEM text as bytes"),
        ({"root_certificates": b"not a certificate"}, "root_certificates: not PEM"),
        ({"server_name": "x.test"}, "server_name= .* needs TLS"),
        (
            {"credentials": grpc.ssl_channel_credentials(), "root_certificates": ca},
            "credentials= replaces",
        ),
    ]
    for kwargs, message in cases:
        for cls in (Client, AsyncClient):
            with pytest.raises(ValueError, match=message):
                cls("127.0.0.1:1", **kwargs)
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1:1", root_certificates=pki.dir / "missing.pem")
    with pytest.raises(ValueError, match="retries"):
        Client("127.0.0.1:1", retries=-1)


# ---------------------------------------------------------------------- command line


def _info_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "info", "--json"]) == 0, capsys.readouterr().err
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_cli_reads_the_token_from_a_file_or_the_environment(
    scripted: Scripted,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = ["--target", scripted.address]
    monkeypatch.delenv("TENSORWIRE_TOKEN", raising=False)
    assert _info_json(capsys, *target)["server_version"] == ""
    monkeypatch.setenv("TENSORWIRE_TOKEN", "from-env")
    assert _info_json(capsys, *target)["server_version"] == "Bearer from-env"
    (tmp_path / "token").write_text("from-file\n")
    data = _info_json(capsys, *target, "--token-file", str(tmp_path / "token"))
    assert data["server_version"] == "Bearer from-file"  # the file wins, its newline dropped


def test_cli_connection_errors_are_usage_errors_without_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORWIRE_TOKEN", "s3cret-token")
    assert main(["--target", "gpu-box:50051", "info"]) == 2
    err = capsys.readouterr().err
    assert "refusing to send a token in plain text to gpu-box:50051" in err
    assert "s3cret" not in err
    monkeypatch.delenv("TENSORWIRE_TOKEN")
    (tmp_path / "empty").write_text("\n")
    for flags, message in [
        (["--token-file", str(tmp_path / "missing")], "missing: cannot read: No such file"),
        (["--token-file", str(tmp_path / "empty")], "the file is empty"),
        (["--tls-ca", str(tmp_path / "missing.pem")], "missing.pem: cannot read"),
        (["--tls-cert", str(tmp_path / "empty")], "--tls-cert and --tls-key go together"),
        (["--server-name", "x.test"], "--server-name names the server's TLS certificate"),
        (["--tls-ca", str(tmp_path / "empty")], "empty: not PEM"),
    ]:
        assert main(["--target", "127.0.0.1:1", *flags, "info"]) == 2
        assert message in capsys.readouterr().err


def test_cli_tls_flags_reach_a_tls_server(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    server = _tls_server(pki.ca, require_client_auth=True)
    try:
        flags = [
            "--target",
            server.address,
            "--tls-ca",
            str(pki.dir / "ca.pem"),
            "--tls-cert",
            str(pki.dir / "client.pem"),
            "--tls-key",
            str(pki.dir / "client.key"),
            "--server-name",
            "tensorwire.test",
        ]
        assert _info_json(capsys, *flags)["torch_version"] == "client.test"
    finally:
        server.server.stop(grace=None)


def test_cli_has_no_flag_that_takes_the_token_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    for flag in ("--tls ", "--tls-ca", "--tls-cert", "--tls-key", "--server-name", "--token-file"):
        assert flag in usage
    assert "--token " not in usage and "--token=" not in usage
    for argv in (["--token", "s3cret", "info"], ["--token=s3cret", "info"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "use --token-file FILE or $TENSORWIRE_TOKEN" in err and "s3cret" not in err
