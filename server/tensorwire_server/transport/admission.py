"""How many calls may run at once, server-wide and per identity: the Gate's budgets.

gRPC's own ``maximum_concurrent_rpcs`` counts every RPC alike, so 64 health Watch
streams without a token used to take the capacity authenticated calls need. Here
public calls (health, KServe's ServerLive and ServerReady) have budgets of their own,
and every other call counts against the server's caps and its caller's share of them.
Each call is admitted or refused as it arrives, from its headers, before a byte of
its request is read.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Final

from tensorwire_server.settings import Settings

#: Health's Watch: a public stream that stays open as long as its client likes.
WATCH: Final = "/grpc.health.v1.Health/Watch"


@dataclass(frozen=True)
class Quotas:
    """The budgets (the settings of the same names)."""

    max_concurrent_requests: int
    max_concurrent_streams: int
    max_calls_per_token: int
    max_streams_per_token: int
    max_public_calls: int
    max_health_watches: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Quotas:
        """The budgets ``settings`` set."""
        return cls(
            settings.max_concurrent_requests,
            settings.max_concurrent_streams,
            settings.max_calls_per_token,
            settings.max_streams_per_token,
            settings.max_public_calls,
            settings.max_health_watches,
        )


#: One budget a call takes a place in: its key in the counts, its size, the sentence
#: a refusal says, and for a token's share, the server-wide budget it is a share of
#: with how many of its places may be taken before none are spare past a share
#: (its cap less the share), else None.
_Place = tuple[str, int, str, tuple[str, int] | None]


class Admission:
    """What runs at once, by budget; a call over any of its budgets is refused with a
    message naming the limit, and holds none of them.

    A token's share is what it is sure of, not all it may use: past its share a token
    may take more of the server's places while at least a share's worth stay free
    for the others (work-conserving, so that one busy token on an idle server is not
    held to a fraction of it). So one token alone gets the server's cap less one
    share, and whoever comes next finds a share free."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self._held: Counter[str] = Counter()
        # Calls arrive on the event loop, but a done callback may end one elsewhere.
        self._lock = threading.Lock()

    def places(self, method: str, public: bool, stream: bool, identity: str | None) -> list[_Place]:
        """The budgets a call of ``method`` takes a place in. ``identity``: its token's
        name, or None when the server has no tokens: then nobody can be told apart (a
        peer's address and port are the client's to choose, and on loopback or a Unix
        socket every client has the same), and only the server-wide caps apply."""
        q = self.quotas
        if public:
            if method == WATCH:
                return [
                    (
                        "watches",
                        q.max_health_watches,
                        f"{q.max_health_watches} health Watch streams are open, the "
                        "server's max_health_watches; ask Check instead",
                        None,
                    )
                ]
            return [
                (
                    "public",
                    q.max_public_calls,
                    f"{q.max_public_calls} public calls (health, ServerLive, ServerReady) "
                    "are running, the server's max_public_calls; try again shortly",
                    None,
                )
            ]
        places: list[_Place] = [
            (
                "calls",
                q.max_concurrent_requests,
                f"the server is running {q.max_concurrent_requests} calls, its "
                "max_concurrent_requests; try again later",
                None,
            )
        ]
        if stream:
            places.append(
                (
                    "streams",
                    q.max_concurrent_streams,
                    f"{q.max_concurrent_streams} streams are open, the server's "
                    "max_concurrent_streams; try again later",
                    None,
                )
            )
        if identity is not None:
            places.append(
                (
                    f"calls/{identity}",
                    q.max_calls_per_token,
                    f"token {identity!r} has {q.max_calls_per_token} calls in progress, "
                    "its share (max_calls_per_token), and the server has no more to "
                    "spare; wait for one to finish",
                    ("calls", q.max_concurrent_requests - q.max_calls_per_token),
                )
            )
            if stream:
                places.append(
                    (
                        f"streams/{identity}",
                        q.max_streams_per_token,
                        f"token {identity!r} has {q.max_streams_per_token} streams open, "
                        "its share (max_streams_per_token), and the server has no more "
                        "to spare; close one first",
                        ("streams", q.max_concurrent_streams - q.max_streams_per_token),
                    )
                )
        return places

    def enter(self, places: list[_Place]) -> tuple[str, ...] | str:
        """Take a place in each budget: the keys to ``leave`` later, or the refusal's
        message when one is full (then none is taken)."""
        held = self._held
        with self._lock:
            for key, limit, refusal, spare in places:
                if held[key] < limit:
                    continue
                if spare is not None and held[spare[0]] < spare[1]:
                    continue  # past its share, while a share stays free for others
                return refusal
            for key, _, _, _ in places:
                held[key] += 1
        return tuple(key for key, _, _, _ in places)

    def leave(self, keys: tuple[str, ...]) -> None:
        """Give back the places ``enter`` took."""
        held = self._held
        with self._lock:
            for key in keys:
                held[key] -= 1
                if not held[key]:
                    del held[key]  # identities come and go: keep no zeros

    def held(self, key: str) -> int:
        """Places taken in budget ``key`` (tests, metrics)."""
        with self._lock:
            return self._held[key]
