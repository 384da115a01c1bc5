"""What server reflection looks descriptors up in: the v2 protocol's own descriptor pool
(kept apart from protobuf's default one, where tritonclient declares the same names),
then the default pool, which holds every other service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from google.protobuf import descriptor_pool

from tensorwire_server.kserve.v2 import grpc_service_pb2 as pb


class Pools:
    """Descriptor pools searched in order, with the lookups gRPC's reflection service
    makes; KeyError when none has the symbol."""

    def __init__(self, *pools: Any) -> None:
        self.pools = pools

    def _first(self, find: Callable[[Any], Any]) -> Any:
        for pool in self.pools:
            try:
                return find(pool)
            except KeyError:
                continue
        raise KeyError("not found in any descriptor pool")

    def FindFileByName(self, name: str) -> Any:
        return self._first(lambda pool: pool.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        return self._first(lambda pool: pool.FindFileContainingSymbol(symbol))

    def FindMessageTypeByName(self, name: str) -> Any:
        return self._first(lambda pool: pool.FindMessageTypeByName(name))

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        return self._first(lambda pool: pool.FindExtensionByNumber(message, number))

    def FindAllExtensions(self, message: Any) -> Any:
        return self._first(lambda pool: pool.FindAllExtensions(message))


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """The pools reflection describes the server's services from (duck-typed: the
    reflection service makes only the lookups Pools has)."""
    return cast(
        descriptor_pool.DescriptorPool, Pools(pb.DESCRIPTOR.pool, descriptor_pool.Default())
    )
