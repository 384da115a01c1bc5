"""The server's one settings object: defaults, then TENSORWIRE_* environment, then flags."""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, Union, get_args, get_origin, get_type_hints

from tensorwire.wire.streaming import DEFAULT_CHUNK_SIZE

ENV_PREFIX = "TENSORWIRE_"

#: How log lines are written: plain text or one JSON object per line.
LogFormat = Literal["text", "json"]
#: Which RPCs write an access record.
AccessLog = Literal["errors", "all", "none"]
#: Whether the Load and Unload RPCs may change the models while serving.
ModelControlMode = Literal["none", "explicit"]
#: torch.compile's mode for --model models (model.toml's [compile] for a repository's).
CompileMode = Literal["off", "default", "max-autotune", "reduce-overhead"]

#: The choices of each of those settings (the command line offers the same).
LOG_FORMATS: Final = get_args(LogFormat)
ACCESS_LOGS: Final = get_args(AccessLog)
MODEL_CONTROLS: Final = get_args(ModelControlMode)
COMPILE_MODES: Final = get_args(CompileMode)


@dataclass(frozen=True)
class Settings:
    """How a tensorwire server runs. Each field can be set as TENSORWIRE_<FIELD>."""

    #: Address to listen on; 127.0.0.1 by default so nothing is exposed by accident.
    host: str = "127.0.0.1"
    #: Port to listen on; 0 picks a free one (tests).
    port: int = 50051
    #: Also serve gRPC on this Unix socket (a path), for clients on this host
    #: (``Client("unix:PATH")``): no TCP and no TLS, the file's permissions guard it;
    #: tokens still apply. None: TCP only.
    unix_socket: str | None = None
    #: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
    device: str = "auto"
    #: Extra models, name -> source (a .pt2 file, a TorchScript file or module:factory).
    #: From the environment: TENSORWIRE_MODELS="name=source,name=source".
    models: Mapping[str, str] = field(default_factory=dict)
    #: Serve the built-in models (identity, echo, mlp, mlp64).
    builtins: bool = True
    #: A model repository: a folder of models, each with a model.toml and numbered
    #: version folders (README, "Model repository").
    model_repo: str | None = None
    #: torch.compile the ``models`` above in warm-up, before they serve: off, default,
    #: max-autotune or reduce-overhead (CUDA graphs: CUDA only). A factory returning a
    #: ``Model`` with ``compile`` set chooses its own. A failure serves the model
    #: eagerly (logged), or, with ``strict``, refuses to start.
    model_compile: CompileMode = "off"
    #: A folder compiled models are kept in (Inductor's caches, per torch version), so
    #: that a restarted server or a new replica serves without compiling again; a
    #: volume in containers. None: Inductor's default, a folder under /tmp.
    compile_cache_dir: str | None = None
    #: ``none``: the models loaded at start serve until exit; ``explicit``: the Load
    #: and Unload RPCs (admin scope) add, replace and remove models while serving.
    model_control: ModelControlMode = "none"
    #: Refuse to start when any model or version fails to load (else: logged, reported
    #: in Info, and the others serve).
    strict: bool = False
    #: Batch concurrent requests to the models configured for it (the built-in MLPs
    #: and repository models with [dynamic_batching]); false: every request alone.
    dynamic_batching: bool = True
    #: Threads running torch work (models, functions, gradients, device copies); one
    #: event loop moves every request's messages.
    workers: int = 16
    #: Payload bytes per chunk message of a streamed response.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Logging level name.
    log_level: str = "INFO"
    #: Log lines as ``text`` or ``json`` (one object per line, with request ids).
    log_format: LogFormat = "text"
    #: Which RPCs write an access record: ``errors`` (those that did not end OK),
    #: ``all``, or ``none``. Metrics count every RPC either way; a record for each
    #: success costs about 15% of a small request's server CPU.
    access_log: AccessLog = "errors"
    #: Port of the Prometheus metrics endpoint (HTTP, on ``host``); none: no endpoint.
    metrics_port: int | None = None
    #: Port of a second, plain-text listener on ``host`` that answers only the gRPC
    #: health service's Check, for probes that cannot speak TLS or send tokens
    #: (Kubernetes' gRPC probes, a container's HEALTHCHECK); none: health is asked on
    #: ``port`` only. It tells SERVING or NOT_SERVING and nothing else.
    health_port: int | None = None
    #: Port of the KServe v2 REST API (HTTP/1.1, with Triton's binary tensor data and
    #: the extensions tritonclient.http calls), on ``host`` with gRPC's TLS and tokens
    #: (docs/kserve.md, "REST"); 0 picks a free one; None: no REST. The server command
    #: (tensorwire-server) serves it on 8000, as Triton and KServe do, unless given
    #: ``--http-port off``; a server built in Python serves it only when asked.
    http_port: int | None = None
    #: Bytes of JSON one REST inference request may hold beside its binary data (its
    #: Inference-Header-Content-Length, or all of a body without binary data): each
    #: JSON number becomes a Python object of about 30 bytes while it is parsed.
    http_json_bytes: int = 64 << 20
    #: Seconds a REST request's body may pause before it is refused (408): a stalled
    #: sender holds a connection and a place in the server's budgets.
    http_read_timeout: float = 60.0
    #: REST connections held at once; past it, a new one is answered 503 and closed.
    http_connections: int = 256
    #: Seconds after which the server asks a client to reconnect (HTTP/2 GOAWAY; calls
    #: in flight finish): clients balancing over a DNS name then resolve it again and
    #: find replicas added since. None: connections last as long as clients keep them.
    max_connection_age: float | None = None
    #: The data port: streamed requests and responses move their payloads over TCP
    #: connections of their own beside gRPC, with gRPC's TLS (docs/performance.md).
    #: Off: every payload travels through gRPC.
    data_plane: bool = True
    #: Its port on ``host``; 0 picks a free one, which clients learn from each ticket
    #: (a container or a firewall needs a fixed one, published: the image sets 50053).
    data_port: int = 0
    #: Same-host transfers on the data port (Linux): clients on this host (in this
    #: network namespace) pass shared memory as file descriptors over an abstract
    #: Unix socket, with the same tickets, instead of sending bytes (docs/security.md);
    #: and the fast lane listens on an abstract Unix socket of its own for them.
    same_host: bool = True
    #: Connections each data-plane listener (the data port, the same-host socket)
    #: holds at once. Past it, a new one takes the place of the connection that has
    #: waited longest without carrying a transfer (anonymous ones first: no ticket
    #: presented yet); refused only when all carry transfers (docs/security.md).
    data_plane_connections: int = 128
    #: Transfers on the data port at once, server-wide (fewer than
    #: ``data_plane_connections``, so that a ticket holder always finds room); past
    #: it, calls send their payloads through gRPC.
    data_plane_transfers: int = 64
    #: Of those, the most one caller (token) holds; its further calls send their
    #: payloads through gRPC. Without tokens only the server-wide bound applies.
    data_plane_transfers_per_caller: int = 16
    #: The fast lane (issue 33): small calls as compact frames on a side-channel
    #: connection to the data port, opened with a grant obtained over gRPC and
    #: admitted by the same gate (docs/performance.md). Needs the data port.
    fast_lane: bool = True
    #: Fast-lane connections held at once; past it a new one replaces the one idle
    #: longest, and is refused when none is idle (its client uses gRPC).
    fast_lane_connections: int = 256
    #: Seconds the event loop polls without sleeping after it answers a fast-lane
    #: call (0: never), so that a caller's next call finds it awake: ~70-90 µs off a
    #: small same-host call, for at most this much of one core per answer
    #: (lane/spin.py).
    fast_lane_spin: float = 0.0005

    # Transport security and authentication (docs/security.md).
    #: PEM certificate chain and private key files: serve TLS.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: PEM file of the CA that signs client certificates: mutual TLS, required.
    tls_client_ca: str | None = None
    #: Listen in plain text on an address other than loopback (refused otherwise).
    insecure: bool = False
    #: File of bearer tokens, one ``NAME SCOPES TOKEN`` per line; none: no authentication.
    tokens_file: str | None = None
    #: The same lines (``;``-separated), from TENSORWIRE_TOKENS only: never a flag.
    tokens: str | None = field(default=None, repr=False)

    # Limits: each breach answered with a clear status before memory is committed.
    #: Payload bytes one request may carry (unary or streamed).
    max_request_bytes: int = 8 << 30
    #: Elements one request tensor may have.
    max_tensor_elements: int = 1 << 32
    #: Tensors one request may carry (inputs, arguments, outputs of every kind); more
    #: get RESOURCE_EXHAUSTED before any is decoded (a stream's, from its header).
    #: Every tensor costs per-request work however small it is.
    max_request_tensors: int = 4096
    #: Bytes of one gRPC message the server reads: a unary request, whose payloads
    #: gRPC buffers whole (tritonclient's ModelInfer sends its tensors so). The server
    #: reads the smaller of this and max_request_bytes + 1 MiB; protobuf caps a message
    #: at 2 GiB - 1. Calls the gate refuses never have their message read.
    max_message_bytes: int = 2**31 - 1
    #: Calls in progress at once, every token together (running, waiting for a worker
    #: or for their request); more get RESOURCE_EXHAUSTED at once. Public calls
    #: (health, ServerLive, ServerReady) do not count: they have budgets of their own.
    max_concurrent_requests: int = 64
    #: Of those, streams open at once (streamed requests or responses, which a client
    #: may hold open for max_stream_seconds): room stays for unary calls.
    max_concurrent_streams: int = 48
    #: Calls in progress at once each token is sure of (with tokens; without, nobody
    #: can be told apart and only the server-wide caps apply). Past it a token may take
    #: more while this many of max_concurrent_requests stay free for the others: one
    #: token alone gets the cap less one share.
    max_calls_per_token: int = 16
    #: Streams open at once each token is sure of; past it, as above, of
    #: max_concurrent_streams.
    max_streams_per_token: int = 16
    #: Public calls (health's Check and List, KServe's ServerLive and ServerReady),
    #: which need no token, running at once; they never take authenticated capacity.
    max_public_calls: int = 16
    #: Health Watch streams open at once on ``port`` (public: they need no token).
    max_health_watches: int = 8
    #: Seconds a streamed request may take to arrive.
    max_stream_seconds: float = 3600.0
    #: Seconds a call without a deadline of its own may wait for a worker.
    default_deadline: float = 600.0
    #: Seconds in-flight requests get to finish after SIGTERM.
    shutdown_grace: float = 30.0

    # Sessions: tensors and trainers kept on the server between calls (README,
    # "Remote tensors and training").
    #: Bytes of device memory one session's tensors and trainers may hold.
    session_quota_bytes: int = 4 << 30
    #: Seconds a session may go unused before its tensors and trainers are freed.
    session_ttl: float = 600.0
    #: Sessions open at once; more get RESOURCE_EXHAUSTED.
    max_sessions: int = 64
    #: Sessions one token may hold open at once, a share of max_sessions so that one
    #: token cannot take them all. Without tokens every caller is one anonymous
    #: identity, bounded by max_sessions only (docs/security.md, "Per-identity limits").
    max_sessions_per_token: int = 16
    #: Bytes of device memory all of one token's sessions may hold together (each
    #: also within session_quota_bytes).
    session_bytes_per_token: int = 8 << 30
    #: Bytes of device memory every session on the server may hold together.
    max_session_bytes: int = 32 << 30

    # Shared memory: Triton's system and CUDA shared-memory extensions on the KServe v2
    # service (docs/security.md, "Shared memory"). Off: any client that may infer could
    # make the server read and write POSIX shared-memory objects its user can open.
    #: Let clients register /dev/shm objects (and, on a CUDA server, CUDA IPC handles)
    #: as regions that requests read inputs from and write outputs to.
    allow_shared_memory: bool = False
    #: Regions one caller (token, its sessions' regions included; all callers
    #: together when there are no tokens) may hold at once, system and CUDA together;
    #: each holds an open file descriptor in the server.
    max_shared_memory_regions: int = 64
    #: Bytes all registered regions may span together: the server's open descriptors
    #: keep the memory of objects their clients unlinked until they unregister.
    max_shared_memory_bytes: int = 16 << 30
    #: Bytes the regions of one token (its sessions' included) may span together, a
    #: share of max_shared_memory_bytes; without tokens, max_shared_memory_bytes bounds.
    shared_memory_bytes_per_token: int = 4 << 30

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, replaced by TENSORWIRE_* variables, replaced by non-None overrides."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, raw, hints[f.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        positive = (
            "chunk_size",
            "max_request_bytes",
            "max_tensor_elements",
            "max_concurrent_requests",
            "max_request_tensors",
            "max_message_bytes",
            "max_concurrent_streams",
            "max_calls_per_token",
            "max_streams_per_token",
            "max_public_calls",
            "max_health_watches",
            "max_stream_seconds",
            "default_deadline",
            "workers",
            "session_quota_bytes",
            "session_ttl",
            "max_sessions",
            "max_shared_memory_regions",
            "max_shared_memory_bytes",
            # Per-identity shares (sessions, regions).
            "max_sessions_per_token",
            "session_bytes_per_token",
            "max_session_bytes",
            "shared_memory_bytes_per_token",
            "data_plane_connections",
            "data_plane_transfers",
            "data_plane_transfers_per_caller",
            "http_json_bytes",
            "http_read_timeout",
            "http_connections",
            "fast_lane_connections",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        for name, kind in get_type_hints(type(self)).items():
            choices = get_args(kind) if get_origin(kind) is Literal else ()
            value = getattr(self, name)
            if choices and value not in choices:
                raise ValueError(f"{name} must be {_one_of(choices)}, not {value!r}")
        if self.max_connection_age is not None and self.max_connection_age <= 0:
            raise ValueError(f"max_connection_age must be positive, not {self.max_connection_age}")
        if self.data_plane_transfers >= self.data_plane_connections:
            raise ValueError(
                f"data_plane_transfers ({self.data_plane_transfers}) must be fewer than"
                f" data_plane_connections ({self.data_plane_connections})"
            )
        if not 0 <= self.fast_lane_spin <= 0.01:
            raise ValueError(
                f"fast_lane_spin must be 0 to 0.01 seconds (a core's time per answer), "
                f"not {self.fast_lane_spin}"
            )
        if self.shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must not be negative, not {self.shutdown_grace}")


def _parse(name: str, raw: str, kind: Any) -> Any:
    """``raw`` as a value of the setting's type (``kind``, its resolved type hint)."""
    optional = _without_none(kind) is not kind
    kind = _without_none(kind)
    if optional and raw.strip().lower() in ("off", "none"):
        return None  # an optional port or limit switched off
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is bool:
            if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if get_origin(kind) is Mapping:
            pairs = (item.partition("=") for item in raw.split(",") if item.strip())
            return {k.strip(): v.strip() for k, _, v in pairs}
    except ValueError:
        raise ValueError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from None
    return raw  # a string, or a choice __post_init__ checks


def _without_none(kind: Any) -> Any:
    """``X`` for an optional ``X | None``; ``kind`` itself otherwise."""
    if get_origin(kind) in (Union, types.UnionType):
        (kind,) = (arg for arg in get_args(kind) if arg is not type(None))
    return kind


def _one_of(choices: tuple[Any, ...]) -> str:
    """``a, b or c``: the choices as a sentence lists them."""
    *rest, last = map(str, choices)
    return f"{', '.join(rest)} or {last}" if rest else last
