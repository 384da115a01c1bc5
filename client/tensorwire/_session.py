"""A client's session on the server: its state, what it holds there (tensors,
trainers), and the session protocol as flows both twins drive.

A client opens one session, lazily, on the first call that needs one: a call naming a
remote tensor, keeping its results, running a program or a trainer. Every such call
goes to one replica with the session's id in its metadata; before it, the ids garbage
collection queued are freed; after a NOT_FOUND, the client asks whether the session
itself is gone, and says so.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final, Protocol

import grpc

from tensorwire import _messages as messages
from tensorwire._flow import Flow, Locked, Route, Send
from tensorwire._transport.channel import SecretMetadata
from tensorwire.errors import NotFoundError, TensorwireError
from tensorwire.types import ProgressCallback, Timeout
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.codec import Encoder, Received
from tensorwire.wire.protocol import SESSION_KEY

#: Seconds ``close`` waits for CloseSession, and a check for a lost session waits.
SESSION_CALL_TIMEOUT: Final = 2.0


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


class Owner(Protocol):
    """What a held object needs of its client: whether it is closed."""

    @property
    def closed(self) -> bool: ...


class Lease:
    """Where a held object lives: its client, its session and its id there; whether it
    was freed. Garbage collection of the object queues its id for the client to free
    on its next call, instead of calling the server from a finalizer."""

    def __init__(self, held: Held, client: Owner, session: SessionState, id: str) -> None:
        self.client = client
        self.session = session
        self.id = id
        self._held = weakref.ref(held)
        self._what = held.what
        self._freed = False
        self._finalizer = weakref.finalize(held, session.pending.append, id)
        self._finalizer.atexit = False  # at exit the session ends anyway

    @property
    def freed(self) -> bool:
        """Whether it was freed (by ``free``, or by the end of its session)."""
        return self._freed or self.session.ended is not None

    def release(self) -> bool:
        """Mark it freed here; True when the server still holds it and must be told."""
        if self._freed:
            return False
        self._freed = True
        self._finalizer.detach()
        return self.session.ended is None and not self.client.closed

    def usable(self, client: Owner | None = None) -> SessionState:
        """Its session, after checking that it can still be used (by ``client``)."""
        held = self._held()
        if client is not None and client is not self.client:
            raise ValueError(f"{held!r} belongs to another client: {self.client!r}")
        if self.client.closed:
            raise RuntimeError(f"{held!r}: its client is closed, and its session with it")
        if self._freed:
            raise NotFoundError(f"{held!r}: this {self._what} was freed")
        if self.session.ended is not None:
            raise NotFoundError(f"{held!r} is gone: its session {self.session.ended}")
        return self.session


class Held:
    """Something held in a session (a tensor, a trainer), released by ``free``, by the
    end of its session, or by garbage collection; ``lease`` says where it lives."""

    what: ClassVar[str] = "object"

    def __init__(self, client: Owner, session: SessionState, id: str) -> None:
        #: Its client, session and id there.
        self.lease = Lease(self, client, session, id)

    @property
    def freed(self) -> bool:
        """Whether it was freed (by ``free``, or by the end of its session)."""
        return self.lease.freed


class SessionKeeper:
    """One client's session, as flows: ``call`` makes a call in it (opening it on first
    use), ``free`` releases ids, ``end`` closes it. ``route`` gives the route of a call
    in a session: the pinned replica, the session's metadata."""

    def __init__(
        self,
        target: str,
        metadata: Any,
        route: Callable[[Any, bool | None, bool], Route],
    ) -> None:
        self.target = target
        self.current: SessionState | None = None
        self._metadata = metadata
        self._route = route

    def send(
        self, session: SessionState | None, method: str, encoder: Encoder[Any], timeout: Timeout
    ) -> Send:
        """A call of the protocol's own in ``session`` (None: the one that opens it,
        with the client's metadata)."""
        metadata = self._metadata if session is None else session.metadata
        return Send(method, encoder, timeout, route=self._route(metadata, None, False))

    def call(
        self,
        method: str,
        encoder: Encoder[Any],
        timeout: Timeout,
        progress: ProgressCallback | None = None,
        *,
        keep: bool = False,
        stream: bool = False,
        carry: Callable[[list[str]], None] | None = None,
    ) -> Flow[tuple[SessionState, Received[Any]]]:
        """Make a call in this client's session, opening it if need be; ``keep``: the
        call makes handles, so it is never sent twice; ``stream``: its response is
        known to be large; ``carry``: puts the ids garbage collection queued into the
        request (a Run's ``free``), to be freed without a Free call of their own."""
        session = yield from self.open(timeout, flush=carry is None)
        carried: list[str] = []
        if carry is not None:
            carried = session.take_pending()
            if carried:
                carry(carried)
        route = self._route(session.metadata, False if keep else None, stream)
        try:
            received = yield Send(method, encoder, timeout, progress, route)
        except NotFoundError as exc:
            session.pending.extend(carried)  # freed by the next call (again: harmless)
            if (yield from self._exists(session)):
                raise
            raise self._lost(session) from exc
        except BaseException:
            session.pending.extend(carried)
            raise
        return session, received

    def open(self, timeout: Timeout, flush: bool = True) -> Flow[SessionState]:
        """The session, opened on first use; frees what garbage collection queued
        (``flush``; else the call carries them)."""
        session = self.current
        if session is None:
            session = yield Locked(self._open_once(timeout))
        ids = session.take_pending() if flush else []
        if ids:
            yield from self.free(session, ids, timeout)
        return session

    def _open_once(self, timeout: Timeout) -> Flow[SessionState]:
        """Open the session unless a call that held the lock before did (run Locked)."""
        session = self.current
        if session is None:
            received = yield self.send(
                None, "OpenSession", Encoder(pb.OpenSessionRequest()), timeout
            )
            m = received.message
            metadata = SecretMetadata((*(self._metadata or ()), (SESSION_KEY, m.session)))
            session = self.current = SessionState(m.session, m.quota_bytes, m.ttl_seconds, metadata)
        return session

    def free(self, session: SessionState, ids: list[str], timeout: Timeout) -> Flow[None]:
        """Free ``ids`` in ``session``; queued again for the next call if this fails."""
        try:
            yield self.send(session, "Free", messages.free_request(ids), timeout)
        except NotFoundError:
            pass  # one was gone already (the others are freed all the same), or all were
        except BaseException:
            session.pending.extend(ids)  # freed on the next call instead
            raise

    def release(self, client: Owner, items: Sequence[Any], timeout: Timeout) -> Flow[None]:
        """Free ``items`` (remote tensors and trainers of ``client``), with whatever
        garbage collection queued, in one call; freeing twice is harmless."""
        session = None
        ids: list[str] = []
        for item in items:
            if not isinstance(item, Held):
                raise TypeError(f"free takes remote tensors and trainers, not {type(item)}")
            if item.lease.client is not client:
                raise ValueError(f"{item!r} belongs to another client: {item.lease.client!r}")
            if item.lease.release():
                session = item.lease.session
                ids.append(item.lease.id)
        if session is not None:
            yield from self.free(session, [*session.take_pending(), *ids], timeout)

    def _exists(self, session: SessionState) -> Flow[bool]:
        """Whether the server still has ``session``; True when it cannot tell."""
        encoder = Encoder(pb.DescribeSessionRequest())
        try:
            yield self.send(session, "DescribeSession", encoder, SESSION_CALL_TIMEOUT)
        except NotFoundError:
            return False
        except TensorwireError:
            pass
        return True

    def _lost(self, session: SessionState) -> NotFoundError:
        """The error for a call whose session the server no longer has; the client's
        next stateful call opens a new one, and the old one's tensors stay unusable."""
        session.ended = "expired on the server"
        if self.current is session:  # a new one opens only once this is None
            self.current = None
        return NotFoundError(
            f"the server at {self.target} no longer has this client's session (unused "
            f"for longer than its {session.ttl_seconds:g} s TTL, or the server restarted): "
            "its tensors and trainers are gone. The next call opens a new session."
        )

    def end(self) -> Flow[None]:
        """Close the session, best effort: the server frees it by its TTL anyway."""
        session, self.current = self.current, None
        if session is None or session.ended is not None:
            return
        session.ended = "was closed"
        encoder = Encoder(pb.CloseSessionRequest())
        with contextlib.suppress(TensorwireError, grpc.RpcError):
            yield self.send(session, "CloseSession", encoder, SESSION_CALL_TIMEOUT)
