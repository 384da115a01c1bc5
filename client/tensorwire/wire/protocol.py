"""What both ends agree on beyond the .proto: metadata keys, limits, channel options."""

from __future__ import annotations

from typing import Final

#: The call metadata key that names a call's session (OpenSession's id).
SESSION_KEY: Final = "x-tensorwire-session"

#: The metadata key of the request id: a client may send its own (a sane token of up
#: to 64 characters), and the server sends back the one it used in every response's
#: trailing metadata (a stream's initial metadata too), so errors match its log.
REQUEST_ID_KEY: Final = "x-request-id"

#: gRPC's server pushback (gRFC A6): trailing metadata on an UNAVAILABLE call that the
#: server did not run, saying after how many milliseconds to try again. A starting
#: server sends it while its models load; tensorwire's clients wait that long and try
#: again within the call's deadline, whatever their retry count.
RETRY_PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"

#: How long a starting server asks a caller to wait before trying again, in ms.
STARTING_PUSHBACK_MS: Final = 250

#: The most steps one Run program may have.
MAX_PROGRAM_STEPS: Final = 64

#: The longest handle id a peer may send; a longer one cannot name a real handle.
MAX_HANDLE_LENGTH: Final = 64

# gRPC's 4 MiB default refuses ordinary tensors; -1 lifts it (protobuf still caps one
# message at 2 GiB). Keepalive notices a dead peer instead of hanging on it: a client
# pings after a minute without traffic and drops the connection when no answer comes
# within 20 s, so a call to a vanished server fails (UNAVAILABLE) instead of waiting
# for its deadline, or forever. grpcio 1.85 waits for a keepalive ping's answer for
# ping_timeout_ms (default 60 s), not keepalive_timeout_ms: both say 20 s. Unlimited
# pings without data keep the check alive while a long computation sends nothing;
# the server permits a ping every 10 s.
#: The channel options of both ends.
CHANNEL_OPTIONS: Final[list[tuple[str, int]]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.ping_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
]
