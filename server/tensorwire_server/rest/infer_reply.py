"""An inference's answer as the REST response: the JSON object, and after it each
binary output's bytes as views of the result (Triton's binary tensor data extension:
written to the socket from the result's own buffer), or each JSON output's ``data``
serialized by orjson straight from the array."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from tensorwire.errors import InvalidArgumentError, shown
from tensorwire.wire.dtypes import NUMPY_BY_WIRE
from tensorwire_server.kserve import codec
from tensorwire_server.rest.infer_json import BINARY_ONLY, Parsed

#: Datatypes JSON numbers do not carry exactly: binary data only, as for inputs.


@dataclass(frozen=True)
class Reply:
    """A REST inference response: its JSON, and the binary data that follows it."""

    header: bytes
    payloads: list[memoryview]

    @property
    def binary(self) -> bool:
        """Whether binary data follows the JSON (then its length goes in a header)."""
        return bool(self.payloads)

    @property
    def size(self) -> int:
        """The body's bytes."""
        return len(self.header) + sum(p.nbytes for p in self.payloads)


def reply(parsed: Parsed, answer: codec.Answer) -> Reply:
    """The response to ``parsed`` from the protocol's ``answer`` (raw contents for every
    output, those in shared memory empty): binary data for the outputs asked for so
    (binary_data, else the request's binary_data_output), JSON data for the rest."""
    message = answer.message
    outputs: list[dict[str, Any]] = []
    payloads: list[memoryview] = []
    placed = {
        t.name for t in parsed.request.message.outputs if "shared_memory_region" in t.parameters
    }
    for tensor, payload in zip(message.outputs, answer.payloads, strict=True):
        name = tensor.name
        entry: dict[str, Any] = {
            "name": name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if name in placed:
            pass  # written into the caller's region: no data here, as Triton answers
        elif parsed.binary.get(name, parsed.binary_default):
            entry["parameters"] = {"binary_data_size": payload.nbytes}
            if payload.nbytes:
                payloads.append(payload)
        else:
            entry["data"] = _data(tensor.datatype, payload, f"output {shown(name)}")
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": message.model_name,
        "model_version": message.model_version,
        "outputs": outputs,
    }
    if message.id:
        document["id"] = message.id
    return Reply(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY), payloads)


def _data(datatype: str, payload: memoryview, what: str) -> np.ndarray:
    """An output's bytes as the flat array orjson writes as JSON numbers."""
    if datatype in BINARY_ONLY:
        raise InvalidArgumentError(
            f"{what} is {datatype}, which JSON numbers do not carry; ask for it as binary "
            "data (binary_data true)"
        )
    return np.frombuffer(payload, dtype=NUMPY_BY_WIRE[codec.wire_dtype(datatype, what)])
