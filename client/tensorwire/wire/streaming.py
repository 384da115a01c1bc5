"""Streaming transfer: one message of any size as a header part, then payload chunks.

Protobuf caps a message at 2 GiB and gRPC's unary path holds a whole message (often
twice) in memory, so large requests and responses travel through the *Stream RPCs:
the header is the ordinary message with every Tensor's data empty, and the chunks
carry the payloads back to back in the order their tensors occur in the header. The
receiver allocates every tensor from the header and copies each chunk into place, so
a transfer costs one buffer per tensor and one chunk in flight, never a list of
chunks joined at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final, Generic

import numpy as np
from google.protobuf.message import DecodeError

from tensorwire.errors import InvalidArgumentError, ResourceExhaustedError
from tensorwire.wire import framing
from tensorwire.wire.codec import Encoder, M, Received, layout, tensors_in

#: Bytes of payload per chunk message. Measured on loopback (docs/performance.md):
#: 1 MiB chunks beat 256 KiB (per-message overhead) and 4 MiB+ (cache misses).
DEFAULT_CHUNK_SIZE: Final = 1 << 20

#: Called with (payload bytes so far, payload bytes in all) as a transfer advances.
Advance = Callable[[int, int], None]

#: Allocates the destination of one streamed tensor: (dtype, shape, name) -> array.
Allocate = Callable[[np.dtype[Any], tuple[int, ...], str], np.ndarray]

#: Hears that bytes [start, stop) of the k-th array ``Allocate`` returned have arrived:
#: (k, start, stop). Each array fills in order, so the ranges of one k ascend without gaps.
Landed = Callable[[int, int, int], None]


def allocate_host(dtype: np.dtype[Any], shape: tuple[int, ...], name: str) -> np.ndarray:
    """A fresh host array; RESOURCE_EXHAUSTED when the memory is not there."""
    try:
        return np.empty(shape, dtype)
    except (MemoryError, ValueError):
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        raise ResourceExhaustedError(f"{name}: cannot allocate {nbytes} bytes") from None


def parts(
    encoder: Encoder[Any], chunk_size: int = DEFAULT_CHUNK_SIZE, advance: Advance | None = None
) -> Iterator[bytes]:
    """The serialized *Part messages of ``encoder``'s message: header, then chunks of
    ``chunk_size`` payload bytes (the last may be shorter). Each chunk is one copy of
    its bytes; ``advance`` hears of each chunk once gRPC has taken it."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    header, payloads = encoder.header()
    yield header_part(header)
    yield from chunk_parts(payloads, chunk_size, advance)


def header_part(header: bytes) -> bytes:
    """The *Part message that carries a streamed message's header."""
    return framing.part(framing.PART_HEADER, [header], len(header))


def chunk_parts(
    payloads: list[memoryview], chunk_size: int, advance: Advance | None = None
) -> Iterator[bytes]:
    """The chunk parts that carry ``payloads`` back to back, as ``parts`` makes them."""
    total = sum(p.nbytes for p in payloads)
    done = 0
    if advance is not None:
        advance(0, total)
    pending: list[memoryview] = []
    size = 0
    for payload in payloads:
        pos = 0
        while pos < payload.nbytes:
            take = min(chunk_size - size, payload.nbytes - pos)
            pending.append(payload[pos : pos + take])
            size += take
            pos += take
            if size == chunk_size:
                yield framing.part(framing.PART_CHUNK, pending, size)
                done += size
                pending, size = [], 0
                if advance is not None:
                    advance(done, total)
    if size:
        yield framing.part(framing.PART_CHUNK, pending, size)
        if advance is not None:
            advance(total, total)


class StreamReceiver(Generic[M]):
    """Reassembles one streamed ``cls`` message from its serialized parts.

    ``feed`` each part as it arrives, then ``finish``. Every error is an
    InvalidArgumentError (or ResourceExhaustedError for an allocation) naming what was
    wrong; dropping the receiver frees everything it allocated.
    """

    def __init__(
        self,
        cls: type[M],
        allocate: Allocate = allocate_host,
        advance: Advance | None = None,
        landed: Landed | None = None,
    ) -> None:
        self._cls = cls
        #: Allocates each tensor when the header arrives; may be replaced before then
        #: (the same-host path allocates the response in shared memory).
        self.allocate = allocate
        self._advance = advance
        self._landed = landed
        self._message: M | None = None
        self._views: list[memoryview] = []
        self._allocated: list[int] = []  # per view (stream order), its allocation index
        self._slot = 0  # the view being filled
        self._offset = 0  # bytes of it filled
        self.total = 0
        self.received = 0
        #: Hears the header's tensors as they are counted, before any is decoded, and
        #: may refuse there (the server's max_request_tensors).
        self.count: Callable[[int], None] | None = None

    def feed(self, raw: bytes) -> None:
        """Take the next serialized part."""
        self.take(*framing.split_part(raw))

    def take(self, number: int, body: memoryview) -> None:
        """Take the next part, already split into its field number and body (by a
        caller that looked at the number first)."""
        if self._message is None:
            if number != framing.PART_HEADER:
                raise InvalidArgumentError("malformed stream: a chunk came before the header")
            self._start(body)
        elif number == framing.PART_HEADER:
            raise InvalidArgumentError("malformed stream: a second header")
        elif number != framing.PART_CHUNK:
            raise InvalidArgumentError("malformed stream: a data-plane part out of place")
        else:
            self._write(body)

    @property
    def started(self) -> bool:
        """Whether the header has arrived (and every buffer is allocated)."""
        return self._message is not None

    def fill(self, read_into: Callable[[memoryview], int]) -> None:
        """Read every payload byte still missing straight into its buffer with
        ``read_into`` (a data connection's ``recv_into``): no copy in user space.
        ConnectionError when it returns 0 (the peer closed) before the end."""
        while self._slot < len(self._views):
            view = self._views[self._slot]
            if self._offset == view.nbytes:  # an empty tensor
                self._slot += 1
                self._offset = 0
                continue
            n = read_into(view[self._offset :])
            if not n:
                raise ConnectionError(
                    f"the data connection closed after {self.received} of the "
                    f"{self.total} payload bytes"
                )
            if self._landed is not None and self._allocated[self._slot] >= 0:
                self._landed(self._allocated[self._slot], self._offset, self._offset + n)
            self._offset += n
            self.received += n
            if self._advance is not None:
                self._advance(self.received, self.total)

    @property
    def payloads(self) -> list[tuple[int, memoryview]]:
        """Each payload's buffer in stream order, with the index of its allocation
        (``allocate``'s k-th call; -1 for a tensor held on the server)."""
        return list(zip(self._allocated, self._views, strict=True))

    def adopt(self, buffers: list[memoryview]) -> None:
        """Take ``buffers`` (one per non-empty payload, in stream order, each its
        payload's size, writable) as the payloads themselves, in place of the buffers
        allocated for them: another party wrote them (shared memory, mapped)."""
        self._expect_whole()
        slots = [i for i, view in enumerate(self._views) if view.nbytes]
        if len(buffers) != len(slots):
            raise InvalidArgumentError(f"{len(buffers)} buffers for {len(slots)} payloads")
        for slot, buffer in zip(slots, buffers, strict=True):
            if buffer.nbytes != self._views[slot].nbytes or buffer.readonly:
                raise InvalidArgumentError(
                    f"payload {slot}: a buffer of {buffer.nbytes} bytes for "
                    f"{self._views[slot].nbytes}"
                )
            self._views[slot] = buffer.cast("B")
        self.filled()

    def filled(self) -> None:
        """Every payload byte is in place: written into the allocated buffers by
        another party, or adopted."""
        self._expect_whole()
        self._slot = len(self._views)
        self.received = self.total
        if self._advance is not None:
            self._advance(self.total, self.total)

    def _expect_whole(self) -> None:
        if self._message is None or self.received:
            raise InvalidArgumentError("malformed stream: payloads placed out of turn")

    def finish(self) -> Received[M]:
        """The whole message, once the stream has ended; its arrays are writable."""
        if self._message is None:
            raise InvalidArgumentError("malformed stream: it ended before its header")
        if self.received < self.total:
            raise InvalidArgumentError(
                f"truncated stream: it ended after {self.received} of the {self.total} "
                "payload bytes its header declares"
            )
        return Received(self._message, self._views, owned=True)

    def close(self) -> None:
        """Let go of every buffer this receiver allocated (a finished message keeps
        its own references)."""
        self._views = []
        self._allocated = []
        self._message = None

    def _start(self, header: memoryview) -> None:
        small, count = framing.number_payloads(header, self._cls.DESCRIPTOR, self.count)
        try:
            message = self._cls.FromString(small)
        except DecodeError as exc:
            raise InvalidArgumentError(
                f"malformed {self._cls.DESCRIPTOR.name} stream header: {exc}"
            ) from None
        views: list[memoryview | None] = [None] * count
        allocated = [0] * count
        k = 0
        for name, tensor in tensors_in(message):
            slot = framing.placeholder_index(tensor.data)
            if tensor.handle:  # names a tensor held on the server: no bytes follow
                views[slot] = memoryview(bytearray())
                allocated[slot] = -1
                continue
            dtype, shape, _ = layout(tensor, name)
            arr = self.allocate(dtype, shape, name)
            # A flat byte view, writable: chunks land here and nowhere else.
            views[slot] = memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            allocated[slot] = k
            k += 1
        if any(v is None for v in views):  # pragma: no cover - the two walks agree
            raise InvalidArgumentError("malformed stream header: a tensor out of place")
        self._views = [v for v in views if v is not None]
        self._allocated = allocated
        self.total = sum(v.nbytes for v in self._views)
        self._message = message
        if self._advance is not None:
            self._advance(0, self.total)

    def _write(self, body: memoryview) -> None:
        size = body.nbytes
        if self.received + size > self.total:
            raise InvalidArgumentError(
                f"overlong stream: it carries more than the {self.total} payload bytes "
                "its header declares"
            )
        pos = 0
        while pos < size:
            view = self._views[self._slot]
            take = min(view.nbytes - self._offset, size - pos)
            view[self._offset : self._offset + take] = body[pos : pos + take]
            if self._landed is not None and self._allocated[self._slot] >= 0:
                self._landed(self._allocated[self._slot], self._offset, self._offset + take)
            pos += take
            self._offset += take
            if self._offset == view.nbytes:
                self._slot += 1
                self._offset = 0
        self.received += size
        if self._advance is not None:
            self._advance(self.received, self.total)
