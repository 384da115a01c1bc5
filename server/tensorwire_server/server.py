"""Building and running the gRPC server: services, security, health, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import tensorwire_server
from tensorwire.wire import lane as lane_wire
from tensorwire.wire.protocol import CHANNEL_OPTIONS
from tensorwire_server import kserve
from tensorwire_server.core.loading import ModelControl, load_all
from tensorwire_server.core.service import Service
from tensorwire_server.dataport.listener import DataPort
from tensorwire_server.engine.engine import Engine
from tensorwire_server.lane.grants import Grants
from tensorwire_server.lane.listener import LaneServer
from tensorwire_server.lane.spin import SpinningSelector
from tensorwire_server.models.registry import server_devices
from tensorwire_server.rest import RestServer
from tensorwire_server.rest.endpoints import Endpoints
from tensorwire_server.settings import Settings
from tensorwire_server.telemetry import tracing
from tensorwire_server.telemetry.access_log import JsonFormatter
from tensorwire_server.telemetry.metrics import Metrics
from tensorwire_server.telemetry.tracing import Tracer
from tensorwire_server.transport.admission import Quotas
from tensorwire_server.transport.executor import Compute
from tensorwire_server.transport.gate import Gate
from tensorwire_server.transport.heap import HeapTrimmer
from tensorwire_server.transport.lifecycle import Lifecycle
from tensorwire_server.transport.security import (
    Tokens,
    is_loopback,
    server_credentials,
    server_ssl_context,
)
from tensorwire_server.v1 import SERVICE, TensorServicer, tensor_service_handler

log = logging.getLogger("tensorwire_server")
T = TypeVar("T")

# Clients ping every minute during long calls (keepalive); gRPC's default would answer
# pings more often than every five minutes with GOAWAY.
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

# A unary message holds its names, dtypes and shapes beside max_request_bytes of
# payload; protobuf caps one message at 2 GiB - 1 (larger requests stream).
_SLACK = 1 << 20
_CAP = 2**31 - 1

# The services health reports on: the server as a whole ("") and each of its own.
HEALTH_SERVICES = ("", SERVICE.full_name, kserve.SERVICE.full_name)
# The services reflection describes: every one the server offers.
REFLECTED = (
    SERVICE.full_name,
    kserve.SERVICE.full_name,
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)
_HEALTH = {
    Lifecycle.STARTING: health_pb2.HealthCheckResponse.NOT_SERVING,
    Lifecycle.SERVING: health_pb2.HealthCheckResponse.SERVING,
    Lifecycle.DRAINING: health_pb2.HealthCheckResponse.NOT_SERVING,
    Lifecycle.STOPPED: health_pb2.HealthCheckResponse.NOT_SERVING,
    Lifecycle.FAILED: health_pb2.HealthCheckResponse.NOT_SERVING,
}


def _connection_age(seconds: float | None) -> list[tuple[str, int]]:
    """Channel options that end every connection after ``seconds`` with a GOAWAY;
    calls in flight then are never cut off (gRPC's default grace is unlimited)."""
    return [] if seconds is None else [("grpc.max_connection_age_ms", int(seconds * 1000))]


def receive_limit(settings: Settings) -> int:
    """Bytes of one message gRPC reads (a unary request): its payloads, their names,
    dtypes and shapes beside them, and no more than the setting or protobuf allow."""
    return min(settings.max_request_bytes + _SLACK, settings.max_message_bytes, _CAP)


def build_engine(settings: Settings) -> Engine:
    """The engine the settings describe: devices chosen, models loaded (a model that
    fails is logged and reported in Info; ValueError instead when strict)."""
    devices = server_devices(settings.device)
    engine = Engine(devices[0], devices=devices)
    load_all(engine, settings)
    return engine


class TensorwireServer:
    """A tensorwire gRPC server on grpc.aio, bound but not started: TensorService, the
    KServe v2 service, health and reflection on one port and one event loop, every RPC
    behind one Gate; both services translate to one Service, whose torch work runs on
    a Compute pool off the loop.

    The loop runs on a thread of its own, so that this object's methods (``start``,
    ``ready``, ``stop``) are plain calls from any thread: the CLI's main thread waits
    for a signal, and tests start servers beside their clients."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        # The loop's selector polls a moment after each fast-lane answer (lane/spin.py).
        self._selector = SpinningSelector(settings.fast_lane_spin if settings.fast_lane else 0.0)
        self._loop = asyncio.SelectorEventLoop(self._selector)
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tensorwire-loop", daemon=True
        )
        self._thread.start()
        # grpcio's own aio health service (grpc-stubs does not know health.aio).
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._health_lock = asyncio.Lock()
        self.lifecycle = Lifecycle(self._report)
        tokens = Tokens.load(settings.tokens_file, settings.tokens)
        #: What both services do, over the engine once ``ready`` gives it.
        self.service = Service(settings)
        self.metrics = Metrics(
            engine.device if engine is not None else None, settings.access_log, _tracer()
        )
        #: Gives freed memory back to the OS whenever the server goes idle.
        self.heap = HeapTrimmer(release=[self.service.copies.release_idle])
        self.gate = Gate(
            tokens,
            self.lifecycle,
            settings.default_deadline,
            self.metrics,
            self.heap,
            Quotas.from_settings(settings),
        )
        #: Where torch work runs, off the loop.
        self.compute = Compute(settings.workers)
        # Work handed over and waiting for a thread.
        self.metrics.waiting.set_function(self.compute.waiting)
        self.metrics.sessions.set_function(self.service.sessions.count)
        self.metrics.session_bytes.set_function(self.service.sessions.bytes)
        self.metrics.count_models(self.service.is_model)
        # tensorwire.v1 and the KServe v2 protocol, over the same service and models.
        self.servicer = TensorServicer(self.service, settings.chunk_size)
        self.inference = kserve.InferenceServicer(
            self.service, self.lifecycle, settings.default_deadline
        )
        self.health_server: grpc.aio.Server | None = None
        self.dataport: DataPort | None = None
        #: The fast lane on the data port's connections; None: off (or no data port).
        self.lane: LaneServer | None = None
        self.metrics_port: int | None = None
        #: The KServe v2 REST API (settings.http_port), and the port it bound.
        self.rest: RestServer | None = None
        self.http_port: int | None = None
        try:
            self.server = self._on_loop(self._build(settings, tokens))
            self.port = self._bind(settings, tokens)
            self.health_server, self.health_port = self._on_loop(self._health_listener(settings))
            # REST beside gRPC, bound as gRPC is (same host, same TLS, same gate).
            self.rest, self.http_port = self._on_loop(self._rest_listener(settings))
            # The data port beside gRPC, bound as gRPC is (same host, same TLS).
            self.dataport = self._dataport(settings)
            self.servicer.dataport = self.dataport
            self.lane = self.servicer.lane = self._lane(settings, tokens)
            if self.dataport is not None:
                self.metrics.count_data_port(self.dataport.totals)
            self.metrics.count_shared_memory(self._regions, self.service.copies.short_copies)
        except BaseException:
            # Refused (plain text off loopback, a port taken): nothing is left running.
            built = getattr(self, "server", None)
            if built is not None:
                self._on_loop(built.stop(None))
            if self.rest is not None:
                self._on_loop(self.rest.close(0))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self.compute.close()
            self.heap.stop()
            raise
        if engine is not None:
            self.ready(engine)

    def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    async def _build(self, settings: Settings, tokens: Tokens) -> grpc.aio.Server:
        """The aio server, made on the loop it serves from."""
        server = grpc.aio.server(
            options=[
                *(o for o in SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"),
                # A unary request larger than this is refused by gRPC before it is read.
                ("grpc.max_receive_message_length", receive_limit(settings)),
                *_connection_age(settings.max_connection_age),
            ],
            interceptors=[self.gate],
            # No maximum_concurrent_rpcs: it counts every RPC alike, so public health
            # watches could take what authenticated calls need. The gate admits each
            # call against budgets of its kind and caller instead (admission.py).
        )
        self._tensor_handler = tensor_service_handler(self.servicer, self.compute)
        server.add_generic_rpc_handlers(
            (
                self._tensor_handler,
                kserve.inference_service_handler(self.inference, self.compute),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(REFLECTED, server, pool=kserve.reflection_pool())
        return server

    def _bind(self, settings: Settings, tokens: Tokens) -> int:
        address = f"{settings.host}:{settings.port}"
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
        if credentials is not None:
            port = self.server.add_secure_port(address, credentials)
        elif is_loopback(settings.host):
            port = self.server.add_insecure_port(address)
        elif not settings.insecure:
            raise ValueError(
                f"refusing to listen in plain text on {settings.host}, which is reachable "
                "from other machines: give tls_cert and tls_key, or insecure=true "
                "(--insecure) if a trusted network or proxy protects it"
            )
        else:
            log.warning(
                "listening in PLAIN TEXT on %s: requests%s cross the network unencrypted",
                settings.host,
                " and tokens" if tokens else "",
            )
            port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind {address}")
        if not tokens and not is_loopback(settings.host):
            log.warning("no tokens: anyone who reaches %s can use this server", address)
        # Plain text on a Unix socket: it never leaves this host, and its file's
        # permissions say who may connect: the server's user and group, whatever the
        # umask (gRPC binds it here, before the server starts; a stale file is replaced).
        unix = settings.unix_socket
        if unix is not None:
            if not self.server.add_insecure_port(f"unix:{unix}"):
                raise OSError(f"could not bind unix:{unix}")
            os.chmod(unix, 0o660)
        return port

    def _regions(self) -> dict[str, int]:
        """Shared-memory regions registered, per kind (a metric)."""
        service = self.service
        return {"system": service.shared_memory.count(), "cuda": service.cuda_memory.count()}

    def _dataport(self, settings: Settings) -> DataPort | None:
        if not settings.data_plane:
            return None
        tls = server_ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        # _bind already refused plain text off loopback unless settings.insecure.
        return DataPort(
            settings.host,
            settings.data_port,
            tls,
            connections=settings.data_plane_connections,
            transfers=settings.data_plane_transfers,
            transfers_per_caller=settings.data_plane_transfers_per_caller,
            same_host=settings.same_host,
            copies=self.service.copies,
        )

    def _lane(self, settings: Settings, tokens: Tokens) -> LaneServer | None:
        """The fast lane: the data port hands it the connections that open as one;
        their calls go through the gate and the handlers gRPC's do."""
        if not settings.fast_lane or self.dataport is None:
            return None
        lane = LaneServer(
            self._loop,
            self.gate.intercept_service,
            (self._tensor_handler,),
            Grants(),
            tls=self.dataport.tls,
            max_request_bytes=min(receive_limit(settings), lane_wire.MAX_REQUEST),
            max_connections=settings.fast_lane_connections,
            port=self.dataport.port,
            local=settings.same_host,
            warm=self._selector.warm,
        )
        self.dataport.lane = lane.adopt
        return lane

    async def _health_listener(
        self, settings: Settings
    ) -> tuple[grpc.aio.Server | None, int | None]:
        """The plain-text listener on ``health_port``: the health service's Check,
        nothing else (no Watch, whose open streams a probe has no use for)."""
        if settings.health_port is None:
            return None, None
        server = grpc.aio.server(maximum_concurrent_rpcs=16)
        check = grpc.unary_unary_rpc_method_handler(
            self.health.Check,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(health.SERVICE_NAME, {"Check": check}),)
        )
        address = f"{settings.host}:{settings.health_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"could not bind the health port {address}")
        return server, port

    async def _rest_listener(self, settings: Settings) -> tuple[RestServer | None, int | None]:
        """The REST API's listener, bound (it answers once ``start`` runs); _bind
        already refused plain text off loopback unless settings.insecure."""
        if settings.http_port is None:
            return None, None
        endpoints = Endpoints(
            self.inference,
            self.gate,
            self.compute,
            settings.http_json_bytes,
            settings.http_read_timeout,
        )
        rest = RestServer(
            endpoints,
            settings.host,
            settings.http_port,
            server_ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
            settings.http_connections,
        )
        try:
            port = await rest.bind()
        except OSError as exc:
            raise OSError(
                f"could not bind the REST port {settings.host}:{settings.http_port}: "
                f"{exc.strerror or exc}"
            ) from None
        return rest, port

    def _report(self, state: str) -> None:
        """Tell the health service ``state``, in order: from another thread, once it is
        told; from the loop itself, as soon as the loop gets to it."""
        if self._loop.is_closed():
            return  # stopped: nothing serves health any more
        told = asyncio.run_coroutine_threadsafe(self._set_health(state), self._loop)
        if threading.current_thread() is not self._thread:
            told.result()

    async def _set_health(self, state: str) -> None:
        async with self._health_lock:  # FIFO: the last state told is the one that holds
            for service in HEALTH_SERVICES:
                await self.health.set(service, _HEALTH[state])

    def start(self) -> None:
        """Start answering (TensorService waits, UNAVAILABLE, until ``ready``) and
        expose metrics if a port is set."""
        self._on_loop(self.server.start())
        if self.dataport is not None:
            self.dataport.start()
        if self.health_server is not None:
            self._on_loop(self.health_server.start())
        if self.rest is not None:
            self._on_loop(self.rest.start())
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)

    def ready(self, engine: Engine) -> None:
        """Serve requests with ``engine``: models loaded and warm."""
        self.service.ready(engine, ModelControl(engine, self.settings))
        self.metrics.memory.device = engine.device
        self.metrics.count_gpus(engine.registry.devices)
        if self.metrics.tracer is not None:
            self.metrics.tracer.device = str(engine.device)
        engine.on_device_failure = lambda _: self.lifecycle.move(Lifecycle.FAILED)
        self.lifecycle.move(Lifecycle.SERVING)

    def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new requests, give in-flight ones ``grace``
        seconds to finish (None: as long as they take), then release device memory."""
        self.lifecycle.move(Lifecycle.DRAINING)  # the gate refuses new requests now
        # Wait for requests, not for health watches or other long-lived streams.
        if not self.gate.in_flight.wait_idle(grace):
            log.warning("requests still running after %g s; cancelling them", grace)
        self._close()
        self.lifecycle.move(Lifecycle.STOPPED)
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.empty_cache()

    def kill(self) -> None:
        """Stop at once, cancelling whatever runs, as a crash would (tests)."""
        self._close()

    def _close(self) -> None:
        if self._loop.is_closed():
            return
        if self.rest is not None:
            # Calls already drained (stop waited for them): responses still being
            # written get a moment, then every connection closes.
            self._on_loop(self.rest.close(1.0))
        self._on_loop(self.server.stop(0))
        if self.health_server is not None:
            self._on_loop(self.health_server.stop(0))
        if self.dataport is not None:
            self.dataport.close()
        if self.lane is not None:
            self._on_loop(_closed(self.lane))
        self.service.sessions.stop()
        self.service.regions.close()  # the regions' descriptors
        self.metrics.close()
        self.compute.close()
        self.heap.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def create_server(settings: Settings, engine: Engine | None = None) -> tuple[TensorwireServer, int]:
    """A ready (not started) server and the port it bound; port 0 picks one."""
    server = TensorwireServer(settings, engine or build_engine(settings))
    return server, server.port


def serve(settings: Settings) -> None:
    """Listen at once (health NOT_SERVING), load the models, serve until SIGINT or
    SIGTERM, then drain: NOT_SERVING, in-flight requests finish, exit."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TensorwireServer(settings)
    server.start()
    log.info("listening on %s:%d", settings.host, server.port)
    if settings.unix_socket is not None:
        log.info("listening on unix:%s", settings.unix_socket)
    if server.dataport is not None:
        plane = server.dataport
        local = "" if plane.local_name is None else f"; same host on @{plane.local_name}"
        log.info("data port on %s:%d%s", settings.host, plane.port, local)
    if server.http_port is not None:
        scheme = "https" if settings.tls_cert else "http"
        log.info("KServe v2 REST on %s://%s:%d/v2", scheme, settings.host, server.http_port)
    if server.health_port is not None:
        log.info("health checks on %s:%d (plain text)", settings.host, server.health_port)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", settings.host, server.metrics_port)
    engine = build_engine(settings)
    device = engine.describe_device()
    log.info(
        "tensorwire %s, torch %s, device %s (%s)",
        tensorwire_server.__version__,
        torch.__version__,
        device.name,
        device.description,
    )
    log.info("models: %s", ", ".join(engine.registry.names()))
    server.ready(engine)
    stop.wait()
    log.info("stopping: finishing in-flight requests (up to %g s)", settings.shutdown_grace)
    server.stop(settings.shutdown_grace)
    log.info("stopped")


async def _closed(lane: LaneServer) -> None:
    """Close ``lane``'s connections, on the loop that serves them, once the answers
    written to them are sent (up to a second)."""
    await lane.drain(1.0)


def _tracer() -> Tracer | None:
    """The tracer the ``OTEL_*`` variables ask for (telemetry.tracing), if any."""
    if not tracing.wanted():
        return None
    try:
        return Tracer("cpu")  # the engine's device, once it has one (ready)
    except ImportError as exc:
        log.warning(
            "OTEL_* asks for traces, but OpenTelemetry is not installed (%s): install "
            "tensorwire-server[tracing]; serving without traces",
            exc,
        )
        return None
