"""Building and running the gRPC server."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
import torch

import tensorwire_server
from tensorwire.channel import CHANNEL_OPTIONS
from tensorwire_server.engine import Engine
from tensorwire_server.models import load_models
from tensorwire_server.servicer import TensorServicer, tensor_service_handler
from tensorwire_server.settings import Settings
from tensorwire_server.tensors import resolve_device

log = logging.getLogger("tensorwire_server")

# Clients ping every minute during long calls (keepalive); gRPC's default would answer
# pings more often than every five minutes with GOAWAY.
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def build_engine(settings: Settings) -> Engine:
    """The engine the settings describe: device chosen, models loaded."""
    device = resolve_device(settings.device)
    return Engine(device, load_models(settings.models, builtins=settings.builtins))


def create_server(settings: Settings, engine: Engine | None = None) -> tuple[grpc.Server, int]:
    """A started-ready (not started) server and the port it bound; port 0 picks one."""
    engine = engine or build_engine(settings)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="tensorwire"),
        options=SERVER_OPTIONS,
    )
    server.add_generic_rpc_handlers(
        (tensor_service_handler(TensorServicer(engine, settings.chunk_size)),)
    )
    address = f"{settings.host}:{settings.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port


def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then finish in-flight requests and stop."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = build_engine(settings)
    device = engine.describe_device()
    log.info(
        "tensorwire %s, torch %s, device %s (%s)",
        tensorwire_server.__version__,
        torch.__version__,
        device.name,
        device.description,
    )
    log.info("models: %s", ", ".join(sorted(engine.models)))
    server, port = create_server(settings, engine)
    server.start()
    log.info("listening on %s:%d", settings.host, port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping: finishing in-flight requests")
    server.stop(grace=10).wait()
