"""The REST body to the protocol's request without copies: each binary input of an
inference is a view of the one body buffer, and so is the array the model gets; JSON
data becomes an array of the input's datatype; a binary output is written from the
result's own buffer."""

from __future__ import annotations

import json

import numpy as np

from tensorwire_server.kserve import codec
from tensorwire_server.limits import Limits
from tensorwire_server.rest import infer_json, infer_reply
from tensorwire_server.settings import Settings

LIMITS = Limits.from_settings(Settings())


def _body(header: dict[str, object], *payloads: bytes) -> tuple[memoryview, str]:
    text = json.dumps(header).encode()
    buffer = np.frombuffer(bytearray(text + b"".join(payloads)), np.uint8)
    return memoryview(buffer), str(len(text))  # type: ignore[arg-type]


def test_binary_inputs_are_views_of_the_body() -> None:
    a = np.arange(6, dtype=np.float32)
    b = np.arange(4, dtype=np.int64)
    header = {
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32",
             "parameters": {"binary_data_size": a.nbytes}},
            {"name": "b", "shape": [4], "datatype": "INT64",
             "parameters": {"binary_data_size": b.nbytes}},
        ]
    }  # fmt: skip
    body, length = _body(header, a.tobytes(), b.tobytes())
    parsed = infer_json.parse(body, length, "m", "", LIMITS, 1 << 20)
    whole = np.frombuffer(body, np.uint8)
    arrays = dict(codec.inputs(parsed.request, LIMITS, lambda *_: None))
    for name, want in (("a", a.reshape(2, 3)), ("b", b)):
        assert np.shares_memory(arrays[name], whole), name  # no copy on the way in
        assert np.array_equal(arrays[name], want)


def test_json_data_of_each_kind_and_every_output_as_asked() -> None:
    header = {
        "inputs": [
            {"name": "u", "shape": [2], "datatype": "UINT64", "data": [0, 2**64 - 1]},
            {"name": "f", "shape": [2, 1], "datatype": "FP64", "data": [[1], [2.5]]},
            {"name": "t", "shape": [1], "datatype": "BOOL", "data": [True]},
        ],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "u"}, {"name": "f", "parameters": {"binary_data": False}}],
    }
    body, _ = _body(header)
    parsed = infer_json.parse(body, None, "m", "", LIMITS, 1 << 20)
    arrays = dict(codec.inputs(parsed.request, LIMITS, lambda *_: None))
    assert arrays["u"].dtype == np.uint64 and arrays["u"][1] == 2**64 - 1
    assert arrays["f"].shape == (2, 1) and arrays["t"].dtype == np.bool_
    assert parsed.binary == {"u": True, "f": False}
    wanted = codec.wanted(parsed.request.message)
    assert not wanted.typed  # every output raw; the REST layer picks binary or JSON
    outputs = [("u", arrays["u"]), ("f", arrays["f"])]
    answer = codec.answer(parsed.request.message, 1, outputs, wanted, lambda *_: None)
    reply = infer_reply.reply(parsed, answer)
    [payload] = reply.payloads
    assert np.shares_memory(np.frombuffer(payload, np.uint8), arrays["u"])  # from the result
    document = json.loads(reply.header)
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert document["outputs"][1]["data"] == [1.0, 2.5]
