"""Every caller's shared-memory regions of one kind (system or CUDA), by caller and
then by name, within the server's limits. The two kinds differ in what a region holds
and how it is read and written; the bookkeeping, the limits and the checks on names
and placements are this module's, once."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, Protocol, TypeVar

from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    shown,
)

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


class Registered(Protocol):
    """A region of any kind, as the table keeps it."""

    @property
    def status(self) -> Status: ...


R = TypeVar("R", bound=Registered)


def check_name(name: str) -> None:
    """INVALID_ARGUMENT for a region name that is empty, too long or unprintable."""
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise InvalidArgumentError(
            f"region name {shown(name)} must be 1 to {MAX_NAME} printable characters"
        )


class RegionTable(Generic[R]):
    """Regions of one kind: ``max_regions`` per caller, ``max_bytes`` registered by all
    together. ``enabled`` False refuses everything (FAILED_PRECONDITION saying how to
    enable it). Subclasses register, read and write; ``_release`` lets a region go."""

    #: What the kind is called in messages.
    noun: ClassVar[str] = "shared-memory"

    def __init__(self, enabled: bool, max_regions: int, max_bytes: int) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._regions: dict[str, dict[str, R]] = {}
        self._bytes = 0
        #: The other kind's table: region names are one namespace across both, as in
        #: Triton (a tensor names its region without saying which kind it is).
        self.sibling: RegionTable[Any] | None = None
        # Guards the tables, and whatever a kind must take from a region while it is
        # sure to be registered (a descriptor's duplicate, say).
        self._lock = threading.Lock()

    def _on(self) -> None:
        if not self.enabled:
            raise FailedPreconditionError(ENABLE)

    def _release(self, region: R) -> None:
        """Let go of what ``region`` holds (it was unregistered; under the lock)."""

    def _reserve(self, owner: str, name: str, byte_size: int) -> None:
        """Refuse registering ``name`` before anything is opened: a bad name or size,
        a name taken, or no room left."""
        check_name(name)
        if byte_size <= 0:
            raise InvalidArgumentError(f"region {shown(name)}: byte_size must be positive")
        if self.sibling is not None and self.sibling.has(owner, name):
            raise RegionExistsError(
                f"region {shown(name)} is registered already, as a {self.sibling.noun} "
                "region: unregister it first"
            )
        with self._lock:
            self._room(owner, name, byte_size)

    def _add(self, owner: str, region: R) -> None:
        """Register ``region`` (the limits checked again: another call may have won)."""
        status = region.status
        with self._lock:
            self._room(owner, status.name, status.byte_size)
            self._regions.setdefault(owner, {})[status.name] = region
            self._bytes += status.byte_size

    def _room(self, owner: str, name: str, byte_size: int) -> None:
        owned = self._regions.get(owner, {})
        if name in owned:
            raise RegionExistsError(
                f"region {shown(name)} is registered already: unregister it first"
            )
        if len(owned) >= self.max_regions:
            raise ResourceExhaustedError(
                f"{len(owned)} regions registered, the server's max_shared_memory_regions "
                "for one caller: unregister some first"
            )
        if self._bytes + byte_size > self.max_bytes:
            raise ResourceExhaustedError(
                f"registering {byte_size} more bytes would pass the server's "
                f"max_shared_memory_bytes ({self.max_bytes}); {self._bytes} are registered"
            )

    def unregister(self, owner: str, name: str) -> None:
        """Forget ``owner``'s region ``name`` (empty: all of them); an unknown name is
        no error (as in Triton)."""
        self._on()
        with self._lock:
            owned = self._regions.get(owner, {})
            gone = list(owned) if not name else [name] if name in owned else []
            for each in gone:
                region = owned.pop(each)
                self._bytes -= region.status.byte_size
                self._release(region)
            if not owned:
                self._regions.pop(owner, None)

    def forget(self, owner: str) -> None:
        """Let every region of ``owner`` go (its session ended), whatever the flag."""
        with self._lock:
            for region in self._regions.pop(owner, {}).values():
                self._bytes -= region.status.byte_size
                self._release(region)

    def _listed(self, owner: str, name: str) -> list[R]:
        """``owner``'s regions (empty ``name``: all, by name); NOT_FOUND for a name
        ``owner`` has not registered, whoever else has."""
        self._on()
        with self._lock:
            owned = self._regions.get(owner, {})
            if not name:
                return [owned[n] for n in sorted(owned)]
            if name not in owned:
                raise NotFoundError(f"no {self.noun} region {shown(name)} is registered")
            return [owned[name]]

    def has(self, owner: str, name: str) -> bool:
        """Whether ``owner`` registered a region of this kind called ``name``."""
        with self._lock:
            return name in self._regions.get(owner, {})

    def count(self) -> int:
        """Regions registered, by every caller."""
        with self._lock:
            return sum(len(owned) for owned in self._regions.values())

    def close(self) -> None:
        """Let every region go (the server stops)."""
        with self._lock:
            for owned in self._regions.values():
                for region in owned.values():
                    self._release(region)
            self._regions.clear()
            self._bytes = 0

    def _placed(self, owner: str, place: Placement, what: str) -> R:
        """``owner``'s region of the placement, which must lie within it (call under
        the lock)."""
        self._on()
        region = self._regions.get(owner, {}).get(place.region)
        if region is None:
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
