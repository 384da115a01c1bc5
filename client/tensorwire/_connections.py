"""Idle data connections kept for reuse, by where they lead, and the waits both data
paths share: the data port (_dataplane.py) and the same-host socket (_samehost.py)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

#: Seconds to wait for a data connection: one that does not answer by then is taken
#: as unreachable (a firewall, a proxy, a port not published, another host).
CONNECT_SECONDS: Final = 1.0
#: Seconds the client keeps off a data path it found unreachable before it tries again.
FALLBACK_SECONDS: Final = 600.0
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
