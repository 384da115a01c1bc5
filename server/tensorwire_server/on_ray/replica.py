"""One replica: a whole tensorwire server inside a Ray actor, on its node's address."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise

from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

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


def slot_port(first: int, slot: int) -> int:
    """The port of replica ``slot`` (0, 1, ...) on its node for a configured port
    ``first``: ``first + slot``; 0 stays 0 (any). The fleet gives every replica on a
    node its own slot, so they never contend for a port (gRPC binds with
    SO_REUSEPORT: two servers could both take one and share its connections)."""
    return first + slot if first else 0


def _configured(settings: Settings) -> dict[str, int]:
    """The fixed ports of ``settings`` by flag (those on 0, any, left out)."""
    ports = {
        "--port": settings.port,
        "--health-port": settings.health_port or 0,
        "--data-port": settings.data_port if settings.data_plane else 0,
        "--metrics-port": settings.metrics_port or 0,
        "--http-port": settings.http_port or 0,
    }
    return {flag: port for flag, port in ports.items() if port}


def port_clash(settings: Settings, per_node: int) -> str | None:
    """Why ``per_node`` replicas of ``settings`` on one node would take one port
    twice (each fixed port P is P to P + per_node - 1 there); None: they would not."""
    ranges = sorted((port, flag) for flag, port in _configured(settings).items())
    for (low, flag), (high, other) in pairwise(ranges):
        if high < low + per_node:
            return (
                f"{flag} {low} and {other} {high} overlap with {per_node} replicas a node "
                f"(each takes its port plus its slot, 0 to {per_node - 1}): space them "
                f"{per_node} apart"
            )
    if ranges and ranges[-1][0] + per_node - 1 > 65535:
        return f"{ranges[-1][1]} {ranges[-1][0]} + {per_node - 1} is past port 65535"
    return None


class ReplicaServer:
    """The body of the Ray actor ``fleet`` starts: a TensorwireServer with
    ``settings``, its host replaced by the node's address, serving from its first
    call until ``drain``; it is replica ``slot`` on its node (``slot_port``). The
    metrics endpoint is always on (port 0 if none is set):
    the fleet and Prometheus read each replica's load there."""

    def __init__(self, settings: Settings, ip: str, node_id: str, slot: int = 0) -> None:
        port = slot_port(settings.port, slot)
        health = None if settings.health_port is None else slot_port(settings.health_port, slot)
        data = slot_port(settings.data_port, slot) if settings.data_plane else settings.data_port
        metrics = slot_port(settings.metrics_port or 0, slot)
        http = None if settings.http_port is None else slot_port(settings.http_port, slot)
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
