"""Who may use the data port (docs/security.md, "Data port connections"): each
listener's connections within a budget of their own, and the transfers in flight,
per caller and in all.

A connection is *anonymous* until it presents a live ticket (anyone who reaches the
port can open one), *busy* while it carries a transfer, and *idle* between transfers
(its client pools it for the next). Only a busy connection is worth keeping at the
expense of a new one: when a listener's budget is full, a newcomer takes the place
of the anonymous connection that has waited longest (a client presents its ticket
as soon as it connects: one still silent after FRESH_SECONDS most likely never
will), else of the idle one that has waited longest (its client reconnects when it
needs one), else of the oldest anonymous one, and is refused only when every
connection is busy. Busy connections are at most the transfers in flight, which stay
below the budget (Settings), so a ticket holder always finds room, whatever
anonymous connections come first; and a newcomer is evicted only after every
connection older than it that carries nothing.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from tensorwire_server.eviction import victim


@dataclass(eq=False)
class Connection:
    """One data connection, as its budget sees it."""

    sock: socket.socket
    #: Whether it carries a transfer now: never evicted then.
    busy: bool = False
    #: Whether it has carried one (idle between transfers), else anonymous.
    known: bool = False
    #: Whether it is out of the budget: evicted, or gone.
    gone: bool = False
    #: When it came (``time.monotonic()``).
    since: float = field(default_factory=time.monotonic)


class Budget:
    """The connections of one listener (the data port, or the same-host socket): up
    to ``limit``, oldest-waiting first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Insertion-ordered: a connection moves to the end when it goes idle, so the
        # first non-busy one of a kind is the one that has waited longest.
        self._connections: dict[Connection, None] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._connections)

    def admit(self, sock: socket.socket) -> tuple[Connection | None, Connection | None]:
        """``sock``'s place in the budget (None: refused, every connection is busy),
        and the connection evicted to make room for it, which the caller cuts."""
        with self._lock:
            evicted = None
            if len(self._connections) >= self.limit:
                evicted = self._victim()
                if evicted is None:
                    return None, None
                evicted.gone = True
                del self._connections[evicted]
            connection = Connection(sock)
            self._connections[connection] = None
            return connection, evicted

    def _victim(self) -> Connection | None:
        """The connection to make room with (eviction.victim's rule)."""
        return victim(
            self._connections,
            busy=lambda c: c.busy,
            known=lambda c: c.known,
            since=lambda c: c.since,
        )

    def claim(self, connection: Connection) -> bool:
        """Mark ``connection`` busy before it claims a ticket; False when it was
        evicted meanwhile (it must leave the ticket alone and close)."""
        with self._lock:
            if connection.gone:
                return False
            connection.busy = True
            return True

    def rest(self, connection: Connection, served: bool = True) -> None:
        """``connection``'s transfer ended (``served``), or its ticket was no good:
        not busy any more, the newest to wait."""
        with self._lock:
            if connection.gone:
                return
            connection.busy = False
            connection.known = connection.known or served
            del self._connections[connection]
            self._connections[connection] = None

    def leave(self, connection: Connection) -> None:
        """``connection`` closed."""
        with self._lock:
            connection.gone = True
            self._connections.pop(connection, None)

    def connections(self) -> list[Connection]:
        """Every connection in the budget now."""
        with self._lock:
            return list(self._connections)


class Slots:
    """Transfers in flight: up to ``per_caller`` for each caller with a name (a token's;
    without tokens there are none), up to ``total`` in all."""

    def __init__(self, total: int, per_caller: int) -> None:
        self.total = total
        self.per_caller = per_caller
        self._held: dict[str, int] = {}
        self._count = 0
        self._lock = threading.Lock()

    def take(self, caller: str) -> bool:
        """A slot for ``caller``'s transfer; False when it or the server has none left."""
        with self._lock:
            held = self._held.get(caller, 0)
            if self._count >= self.total or (caller and held >= self.per_caller):
                return False
            self._held[caller] = held + 1
            self._count += 1
            return True

    def give(self, caller: str) -> None:
        """Free a slot ``take`` gave ``caller``."""
        with self._lock:
            self._count -= 1
            held = self._held[caller] - 1
            if held:
                self._held[caller] = held
            else:
                del self._held[caller]

    def held(self, caller: str | None = None) -> int:
        """Slots held by ``caller``, or by everyone (None)."""
        with self._lock:
            return self._count if caller is None else self._held.get(caller, 0)
