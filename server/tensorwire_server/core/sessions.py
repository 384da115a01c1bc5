"""Sessions: the tensors and trainers a client keeps on the server between calls.

A session belongs to the identity that opened it (the token's name, or the anonymous
identity when the server checks no tokens) and is named by an unguessable id. Every
tensor and trainer in it counts against its quota of device memory, against its
identity's share (sessions and bytes, all its sessions together) and against the
server's caps; a session nobody has used for its TTL is freed by a reaper thread, so a
client that dies leaves nothing behind. Nothing here knows gRPC: errors are
tensorwire's, the servicer maps them.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from tensorwire.errors import NotFoundError, ResourceExhaustedError, shown
from tensorwire.wire.codec import Handle
from tensorwire_server.device.tensors import dtype_name
from tensorwire_server.identities import ANONYMOUS, who
from tensorwire_server.settings import Settings

log = logging.getLogger(__name__)

# A kept view smaller than this share of its storage is copied out, so that a small
# slice does not pin (and count against the quota) a large block.
_COMPACT_SHARE = 0.5


class Holding(Protocol):
    """Something a session holds besides tensors (a trainer): it knows its size."""

    @property
    def bytes(self) -> int: ...


def storage_bytes(tensor: torch.Tensor) -> int:
    """The bytes ``tensor`` keeps alive: its whole storage, not just its view."""
    return int(tensor.untyped_storage().nbytes())


def owned(tensor: torch.Tensor, private: bool = False) -> torch.Tensor:
    """``tensor`` detached, in memory of its own: a copy when it borrows a request's
    buffer (which the server must not keep, and nothing may write to) or when it is a
    small view of a much larger block. ``private``: its memory is the caller's to give
    away (a streamed request's own buffer), though torch did not allocate it."""
    tensor = tensor.detach()
    storage = tensor.untyped_storage()
    # torch.from_numpy storage is not resizable: gRPC's bytes, unless private.
    borrowed = not private and not storage.resizable()
    if borrowed or tensor.nbytes < _COMPACT_SHARE * storage.nbytes():
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


class Ledger:
    """The bytes every session holds, by identity and in all, under one lock: a
    session takes its bytes here as well as from its own quota, so that one identity's
    sessions together stay within ``bytes_per_identity`` and all sessions within
    ``max_bytes`` (None: no such bound). The anonymous identity is bounded by
    ``max_bytes`` only (``identities``)."""

    def __init__(self, bytes_per_identity: int | None = None, max_bytes: int | None = None) -> None:
        self.bytes_per_identity = bytes_per_identity
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self.total = 0

    def take(self, identity: str, size: int, what: str) -> None:
        """Count ``size`` more bytes for ``identity``; RESOURCE_EXHAUSTED naming the
        limit and the identity when that would pass one (nothing counted then)."""
        with self._lock:
            held = self._held.get(identity, 0)
            limit = self.bytes_per_identity
            if identity != ANONYMOUS and limit is not None and held + size > limit:
                raise ResourceExhaustedError(
                    f"{what} would bring the sessions of {who(identity)} to {held + size} "
                    f"bytes together, past its session_bytes_per_token ({limit}; {held} "
                    "held): free handles or trainers, or close sessions"
                )
            if self.max_bytes is not None and self.total + size > self.max_bytes:
                raise ResourceExhaustedError(
                    f"{what} would bring every session together to {self.total + size} "
                    f"bytes, past the server's max_session_bytes ({self.max_bytes}; "
                    f"{held} held by {who(identity)}): free handles or trainers, or "
                    "close sessions"
                )
            self._held[identity] = held + size
            self.total += size

    def give(self, identity: str, size: int) -> None:
        """Count ``size`` bytes fewer for ``identity``."""
        with self._lock:
            left = self._held.get(identity, 0) - size
            if left > 0:
                self._held[identity] = left
            else:
                self._held.pop(identity, None)
            self.total -= size

    def held(self, identity: str) -> int:
        """The bytes ``identity``'s sessions hold together."""
        with self._lock:
            return self._held.get(identity, 0)


@dataclass(frozen=True)
class SessionSummary:
    """What one session holds, for DescribeSession."""

    id: str
    handles: list[Handle]
    trainers: list[str]
    bytes: int
    quota: int
    ttl: float


class Session:
    """One client's tensors and trainers, within a quota of device memory."""

    def __init__(
        self,
        session_id: str,
        owner: str,
        quota: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        ledger: Ledger | None = None,
    ) -> None:
        self.id = session_id
        self.owner = owner
        self.quota = quota
        self.ttl = ttl
        self._clock = clock
        #: Where the session's bytes count beside its quota (its owner's share).
        self._ledger = ledger if ledger is not None else Ledger()
        self.last_used = clock()
        self.closed = False
        self._lock = threading.RLock()
        self._tensors: dict[str, torch.Tensor] = {}
        self._holdings: dict[str, Holding] = {}
        self._sizes: dict[str, int] = {}
        #: What else ends with the session (its shared-memory regions), by what.
        self._on_close: dict[str, Callable[[], None]] = {}

    @property
    def bytes(self) -> int:
        """Device bytes the session holds now."""
        with self._lock:
            return sum(self._sizes.values())

    def touch(self) -> None:
        """Mark the session used now: its TTL starts again."""
        self.last_used = self._clock()

    def expired(self, now: float) -> bool:
        return now - self.last_used > self.ttl

    def keep(self, tensor: torch.Tensor, private: bool = False) -> Handle:
        """Store ``tensor`` and return its handle; RESOURCE_EXHAUSTED past the quota.
        ``private``: see ``owned``."""
        tensor = owned(tensor, private)
        size = storage_bytes(tensor)
        with self._lock:
            self._check_open()
            self._admit(size, f"a {_describe(tensor)} tensor")
            handle_id = _new_id("h")
            self._tensors[handle_id] = tensor
            self._sizes[handle_id] = size
        return Handle(handle_id, dtype_name(tensor), tuple(tensor.shape))

    def tensor(self, handle: str, what: str) -> torch.Tensor:
        """The tensor a handle names; NOT_FOUND if this session has no such handle."""
        with self._lock:
            self._check_open()
            found = self._tensors.get(handle)
        if found is None:
            raise NotFoundError(f"{what}: handle {shown(handle)} is not in this session")
        return found

    def describe(self, handle: str) -> Handle:
        """A handle's dtype and shape."""
        tensor = self.tensor(handle, "handle")
        return Handle(handle, dtype_name(tensor), tuple(tensor.shape))

    def hold(self, prefix: str, holding: Holding) -> str:
        """Store a trainer (or the like) and return its id; RESOURCE_EXHAUSTED past
        the quota."""
        with self._lock:
            self._check_open()
            self._admit(holding.bytes, f"a {prefix} of {holding.bytes} bytes")
            holding_id = _new_id(prefix)
            self._holdings[holding_id] = holding
            self._sizes[holding_id] = holding.bytes
        return holding_id

    def holding(self, holding_id: str, what: str) -> Holding:
        """A stored trainer by id; NOT_FOUND if this session has none such."""
        with self._lock:
            self._check_open()
            found = self._holdings.get(holding_id)
        if found is None:
            raise NotFoundError(f"{what} {shown(holding_id)} is not in this session")
        return found

    def resize(self, holding_id: str, grown: Callable[[], int]) -> None:
        """Count a holding's new size (an optimizer's state appears at its first step);
        RESOURCE_EXHAUSTED past the quota, the holding kept at its old size."""
        with self._lock:
            if holding_id not in self._sizes:
                return  # freed meanwhile
            size = grown()
            extra = size - self._sizes[holding_id]
            if extra > 0:
                self._admit(extra, f"{extra} more bytes for {holding_id}")
            elif extra < 0:
                self._ledger.give(self.owner, -extra)
            self._sizes[holding_id] = size

    def free(self, ids: Iterable[str], missing_ok: bool = False) -> int:
        """Release handles and holdings; the bytes freed. NOT_FOUND names the first id
        this session does not hold, after freeing the others (unless ``missing_ok``)."""
        missing: str | None = None
        freed = 0
        with self._lock:
            self._check_open()
            for item in ids:
                if self._tensors.pop(item, None) is None and self._holdings.pop(item, None) is None:
                    missing = missing if missing is not None else item
                    continue
                freed += self._sizes.pop(item)
            self._ledger.give(self.owner, freed)
        if missing is not None and not missing_ok:
            raise NotFoundError(f"handle {shown(missing)} is not in this session")
        return freed

    def clear(self) -> int:
        """Free everything and refuse further use; the bytes freed."""
        with self._lock:
            freed = sum(self._sizes.values())
            self._tensors.clear()
            self._holdings.clear()
            self._sizes.clear()
            self._ledger.give(self.owner, freed)
            self.closed = True
            ending, self._on_close = list(self._on_close.values()), {}
        for end in ending:
            try:
                end()
            except Exception:  # the rest still ends
                log.exception("session %s…: letting go of what it held failed", self.id[:6])
        return freed

    def on_close(self, what: str, end: Callable[[], None]) -> None:
        """Run ``end`` when the session ends (once per ``what``)."""
        with self._lock:
            self._check_open()
            self._on_close[what] = end

    def summary(self) -> SessionSummary:
        with self._lock:
            self._check_open()
            handles = [Handle(i, dtype_name(t), tuple(t.shape)) for i, t in self._tensors.items()]
            return SessionSummary(
                self.id, handles, list(self._holdings), self.bytes, self.quota, self.ttl
            )

    def _admit(self, size: int, what: str) -> None:
        """Count ``size`` more bytes against the quota, then the owner's share and the
        server's cap (under the session's lock); RESOURCE_EXHAUSTED past any."""
        held = sum(self._sizes.values())
        if held + size > self.quota:
            raise ResourceExhaustedError(
                f"session quota exceeded: {what} would bring the session to {held + size} "
                f"bytes, past its quota of {self.quota} bytes ({held} held); free handles "
                "or trainers, or ask the operator to raise session_quota_bytes"
            )
        self._ledger.take(self.owner, size, what)

    def _check_open(self) -> None:
        if self.closed:
            raise NotFoundError("the session was closed or expired; its handles are gone")


class Sessions:
    """Every open session, and the reaper thread that frees the idle ones. At most
    ``max_sessions`` open, ``sessions_per_identity`` of them one identity's (None: no
    such bound); the bytes they hold, see ``Ledger``."""

    def __init__(
        self,
        quota: int,
        ttl: float,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
        sessions_per_identity: int | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.quota = quota
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.sessions_per_identity = sessions_per_identity
        self.ledger = ledger if ledger is not None else Ledger()
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Sessions:
        """The sessions ``settings`` size: quota, TTL, and the caps per token and in all."""
        return cls(
            settings.session_quota_bytes,
            settings.session_ttl,
            settings.max_sessions,
            sessions_per_identity=settings.max_sessions_per_token,
            ledger=Ledger(settings.session_bytes_per_token, settings.max_session_bytes),
        )

    def open(self, owner: str) -> Session:
        """A new session for ``owner``; RESOURCE_EXHAUSTED when ``owner`` holds its
        share of sessions, or the server is full."""
        self.start()  # the first session starts the reaper
        self.reap()
        wait = f"close one, or wait for idle ones to expire (after {self.ttl:g} s unused)"
        with self._lock:
            limit = self.sessions_per_identity
            if owner != ANONYMOUS and limit is not None:
                held = sum(1 for s in self._sessions.values() if s.owner == owner)
                if held >= limit:
                    raise ResourceExhaustedError(
                        f"{who(owner)} holds {held} sessions, its max_sessions_per_token "
                        f"({limit}); {wait}"
                    )
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhaustedError(
                    f"the server holds its maximum of {self.max_sessions} sessions "
                    f"(max_sessions); {wait}"
                )
            session = Session(
                secrets.token_urlsafe(24),
                owner,
                self.quota,
                self.ttl,
                clock=self._clock,
                ledger=self.ledger,
            )
            self._sessions[session.id] = session
        log.info("session %s… opened for %s", session.id[:6], owner or "anyone")
        return session

    def get(self, session_id: str, owner: str) -> Session:
        """The session ``session_id`` of ``owner``, marked used; NOT_FOUND when it does
        not exist, expired, or belongs to someone else (indistinguishable on purpose)."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise NotFoundError(
                "session not found: it expired, was closed, or never existed; "
                "open a new one (its handles are gone)"
            )
        if session.expired(self._clock()):
            self._drop(session, "expired")
            raise NotFoundError(
                f"session expired after {self.ttl:g} s unused; its handles were freed"
            )
        session.touch()
        return session

    def close(self, session: Session) -> int:
        """End ``session``, freeing everything it holds; the bytes freed."""
        return self._drop(session, "closed")

    def reap(self) -> None:
        """Free every session unused for longer than the TTL."""
        now = self._clock()
        with self._lock:
            idle = [s for s in self._sessions.values() if s.expired(now)]
        for session in idle:
            self._drop(session, "expired")

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def bytes(self) -> int:
        """Device bytes every session together holds."""
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(s.bytes for s in sessions)

    def start(self) -> None:
        """Run the reaper: it looks for idle sessions a few times per TTL."""
        with self._lock:
            if self._reaper is not None or self._stop.is_set():
                return
            self._reaper = threading.Thread(
                target=self._reap_forever, name="tensorwire-sessions", daemon=True
            )
        self._reaper.start()

    def _reap_forever(self) -> None:
        interval = min(max(self.ttl / 4, 0.05), 30.0)
        while not self._stop.wait(interval):
            try:
                self.reap()
            except Exception:  # keep reaping whatever one session did
                log.exception("the session reaper failed")

    def stop(self) -> None:
        """Stop the reaper and free every session."""
        with self._lock:
            self._stop.set()
            reaper = self._reaper
        if reaper is not None:
            reaper.join()
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            self._drop(session, "closed")

    def _drop(self, session: Session, why: str) -> int:
        with self._lock:
            if self._sessions.get(session.id) is not session:
                return 0
            del self._sessions[session.id]
        freed = session.clear()
        log.info("session %s… %s: %d bytes freed", session.id[:6], why, freed)
        return freed


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def _describe(tensor: torch.Tensor) -> str:
    return f"{dtype_name(tensor)} {list(tensor.shape)}"


__all__ = ["Session", "Sessions", "owned"]
