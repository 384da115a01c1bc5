"""Which side-channel connection makes room for a newcomer when a listener holds its
most: the one rule the data port's budget (dataport/budgets) and the fast lane's
server (lane/listener.py) follow, so that both side channels treat an anonymous
flood and a pooled client alike (docs/security.md).

Only a busy connection is worth keeping at the expense of a new one. A newcomer takes
the place of the anonymous connection that has waited longest past FRESH_SECONDS (a
client presents its ticket or grant as soon as it connects: one still silent then
most likely never will), else of the idle one that has waited longest (its client
reconnects when it needs one), else of the oldest anonymous one; with every
connection busy it is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

#: Seconds an anonymous connection is kept ahead of idle ones: a client presents its
#: ticket or grant within a round trip or two of connecting (TLS included).
FRESH_SECONDS: Final = 1.0

C = TypeVar("C")


def victim(
    connections: Iterable[C],
    busy: Callable[[C], bool],
    known: Callable[[C], bool],
    since: Callable[[C], float],
) -> C | None:
    """The connection to close for a newcomer (None: every one is busy): ``known``
    once it presented its ticket or grant, ``since`` when it connected or last
    worked (time.monotonic)."""
    free = [c for c in connections if not busy(c)]
    anonymous = [c for c in free if not known(c)]
    stale = time.monotonic() - FRESH_SECONDS
    for group in (
        [c for c in anonymous if since(c) <= stale],
        [c for c in free if known(c)],
        anonymous,
    ):
        if group:
            return min(group, key=since)
    return None
