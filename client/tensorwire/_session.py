"""A client's session on the server, and the base of what it holds there (tensors, trainers)."""

from __future__ import annotations

import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

from tensorwire.errors import NotFoundError

if TYPE_CHECKING:
    from tensorwire._base import BaseClient


class SessionState:
    """One session on the server as a client knows it: its id and limits, the call
    metadata that names it, and the ids garbage collection let go of."""

    def __init__(self, id: str, quota_bytes: int, ttl_seconds: float, metadata: Any) -> None:
        self.id = id
        self.quota_bytes = quota_bytes
        self.ttl_seconds = ttl_seconds
        #: The client's own metadata (its token) and the session's id.
        self.metadata = metadata
        # Filled by finalizers, which run in whatever thread collects garbage, at any
        # allocation, even one made while a lock is held: deque appends and pops are
        # atomic and take no lock, so a finalizer can never deadlock a call.
        self.pending: deque[str] = deque()
        #: Why the session is over ("closed", "expired ..."); None while it lasts.
        self.ended: str | None = None

    def take_pending(self) -> list[str]:
        """The ids finalizers queued since the last call, removed from the queue."""
        ids: list[str] = []
        while True:
            try:
                ids.append(self.pending.popleft())
            except IndexError:
                return ids


class Held:
    """Something held in a session (a tensor, a trainer), released by ``free``, by
    the end of its session, or by garbage collection, which queues its id for the
    client to free on its next call instead of calling the server from a finalizer."""

    _what: ClassVar[str] = "object"

    def __init__(self, client: BaseClient, session: SessionState, id: str) -> None:
        self._client = client
        self._session = session
        self._id = id
        self._freed = False
        self._finalizer = weakref.finalize(self, session.pending.append, id)
        self._finalizer.atexit = False  # at exit the session ends anyway

    @property
    def freed(self) -> bool:
        """Whether it was freed (by ``free``, or by the end of its session)."""
        return self._freed or self._session.ended is not None

    def _release(self) -> bool:
        """Mark it freed here; True when the server still holds it and must be told."""
        if self._freed:
            return False
        self._freed = True
        self._finalizer.detach()
        return self._session.ended is None and not self._client.closed

    def _usable(self, client: BaseClient | None = None) -> SessionState:
        """Its session, after checking that it can still be used (by ``client``)."""
        if client is not None and client is not self._client:
            raise ValueError(f"{self!r} belongs to another client: {self._client!r}")
        if self._client.closed:
            raise RuntimeError(f"{self!r}: its client is closed, and its session with it")
        if self._freed:
            raise NotFoundError(f"{self!r}: this {self._what} was freed")
        if self._session.ended is not None:
            raise NotFoundError(f"{self!r} is gone: its session {self._session.ended}")
        return self._session
