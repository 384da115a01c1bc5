"""gRPC channel options both ends share."""

from __future__ import annotations

from typing import Final

# gRPC's 4 MiB default refuses ordinary tensors; -1 lifts it (protobuf still caps one
# message at 2 GiB). Keepalive notices a dead peer instead of hanging on it.
CHANNEL_OPTIONS: Final[list[tuple[str, int]]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
]
