"""Fast-lane grants: what a caller obtains over gRPC (``OpenLane``, through the gate
like any call) to open one lane connection on the data port. A grant is 128 random
bits, good once, for GRANT_SECONDS, and bound to the identity that asked: every call
on the connection it opens is that identity's, scope by scope, as over gRPC.

Outstanding grants are bounded, per identity and in all, so that asking for grants in
a loop holds no memory: an identity past its share loses its oldest grant.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from tensorwire.wire.lane import GRANT_BYTES
from tensorwire_server.transport.security import Identity

#: Seconds a grant stays good: a client connects as soon as it has one.
GRANT_SECONDS: Final = 10.0
#: Grants outstanding at once, in all and per identity.
MAX_GRANTS: Final = 4096
MAX_GRANTS_PER_IDENTITY: Final = 64


@dataclass(frozen=True)
class Grant:
    """Who a grant's connection serves: its identity (None on a server without
    tokens, where every caller is the anonymous one), and until when it may open."""

    identity: Identity | None
    name: str
    expires: float


class Grants:
    """The grants issued and not yet used or lapsed."""

    def __init__(self, seconds: float = GRANT_SECONDS) -> None:
        self.seconds = seconds
        self._grants: OrderedDict[bytes, Grant] = OrderedDict()
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(32)

    def proof(self, grant: bytes) -> bytes:
        """What the server answers a grant with on its Unix socket: known only to it
        and to the caller it sent the grant to (over the channel), so that client
        knows it reached this server, not a process that took the name later."""
        return hmac.digest(self._key, grant, "sha256")[:GRANT_BYTES]

    def issue(self, identity: Identity | None, name: str) -> bytes:
        """A new grant for ``identity`` (named ``name``: "" for the anonymous caller)."""
        grant = secrets.token_bytes(GRANT_BYTES)
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            mine = [key for key, held in self._grants.items() if held.name == name]
            if len(mine) >= MAX_GRANTS_PER_IDENTITY:
                del self._grants[mine[0]]
            if len(self._grants) >= MAX_GRANTS:
                self._grants.popitem(last=False)
            self._grants[grant] = Grant(identity, name, now + self.seconds)
        return grant

    def claim(self, grant: bytes) -> Grant | None:
        """What ``grant`` opens, once; None when it is unknown, used or lapsed."""
        with self._lock:
            held = self._grants.pop(grant, None)
        if held is None or held.expires < time.monotonic():
            return None
        return held

    def outstanding(self) -> int:
        """Grants issued and neither used nor pruned (tests)."""
        with self._lock:
            return len(self._grants)

    def _prune(self, now: float) -> None:
        while self._grants:
            key, oldest = next(iter(self._grants.items()))
            if oldest.expires >= now:
                return
            del self._grants[key]
