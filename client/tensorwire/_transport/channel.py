"""The client's channel: its own options (beside the shared ones in
``tensorwire.wire.protocol``), its TLS and token credentials, and what is loopback."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Any, Final

import grpc

# Client only. After a lost connection gRPC waits 1 s before connecting again, growing
# to 2 minutes: a restarted server would stay unused long after it is back, and every
# retry in between would fail at once. Start at 100 ms and never wait more than 2 s,
# the same pace as the client's own retry backoff.
CLIENT_OPTIONS: Final[list[tuple[str, int]]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


#: A PEM certificate or key: its bytes, or the path of a file holding them.
Pem = bytes | str | os.PathLike[str]

_LOCAL_SCHEMES: Final = ("unix:", "unix-abstract:")


class SecretMetadata(tuple[tuple[str, str], ...]):
    """Call metadata that carries a secret: its repr never shows the values."""

    def __repr__(self) -> str:
        return f"<metadata: {', '.join(key for key, _ in self)}>"


def split_address(address: str) -> tuple[str, str | None]:
    """The host and port of ``host:port``, ``[v6]:port``, ``v6`` or ``host`` (port None)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if address.count(":") == 1:
        host, _, port = address.partition(":")
        return host, port
    return address, None  # no port, or a bare IPv6 address


def _host(address: str) -> str:
    """The host part of ``host:port``, ``[v6]:port``, ``v6`` or ``host``."""
    return split_address(address)[0]


def is_loopback(target: str) -> bool:
    """Whether every address in gRPC ``target`` is this machine: 127.0.0.0/8, ::1,
    localhost, or a Unix socket. Other DNS names are not, nor localhost asked of a
    named DNS server (``dns://8.8.8.8/localhost``): they may resolve anywhere."""
    if target.startswith(_LOCAL_SCHEMES):
        return True
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("dns", "ipv4", "ipv6") and not rest.isdigit():
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
            if authority:
                return False
        target = rest
    addresses = target.split(",") if scheme in ("ipv4", "ipv6") else [target]
    return all(_is_loopback_host(_host(address)) for address in addresses)


def _is_loopback_host(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_pem(value: Pem | None, what: str) -> bytes | None:
    """The PEM bytes ``value`` holds or names; ValueError if they are not PEM."""
    if value is None:
        return None
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        raise ValueError(f"{what}: pass PEM text as bytes; a str is the path of a PEM file")
    data = value if isinstance(value, bytes) else Path(value).read_bytes()
    if b"-----BEGIN " not in data:
        where = "" if isinstance(value, bytes) else f" {os.fspath(value)!s}"
        raise ValueError(f"{what}{where}: not PEM (no '-----BEGIN' line)")
    return data


def check_token(token: str) -> str:
    """``token`` if it can travel as an HTTP/2 header value; the error never shows it."""
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    if not token or not all("!" <= ch <= "~" for ch in token):
        # gRPC would reject it with a message quoting the metadata, secret included.
        raise ValueError("token must be non-empty printable ASCII with no spaces")
    return token


def client_security(
    target: str,
    *,
    tls: bool | None,
    root_certificates: Pem | None,
    certificate_chain: Pem | None,
    private_key: Pem | None,
    server_name: str | None,
    token: str | None,
    credentials: grpc.ChannelCredentials | None,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]], SecretMetadata]:
    """Channel credentials, channel options and call metadata for a client's settings;
    ValueError for settings that contradict each other or would leak the token."""
    pems = {
        "root_certificates": root_certificates,
        "certificate_chain": certificate_chain,
        "private_key": private_key,
    }
    given = [name for name, value in pems.items() if value is not None]
    if credentials is not None and (given or tls is not None):
        got = ", ".join(given) or "tls"
        raise ValueError(f"credentials= replaces tls= and the certificates; got {got}")
    if tls is False and given:
        raise ValueError(f"tls=False contradicts {', '.join(given)}")
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("a client certificate needs both certificate_chain and private_key")
    if credentials is None and (tls or (tls is None and given)):
        credentials = grpc.ssl_channel_credentials(
            read_pem(root_certificates, "root_certificates"),
            read_pem(private_key, "private_key"),
            read_pem(certificate_chain, "certificate_chain"),
        )
    options: list[tuple[str, str]] = []
    if server_name is not None:
        if credentials is None:
            raise ValueError("server_name= names the server's TLS certificate: it needs TLS")
        options.append(("grpc.ssl_target_name_override", server_name))
    metadata = SecretMetadata()
    if token is not None:
        check_token(token)
        if credentials is None and not is_loopback(target):
            raise ValueError(
                f"refusing to send a token in plain text to {target}, which is not this "
                "machine: use TLS (tls=True or root_certificates=...)"
            )
        metadata = SecretMetadata((("authorization", f"Bearer {token}"),))
    return credentials, options, metadata


def with_trace_context(metadata: tuple[tuple[str, str], ...] | None) -> Any:
    """``metadata`` with the caller's W3C trace context (``traceparent``,
    ``tracestate``) added, when the caller traces with OpenTelemetry and a span is
    active. A caller who never imported OpenTelemetry pays a dictionary lookup: this
    neither imports it nor needs it installed."""
    if "opentelemetry.trace" not in sys.modules:
        return metadata
    from opentelemetry import propagate  # the caller's own, configured by the caller

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return metadata
    added = tuple((key, value) for key, value in carrier.items() if key in _TRACE_KEYS)
    if isinstance(metadata, SecretMetadata):
        return SecretMetadata(metadata + added)
    return (metadata or ()) + added


#: The W3C trace-context keys carried; a propagator's others (baggage) stay home.
_TRACE_KEYS: Final = frozenset({"traceparent", "tracestate"})
