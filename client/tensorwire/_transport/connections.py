"""Idle data connections kept for reuse, by where they lead, when to try a data path
again after it failed, and the waits both data paths share: the data port
(dataport.py) and the same-host socket (same_host.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

#: Seconds to wait for a data connection: one that does not answer by then is taken
#: as unreachable (a firewall, a proxy, a port not published, another host).
CONNECT_SECONDS: Final = 1.0
#: Seconds a connected data connection may take to accept a ticket: a loaded server
#: starts a thread for each connection first; a port that never answers is no good.
ANSWER_SECONDS: Final = 5.0
#: Seconds the client keeps off a data path it found unreachable before it tries again.
FALLBACK_SECONDS: Final = 600.0
#: Seconds it keeps off one that answered but refused a ticket (a busy server, or
#: another one behind the same port): doubled with each refusal in a row, up to
#: FALLBACK_SECONDS; an accepted ticket starts it over.
REFUSED_SECONDS: Final = 1.0
#: Idle connections kept per destination.
POOLED: Final = 8

K = TypeVar("K", bound=Hashable)


class IdleConnections(Generic[K]):
    """Connections whose last transfer ended well, up to POOLED per destination."""

    def __init__(self) -> None:
        self._idle: dict[K, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def take(self, key: K) -> socket.socket | None:
        """An idle connection to ``key``, if there is one."""
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give(self, key: K, sock: socket.socket) -> None:
        """Keep ``sock`` for the next transfer to ``key`` (or close it: full, closed)."""
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self.closed and len(idle) < POOLED:
                idle.append(sock)
                return
        sock.close()

    def count(self) -> int:
        """Connections kept."""
        with self._lock:
            return sum(len(socks) for socks in self._idle.values())

    def close(self) -> None:
        """Close every idle connection, and each one given from now on."""
        self.closed = True
        with self._lock:
            pooled = [sock for socks in self._idle.values() for sock in socks]
            self._idle.clear()
        for sock in pooled:
            sock.close()


class Detours(Generic[K]):
    """When each destination of a data path may be tried again after it failed;
    meanwhile calls send their payloads through gRPC."""

    def __init__(self) -> None:
        self._until: dict[K, float] = {}
        self._refusals: dict[K, int] = {}

    def open(self, key: K) -> bool:
        """Whether to try ``key`` now."""
        until = self._until.get(key)
        return until is None or time.monotonic() >= until

    def avoided(self) -> list[K]:
        """The destinations not to try now."""
        now = time.monotonic()
        return [key for key, until in list(self._until.items()) if now < until]

    def unreachable(self, key: K) -> None:
        """Nothing answers at ``key`` from here: off for FALLBACK_SECONDS."""
        self._until[key] = time.monotonic() + FALLBACK_SECONDS

    def refused(self, key: K) -> None:
        """``key`` answered but refused a ticket: off for a while, longer with each
        refusal in a row (a transient one costs a second of chunks, a port that
        always answers for another server soon the full FALLBACK_SECONDS)."""
        count = self._refusals.get(key, 0)
        self._refusals[key] = count + 1
        pause = min(REFUSED_SECONDS * 2 ** min(count, 30), FALLBACK_SECONDS)
        self._until[key] = time.monotonic() + pause

    def accepted(self, key: K) -> None:
        """``key`` accepted a ticket: refusals start over."""
        if key in self._refusals:
            self._refusals.pop(key, None)
            self._until.pop(key, None)
