"""One replica: a whole tensorwire server inside a Ray actor, on its node's address."""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace

from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

#: Ports tried above a configured one when replicas share a node (one per GPU there).
PORTS_PER_NODE = 16
#: Seconds a client keeps one connection to a replica unless ``--max-connection-age``
#: says otherwise: it then resolves the fleet's name again and finds replicas added.
CONNECTION_AGE = 30.0


@dataclass(frozen=True)
class Placed:
    """Where a replica serves."""

    #: ``ip:port`` of its gRPC service: what clients connect to.
    address: str
    #: Its node's address, and the Ray node it runs on.
    ip: str
    node_id: str
    port: int
    data_port: int | None
    metrics_port: int | None
    health_port: int | None
    #: Its KServe v2 REST port (None: off).
    http_port: int | None = None


def free_port(ip: str, first: int) -> int:
    """The first of ``first`` and the PORTS_PER_NODE - 1 ports above it that nothing on
    ``ip`` listens on; 0 stays 0 (any)."""
    if first == 0:
        return 0
    for port in range(first, first + PORTS_PER_NODE):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError:
                continue
            return port
    raise OSError(f"ports {first} to {first + PORTS_PER_NODE - 1} on {ip} are all taken")


class ReplicaServer:
    """The body of the Ray actor ``fleet`` starts: a TensorwireServer with
    ``settings``, its host replaced by the node's address, serving from its first
    call until ``drain``. The metrics endpoint is always on (port 0 if none is set):
    the fleet and Prometheus read each replica's load there."""

    def __init__(self, settings: Settings, ip: str, node_id: str) -> None:
        port = free_port(ip, settings.port)
        health = None if settings.health_port is None else free_port(ip, settings.health_port)
        data = free_port(ip, settings.data_port) if settings.data_plane else settings.data_port
        metrics = 0 if not settings.metrics_port else free_port(ip, settings.metrics_port)
        http = None if settings.http_port is None else free_port(ip, settings.http_port)
        self.settings = replace(
            settings,
            host=ip,
            port=port,
            health_port=health,
            data_port=data,
            metrics_port=metrics,
            http_port=http,
            max_connection_age=settings.max_connection_age or CONNECTION_AGE,
            unix_socket=None,  # a socket path is one per host; the data port's suffices
        )
        self.server = TensorwireServer(self.settings)
        self.server.start()
        self.server.ready(build_engine(self.settings))
        plane = self.server.dataport
        self.placed = Placed(
            address=f"{ip}:{self.server.port}",
            ip=ip,
            node_id=node_id,
            port=self.server.port,
            data_port=None if plane is None else plane.port,
            metrics_port=self.server.metrics_port,
            health_port=self.server.health_port,
            http_port=self.server.http_port,
        )

    def where(self) -> Placed:
        """Where it serves."""
        return self.placed

    def load(self) -> float:
        """Calls it holds now: running, and waiting for a worker thread (the
        ``tensorwire_in_flight`` and ``tensorwire_queue_depth`` gauges)."""
        registry = self.server.metrics.registry
        running = registry.get_sample_value("tensorwire_in_flight") or 0.0
        waiting = registry.get_sample_value("tensorwire_queue_depth") or 0.0
        return running + waiting

    def drain(self, grace: float) -> None:
        """What SIGTERM does to a server: NOT_SERVING, in-flight calls finish (up to
        ``grace`` seconds), then stop."""
        self.server.stop(grace)
