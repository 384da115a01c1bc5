"""The fleet: places replicas on the cluster's nodes, publishes their list, reads
their load, scales them between bounds, drains the ones it takes away and replaces
the ones lost with their node."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tensorwire_server.on_ray.autoscale import Autoscaler, Scaling
from tensorwire_server.on_ray.dns import Responder
from tensorwire_server.on_ray.replica import Placed, ReplicaServer
from tensorwire_server.settings import Settings

log = logging.getLogger(__name__)
#: Ray, for its calls that carry no types (nodes()): mypy checks with Ray or without.
RAY: Any = ray

#: Seconds a replica may take to answer the fleet's load probe.
PROBE_SECONDS = 2.0
#: Probes in a row a replica may miss before the fleet takes it as lost.
LOST_AFTER = 2
#: Seconds a replica may take to start (load its models) before the fleet gives up on it.
START_SECONDS = 300.0
#: Seconds a node that lost a replica gets no new one, unless Ray says it is alive
#: and the replica's actor is gone for good: its link may be down still.
QUARANTINE_SECONDS = 20.0
#: Seconds between taking a replica off the list and draining it: clients resolve the
#: list again within this (the DNS answer's TTL, the client's data routes).
UNLIST_SECONDS = 5.0


@dataclass(frozen=True)
class Placement:
    """What each replica asks of Ray, and how many one node may hold."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    per_node: int = 1


@dataclass
class Member:
    actor: Any
    node_id: str
    started: float
    slot: int = 0  # its place on its node: its ports are the configured ones + slot
    placed: Placed | None = None
    pending: Any = None  # the ObjectRef of its where(), until it serves
    missed: int = 0


@dataclass
class Fleet:
    """Replicas of ``settings`` on the Ray cluster ``ray.init`` joined."""

    settings: Settings
    scaling: Scaling
    placement: Placement = field(default_factory=Placement)
    drain_grace: float = 30.0
    dns: Responder | None = None
    list_file: Path | None = None
    members: list[Member] = field(default_factory=list)
    #: Replicas off the list, draining: they still hold their ports and resources.
    draining: list[Member] = field(default_factory=list)
    quarantine: dict[str, float] = field(default_factory=dict)
    _published: tuple[str, ...] = ()
    _drains: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.autoscaler = Autoscaler(self.scaling)
        self._remote: Any = ray.remote(ReplicaServer)

    # ------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, tick: float = 1.0) -> None:
        """Keep the fleet until ``stop`` is set; then drain every replica."""
        try:
            while not stop.is_set():
                self.step()
                stop.wait(tick)
        finally:
            self.shutdown()

    def step(self) -> None:
        """One round: see which replicas started, probe the serving ones' load,
        drop the lost, then scale."""
        now = time.monotonic()
        self._settle(now)
        total = self._probe()
        serving = [m for m in self.members if m.placed is not None]
        starting = len(self.members) - len(serving)
        change = self.autoscaler.decide(now, len(self.members), total) if not starting else 0
        if len(self.members) < self.scaling.minimum:
            change = max(change, 1)
        if change > 0:
            self._add()
        elif change < 0 and len(serving) > 1:
            self._remove(max(serving, key=lambda m: m.started))
        self._publish()

    def addresses(self) -> list[str]:
        """The serving replicas' gRPC addresses."""
        return [m.placed.address for m in self.members if m.placed is not None]

    # ------------------------------------------------------------ placing

    def _nodes(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        alive = [n for n in RAY.nodes() if n.get("Alive")]
        return [n for n in alive if self.quarantine.get(n["NodeID"], 0.0) <= now]

    def _add(self) -> bool:
        """Start a replica on the node holding fewest (that has room); False: none has.
        Replicas draining count until they end: they hold their ports (a new replica
        there would take the next, outside the name) and their share of the node."""
        held: dict[str, int] = {}
        for m in [*self.members, *self.draining]:
            held[m.node_id] = held.get(m.node_id, 0) + 1
        room = []
        for node in self._nodes():
            resources = node.get("Resources", {})
            if self.placement.num_gpus and resources.get("GPU", 0) < self.placement.num_gpus:
                continue
            if resources.get("CPU", 0) < self.placement.num_cpus:
                continue
            if held.get(node["NodeID"], 0) < self.placement.per_node:
                room.append(node)
        if not room:
            return False
        node = min(room, key=lambda n: (held.get(n["NodeID"], 0), n["NodeManagerAddress"]))
        taken = {m.slot for m in [*self.members, *self.draining] if m.node_id == node["NodeID"]}
        slot = min(set(range(self.placement.per_node)) - taken)
        actor = self._remote.options(
            num_cpus=self.placement.num_cpus,
            num_gpus=self.placement.num_gpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            max_restarts=0,
        ).remote(self.settings, node["NodeManagerAddress"], node["NodeID"], slot)
        member = Member(actor, node["NodeID"], time.monotonic(), slot, pending=actor.where.remote())
        self.members.append(member)
        log.info("starting a replica on %s", node["NodeManagerAddress"])
        return True

    def _settle(self, now: float) -> None:
        """Take in the replicas that started; drop those that failed to."""
        for m in list(self.members):
            if m.pending is None:
                continue
            ready, _ = ray.wait([m.pending], timeout=0)
            if ready:
                try:
                    m.placed = ray.get(m.pending)
                except ray.exceptions.RayError as exc:
                    log.error("a replica failed to start: %s", exc)
                    self._forget(m, lost=True)
                    continue
                m.pending = None
                log.info("replica serving on %s", m.placed.address)
            elif now - m.started > START_SECONDS:
                log.error("a replica did not start in %g s", START_SECONDS)
                self._forget(m, lost=True)

    # ------------------------------------------------------------ watching

    def _probe(self) -> float:
        """The calls every serving replica holds; a replica that misses LOST_AFTER
        probes in a row (its node gone, its link down, its process dead) is dropped
        from the list at once and its actor killed."""
        serving = [m for m in self.members if m.placed is not None]
        if not serving:
            return 0.0
        refs = {id(m): m.actor.load.remote() for m in serving}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_SECONDS)
        done = set(ready)
        total = 0.0
        for m in serving:
            ref = refs[id(m)]
            try:
                if ref not in done:
                    raise TimeoutError
                total += ray.get(ref)
                m.missed = 0
            except (TimeoutError, ray.exceptions.RayError):
                m.missed += 1
                if m.missed >= LOST_AFTER:
                    log.warning("replica %s lost", m.placed and m.placed.address)
                    self._forget(m, lost=True)
        return total

    def _forget(self, member: Member, lost: bool) -> None:
        self.members.remove(member)
        if lost:
            self.quarantine[member.node_id] = time.monotonic() + QUARANTINE_SECONDS
        ray.kill(member.actor, no_restart=True)

    # ------------------------------------------------------------ leaving

    def _remove(self, member: Member) -> None:
        """Take ``member`` off the list now; drain it and end it once clients have
        had UNLIST_SECONDS to resolve the list again."""
        self.members.remove(member)
        self.draining.append(member)
        address = member.placed.address if member.placed else "?"
        log.info("scaling down: draining %s", address)

        def drain() -> None:
            time.sleep(UNLIST_SECONDS)
            try:
                ray.get(member.actor.drain.remote(self.drain_grace), timeout=self.drain_grace + 30)
            except ray.exceptions.RayError as exc:  # GetTimeoutError is one
                log.warning("draining %s: %s", address, exc)
            try:
                ray.kill(member.actor, no_restart=True)
            finally:
                self.draining.remove(member)  # its node has room again
            log.info("replica %s stopped", address)

        thread = threading.Thread(target=drain, name=f"drain-{address}", daemon=True)
        thread.start()
        self._drains.append(thread)

    def shutdown(self) -> None:
        """Drain every replica (in parallel) and end them; stop answering the name."""
        members, self.members = self.members, []
        self._publish()
        refs = [m.actor.drain.remote(self.drain_grace) for m in members if m.placed]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self.drain_grace + 30)
        for m in members:
            ray.kill(m.actor, no_restart=True)
        for thread in self._drains:
            thread.join(timeout=self.drain_grace + 60)
        if self.dns is not None:
            self.dns.close()

    # ------------------------------------------------------------ publishing

    def _publish(self) -> None:
        addresses = tuple(self.addresses())
        if addresses == self._published:
            return
        self._published = addresses
        log.info("replicas: %s", ", ".join(addresses) or "none")
        if self.dns is not None:
            # A name carries addresses, not ports: the replicas on the first port.
            first = [m.placed.ip for m in self.members if m.placed and m.slot == 0]
            self.dns.set_addresses(first)
        if self.list_file is not None:
            # The list, and beside it every replica's ports (data, metrics, health).
            placed = [asdict(m.placed) for m in self.members if m.placed is not None]
            _write(self.list_file, "".join(f"{a}\n" for a in addresses))
            _write(self.list_file.with_name(self.list_file.name + ".json"), json.dumps(placed))


def _write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once: a reader sees the old list or the new."""
    partial = path.with_name(path.name + ".new")
    partial.write_text(text)
    os.replace(partial, path)
