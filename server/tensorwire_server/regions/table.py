"""Every caller's shared-memory regions, both kinds (system and CUDA) in one table, by
caller and then by name: one namespace per caller, one lock and one set of limits per
identity and for the server. The two kinds differ in what a region holds and how it is
read and written (system.py, cuda.py); the bookkeeping, the limits and the checks on
names and placements are this module's, once."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol, TypeVar

from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    shown,
)
from tensorwire_server.identities import ANONYMOUS, who

#: The longest region name.
MAX_NAME: Final = 256
#: How to enable shared memory, for every refusal while it is off.
ENABLE: Final = (
    "shared memory is off on this server: start it with --allow-shared-memory "
    "(TENSORWIRE_ALLOW_SHARED_MEMORY=1) to use it from clients on the same host"
)


class RegionExistsError(FailedPreconditionError):
    """A caller registered a region name twice (ALREADY_EXISTS, as Triton answers)."""

    code = "ALREADY_EXISTS"


@dataclass(frozen=True)
class Placement:
    """Where a tensor lies in shared memory: a region's name, and the offset and byte
    size within the region that a request's parameters give."""

    region: str
    offset: int
    byte_size: int


class Status(Protocol):
    """What every kind's region status says."""

    @property
    def name(self) -> str: ...
    @property
    def byte_size(self) -> int: ...


class Region(Protocol):
    """A region of either kind, as the table keeps it."""

    #: What its kind is called in messages ("system shared-memory", say).
    noun: ClassVar[str]

    @property
    def status(self) -> Status: ...

    def release(self) -> None:
        """Let go of what the region holds (it was unregistered; under the lock)."""


R = TypeVar("R", bound=Region)


def check_name(name: str) -> None:
    """INVALID_ARGUMENT for a region name that is empty, too long or unprintable."""
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise InvalidArgumentError(
            f"region name {shown(name)} must be 1 to {MAX_NAME} printable characters"
        )


def owner_of(identity: str, session: str = "") -> str:
    """Whose regions a call sees: ``identity``'s own, or those it registered in
    ``session`` (let go when the session ends). Both count as ``identity``'s."""
    return f"{identity}\0{session}" if session else identity


def identity_of(owner: str) -> str:
    """The identity an owner (``owner_of``'s) belongs to."""
    return owner.partition("\0")[0]


class RegionTable:
    """Every caller's regions, of both kinds (system and CUDA), by owner (``owner_of``)
    and name: one namespace per owner across both kinds, as in Triton (a tensor names
    its region without saying which kind it is). One lock, under which a name is
    checked and taken at once whatever its kind, and one set of limits, which count
    both kinds: ``max_regions`` and ``bytes_per_identity`` for each identity, its
    sessions' regions included, and ``max_bytes`` for everyone together. Without
    tokens every caller is the one anonymous identity, bounded by the server's caps
    (``max_regions`` regions, ``max_bytes`` bytes).

    The kinds (system.py, cuda.py) register, read and write their own regions here,
    each naming its region class as ``kind``; ``enabled`` False refuses them all
    (``on``: FAILED_PRECONDITION saying how to enable it)."""

    def __init__(
        self, enabled: bool, max_regions: int, max_bytes: int, bytes_per_identity: int
    ) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.bytes_per_identity = bytes_per_identity
        #: Guards the regions and the counts below, and whatever a kind must take from
        #: a region while it is sure to be registered (a descriptor's duplicate, say).
        self.lock = threading.Lock()
        self._regions: dict[str, dict[str, Region]] = {}
        #: Bytes every region spans, all kinds and callers together.
        self.bytes = 0
        #: Regions and bytes each identity holds, its sessions' included.
        self._held: dict[str, tuple[int, int]] = {}

    def on(self) -> None:
        """FAILED_PRECONDITION, saying how to enable it, while shared memory is off."""
        if not self.enabled:
            raise FailedPreconditionError(ENABLE)

    def reserve(self, owner: str, name: str, byte_size: int) -> None:
        """Refuse registering ``name`` before anything is opened: a bad name or size,
        a name taken (of either kind), or no room left."""
        check_name(name)
        if byte_size <= 0:
            raise InvalidArgumentError(f"region {shown(name)}: byte_size must be positive")
        with self.lock:
            self._room(owner, name, byte_size)

    def add(self, owner: str, region: Region) -> None:
        """Register ``region``: the name and the limits checked again with the insert,
        under the one lock (another call, of either kind, may have won meanwhile)."""
        status = region.status
        with self.lock:
            self._room(owner, status.name, status.byte_size)
            self._regions.setdefault(owner, {})[status.name] = region
            self._tally(owner, status.byte_size)

    def unregister(self, kind: type[Region], owner: str, name: str) -> None:
        """Forget ``owner``'s region ``name`` of ``kind`` (empty: all of that kind);
        a name unknown, or of the other kind, is no error (as in Triton)."""
        with self.lock:
            owned = self._regions.get(owner, {})
            mine = [n for n, region in owned.items() if isinstance(region, kind)]
            self._drop(owner, mine if not name else [name] if name in mine else [])

    def forget(self, owner: str) -> None:
        """Let every region of ``owner``, of both kinds, go (its session ended),
        whatever the flag."""
        with self.lock:
            self._drop(owner, list(self._regions.get(owner, {})))

    def close(self) -> None:
        """Let every region go (the server stops)."""
        with self.lock:
            for owner, owned in list(self._regions.items()):
                self._drop(owner, list(owned))

    def listed(self, kind: type[R], owner: str, name: str) -> list[R]:
        """``owner``'s regions of ``kind`` (empty ``name``: all, by name); NOT_FOUND for
        a name ``owner`` has not registered as that kind, whoever else has."""
        with self.lock:
            owned = self._regions.get(owner, {})
            if not name:
                return [region for _, region in sorted(owned.items()) if isinstance(region, kind)]
            region = owned.get(name)
            if not isinstance(region, kind):
                raise NotFoundError(f"no {kind.noun} region {shown(name)} is registered")
            return [region]

    def has(self, kind: type[Region], owner: str, name: str) -> bool:
        """Whether ``owner`` registered a region of ``kind`` called ``name``."""
        with self.lock:
            return isinstance(self._regions.get(owner, {}).get(name), kind)

    def count(self, kind: type[Region]) -> int:
        """Regions of ``kind`` registered, by every caller."""
        with self.lock:
            return sum(
                isinstance(region, kind)
                for owned in self._regions.values()
                for region in owned.values()
            )

    def held(self, identity: str) -> tuple[int, int]:
        """The regions and bytes ``identity`` holds, its sessions' included."""
        with self.lock:
            return self._held.get(identity, (0, 0))

    def placed(self, kind: type[R], owner: str, place: Placement, what: str) -> R:
        """``owner``'s region of ``kind`` the placement names, which must lie within it
        (call under the lock)."""
        region = self._regions.get(owner, {}).get(place.region)
        if not isinstance(region, kind):
            raise NotFoundError(
                f"{what}: no shared-memory region {shown(place.region)} is registered"
            )
        size = region.status.byte_size
        if place.offset < 0 or place.byte_size < 0:
            raise InvalidArgumentError(
                f"{what}: shared_memory_offset and shared_memory_byte_size must not be negative"
            )
        if place.offset + place.byte_size > size:
            raise InvalidArgumentError(
                f"{what}: shared_memory_offset {place.offset} + shared_memory_byte_size "
                f"{place.byte_size} runs past the end of region {shown(place.region)} "
                f"({size} bytes)"
            )
        return region

    def _room(self, owner: str, name: str, byte_size: int) -> None:
        """Refuse ``owner`` registering ``name`` of ``byte_size`` bytes: a name it holds
        already, of either kind, or a limit it would pass (under the lock)."""
        taken = self._regions.get(owner, {}).get(name)
        if taken is not None:
            raise RegionExistsError(
                f"region {shown(name)} is registered already, as a {taken.noun} "
                "region: unregister it first"
            )
        identity = identity_of(owner)
        regions, held = self._held.get(identity, (0, 0))
        if regions >= self.max_regions:
            raise ResourceExhaustedError(
                f"{who(identity)} holds {regions} shared-memory regions (its sessions' "
                f"included), its max_shared_memory_regions ({self.max_regions}): unregister "
                "some first"
            )
        if identity != ANONYMOUS and held + byte_size > self.bytes_per_identity:
            raise ResourceExhaustedError(
                f"registering {byte_size} more bytes would bring {who(identity)} to "
                f"{held + byte_size} bytes of shared-memory regions (its sessions' "
                f"included), past its shared_memory_bytes_per_token ({self.bytes_per_identity})"
                f"; {held} are registered"
            )
        if self.bytes + byte_size > self.max_bytes:
            raise ResourceExhaustedError(
                f"registering {byte_size} more bytes would pass the server's "
                f"max_shared_memory_bytes ({self.max_bytes}); {self.bytes} are registered "
                f"by every caller together ({held} by {who(identity)})"
            )

    def _tally(self, owner: str, byte_size: int, regions: int = 1) -> None:
        """Count ``regions`` more regions of ``owner`` spanning ``byte_size`` more bytes
        (negative: fewer; under the lock)."""
        identity = identity_of(owner)
        held_regions, held = self._held.get(identity, (0, 0))
        held_regions, held = held_regions + regions, held + byte_size
        if held_regions:
            self._held[identity] = (held_regions, held)
        else:
            self._held.pop(identity, None)
        self.bytes += byte_size

    def _drop(self, owner: str, names: list[str]) -> None:
        """Let ``owner``'s regions ``names`` go (under the lock)."""
        owned = self._regions.get(owner, {})
        for each in names:
            region = owned.pop(each)
            self._tally(owner, -region.status.byte_size, -1)
            region.release()
        if not owned:
            self._regions.pop(owner, None)
