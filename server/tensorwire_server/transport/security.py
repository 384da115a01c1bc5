"""Who may call what: bearer tokens with scopes, the scope each RPC needs, and TLS.

Tokens come from a file or the environment, never from the command line (``ps`` would
show them). Only their SHA-256 digests are kept, compared in constant time; a token is
named in logs by the name its line gives, never by its value.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

#: Every scope a token can hold; ``*`` in a token file grants all of them.
SCOPES: Final = ("infer", "grad", "call", "tensors", "train", "admin")

#: Methods anyone may call, token or not: orchestrators probe health without one.
PUBLIC: Final = "public"
#: Methods any valid token may call, whatever its scopes.
AUTHENTICATED: Final = "authenticated"
#: Methods that open, describe, close or free within a session: a token with
#: ``tensors`` or with ``train`` holds it (training needs a session for its trainer).
#: It is derived, never written in a token file, and named as it reads in refusals.
SESSION: Final = "tensors or train"
#: Derived scopes, and the scopes any one of which grants each.
DERIVED: Final[Mapping[str, frozenset[str]]] = {SESSION: frozenset({"tensors", "train"})}

#: The scope each RPC needs, by full method path. A method missing here needs
#: ``admin``: new RPCs are closed until someone decides who may call them.
METHOD_SCOPES: Final[Mapping[str, str]] = {
    "/tensorwire.v1.TensorService/Info": AUTHENTICATED,
    "/tensorwire.v1.TensorService/Infer": "infer",
    "/tensorwire.v1.TensorService/InferStream": "infer",
    "/tensorwire.v1.TensorService/Grad": "grad",
    "/tensorwire.v1.TensorService/GradStream": "grad",
    "/tensorwire.v1.TensorService/Call": "call",
    "/tensorwire.v1.TensorService/CallStream": "call",
    "/tensorwire.v1.TensorService/ModelStatistics": AUTHENTICATED,
    "/tensorwire.v1.TensorService/Load": "admin",
    "/tensorwire.v1.TensorService/Unload": "admin",
    # A session by itself holds nothing: a train token opens one for its trainers, and
    # frees and closes what it made. Storing and fetching tensors is the tensors scope.
    "/tensorwire.v1.TensorService/OpenSession": SESSION,
    "/tensorwire.v1.TensorService/CloseSession": SESSION,
    "/tensorwire.v1.TensorService/DescribeSession": SESSION,
    "/tensorwire.v1.TensorService/Free": SESSION,
    "/tensorwire.v1.TensorService/Put": "tensors",
    "/tensorwire.v1.TensorService/PutStream": "tensors",
    "/tensorwire.v1.TensorService/Get": "tensors",
    "/tensorwire.v1.TensorService/GetStream": "tensors",
    # A program chains functions and models: the Call scope, as its steps are Calls.
    "/tensorwire.v1.TensorService/Run": "call",
    "/tensorwire.v1.TensorService/CreateTrainer": "train",
    "/tensorwire.v1.TensorService/Step": "train",
    "/tensorwire.v1.TensorService/Parameters": "train",
    # A fast-lane grant: each call on its connection is then checked for its own scope.
    "/tensorwire.v1.TensorService/OpenLane": AUTHENTICATED,
    # The KServe v2 protocol: probes are public like health, which they mirror (and
    # reveal no model); whatever names or describes models needs a token, as Info does.
    "/inference.GRPCInferenceService/ServerLive": PUBLIC,
    "/inference.GRPCInferenceService/ServerReady": PUBLIC,
    "/inference.GRPCInferenceService/ModelReady": AUTHENTICATED,
    "/inference.GRPCInferenceService/ServerMetadata": AUTHENTICATED,
    "/inference.GRPCInferenceService/ModelMetadata": AUTHENTICATED,
    "/inference.GRPCInferenceService/ModelConfig": AUTHENTICATED,
    "/inference.GRPCInferenceService/ModelStatistics": AUTHENTICATED,
    "/inference.GRPCInferenceService/RepositoryIndex": AUTHENTICATED,
    "/inference.GRPCInferenceService/ModelInfer": "infer",
    "/inference.GRPCInferenceService/ModelStreamInfer": "infer",
    "/inference.GRPCInferenceService/RepositoryModelLoad": "admin",
    "/inference.GRPCInferenceService/RepositoryModelUnload": "admin",
    # Shared memory serves inference only, and each caller sees only its own regions:
    # the infer scope, status included (it lists nothing of anyone else's).
    "/inference.GRPCInferenceService/SystemSharedMemoryStatus": "infer",
    "/inference.GRPCInferenceService/SystemSharedMemoryRegister": "infer",
    "/inference.GRPCInferenceService/SystemSharedMemoryUnregister": "infer",
    "/inference.GRPCInferenceService/CudaSharedMemoryStatus": "infer",
    "/inference.GRPCInferenceService/CudaSharedMemoryRegister": "infer",
    "/inference.GRPCInferenceService/CudaSharedMemoryUnregister": "infer",
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": AUTHENTICATED,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": AUTHENTICATED,
}

_MIN_TOKEN_LENGTH = 16


def scope_of(method: str) -> str:
    """The scope ``method`` (a full path, /package.Service/Method) needs."""
    return METHOD_SCOPES.get(method, "admin")


@dataclass(frozen=True)
class Identity:
    """A caller, as its token's line names it; ``scopes`` include the derived ones
    its scopes grant (``with_derived``)."""

    name: str
    scopes: frozenset[str]


def with_derived(scopes: frozenset[str]) -> frozenset[str]:
    """``scopes`` and every derived scope one of them grants."""
    return scopes | {derived for derived, by in DERIVED.items() if scopes & by}


class Tokens:
    """Bearer tokens and what each may do. Empty: authentication is off."""

    def __init__(self, entries: Iterable[tuple[str, frozenset[str], str]] = ()) -> None:
        self._digests: list[tuple[bytes, Identity]] = []
        for name, scopes, token in entries:
            if len(token) < _MIN_TOKEN_LENGTH:
                raise ValueError(
                    f"token {name!r} is shorter than {_MIN_TOKEN_LENGTH} characters; "
                    "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            self._digests.append((_digest(token), Identity(name, with_derived(scopes))))

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, token: str) -> Identity | None:
        """The identity ``token`` belongs to, or None. Every entry is compared, in
        constant time, so the time taken says nothing about which one (nearly) matched."""
        presented = _digest(token)
        found = None
        for digest, identity in self._digests:
            if hmac.compare_digest(presented, digest):
                found = identity
        return found

    @classmethod
    def parse(cls, text: str, source: str) -> Tokens:
        """Tokens from ``text``: one per line (or ``;``-separated), ``NAME SCOPES TOKEN``
        with SCOPES comma-separated or ``*``; ``#`` starts a comment."""
        entries = []
        for number, raw in enumerate(text.replace(";", "\n").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 3:
                # Never echo the line: it holds a token.
                raise ValueError(f"{source} line {number}: expected NAME SCOPES TOKEN")
            name, scope_list, token = fields
            scopes = frozenset(SCOPES) if scope_list == "*" else frozenset(scope_list.split(","))
            unknown = sorted(scopes - set(SCOPES))
            if unknown:
                raise ValueError(
                    f"{source} line {number}: unknown scope {', '.join(unknown)}; "
                    f"scopes are {', '.join(SCOPES)} or *"
                )
            entries.append((name, scopes, token))
        return cls(entries)

    @classmethod
    def load(cls, path: str | None, inline: str | None) -> Tokens:
        """Tokens from the file at ``path`` and from ``inline`` (the environment)."""
        text = ""
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ValueError(f"cannot read tokens file {path}: {exc.strerror}") from None
        tokens = cls.parse(text, f"tokens file {path}") if path else cls()
        if inline:
            tokens._digests += cls.parse(inline, "TENSORWIRE_TOKENS")._digests
        return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, requiring client certificates signed by
    ``client_ca`` when it is given (mutual TLS); None for plain text."""
    if not _serves_tls(cert, key, client_ca):
        return None
    assert cert and key  # _serves_tls checked
    pair = (_read(key, "tls_key"), _read(cert, "tls_cert"))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read(client_ca, "tls_client_ca"), require_client_auth=True
    )


def server_ssl_context(
    cert: str | None, key: str | None, client_ca: str | None
) -> ssl.SSLContext | None:
    """The same TLS as ``server_credentials``, for a listener of Python's own (the data
    plane); None for plain text."""
    if not _serves_tls(cert, key, client_ca):
        return None
    assert cert and key  # _serves_tls checked
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


def _serves_tls(cert: str | None, key: str | None, client_ca: str | None) -> bool:
    """Whether the TLS settings ask for TLS; ValueError when they ask for half of it."""
    if not (cert or key or client_ca):
        return False
    if not (cert and key):
        raise ValueError("TLS needs both tls_cert and tls_key")
    return True


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listening address) is reachable from this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
