"""One request's shared memory, both kinds: which of its caller's regions a placement
names (system or CUDA: one namespace, as in Triton), and reading inputs from them and
writing outputs to them."""

from __future__ import annotations

from typing import Any

import torch

from tensorwire.errors import shown
from tensorwire.v1 import tensorwire_pb2 as twpb
from tensorwire.wire.codec import decode_array, layout
from tensorwire_server.core.service import Service
from tensorwire_server.device.tensors import numpy_dtype
from tensorwire_server.engine.engine import Export, as_array
from tensorwire_server.kserve import codec
from tensorwire_server.regions.table import Placement


class Regions:
    """The regions of ``owner`` (the caller) as one request uses them."""

    def __init__(self, service: Service, owner: str) -> None:
        self.system = service.shared_memory
        self.cuda = service.cuda_memory
        self.owner = owner

    def _on_device(self, place: Placement) -> bool:
        return self.cuda.has(self.owner, place.region)

    def check_output(self, place: Placement, what: str) -> None:
        """Refuse, before the model runs, an output placed where it cannot go."""
        if self._on_device(place):
            self.cuda.check(self.owner, place, what)
        else:
            self.system.check(self.owner, place, what, write=True)

    def read(self, place: Placement, described: twpb.Tensor, what: str) -> Any:
        """An input from its region (codec.Read): an array copied from a system region,
        or a device tensor copied from a CUDA region."""
        if self._on_device(place):
            dtype, shape, _ = layout(described, what)
            return self.cuda.read(self.owner, place, dtype, tuple(shape), what)
        return decode_array(described, self.system.read(self.owner, place, what), what)

    def write(self, place: Placement, data: memoryview, what: str) -> None:
        """An output's bytes into its system region (codec.Write)."""
        self.system.write(self.owner, place, data, what)

    def export(self, wanted: codec.Wanted) -> Export | None:
        """How the engine should hand over outputs when some go to CUDA regions: those
        copied there on the device (the response says only their dtype and shape),
        the rest as arrays. None when no output goes to a CUDA region."""
        placed = {n: p for n, p in wanted.placed.items() if self._on_device(p)}
        if not placed:
            return None

        def export(name: str, tensor: torch.Tensor) -> Any:
            place = placed.get(name)
            if place is None:
                return as_array(name, tensor)
            what = f"requested output {shown(name)}"
            written = codec.Written(numpy_dtype(tensor.dtype), tuple(tensor.shape))
            codec.datatype_of(written, what)  # one the protocol can name, before copying
            self.cuda.write(self.owner, place, tensor, what)
            return written

        return export
