"""The client's public surface: exports, deadlines, the closed guard."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

import tensorwire
from tensorwire import (
    USE_CLIENT_DEFAULT,
    AsyncClient,
    Client,
    DeadlineExceededError,
    TensorwireError,
)
from tensorwire._flow import Send
from tensorwire._transport.blocking import BlockingTransport
from tensorwire.v1 import tensorwire_pb2 as pb
from tensorwire.wire.codec import Received, receive


def test_all_names_exist_and_errors_share_one_base() -> None:
    for name in tensorwire.__all__:
        assert hasattr(tensorwire, name), name
    errors = [getattr(tensorwire, n) for n in tensorwire.__all__ if n.endswith("Error")]
    assert all(issubclass(e, TensorwireError) for e in errors)
    assert len({e.code for e in errors}) == len(errors)


def test_twins_take_the_same_keyword_only_settings() -> None:
    signature = inspect.signature(Client)
    assert signature == inspect.signature(AsyncClient)
    settings = list(signature.parameters)[1:]
    assert settings[:8] == [
        "timeout",
        "retries",
        "tls",
        "root_certificates",
        "certificate_chain",
        "private_key",
        "server_name",
        "token",
    ]
    kinds = {signature.parameters[name].kind for name in settings}
    assert kinds == {inspect.Parameter.KEYWORD_ONLY}


def test_per_call_and_default_deadlines(address: str) -> None:
    with Client(address, timeout=0.3) as c:
        with pytest.raises(DeadlineExceededError):
            c.infer("sleeper", np.array(2.0))
        assert c.infer("sleeper", np.array(0.5), timeout=10)["output"] == 0.5
        assert c.infer("sleeper", np.array(0.0), timeout=USE_CLIENT_DEFAULT)["output"] == 0.0
    with Client(address, timeout=None) as c:
        assert c.infer("sleeper", np.array(0.5))["output"] == 0.5


def test_closed_client_refuses_calls(address: str) -> None:
    c = Client(address)
    with c:
        c.info()
    assert c.closed
    with pytest.raises(RuntimeError, match="closed"):
        c.info()
    c.close()  # closing twice is harmless


def test_arguments_that_cannot_travel_are_refused_before_sending(client: Client) -> None:
    with pytest.raises(tensorwire.InvalidArgumentError, match="cannot be sent"):
        client.call("sum", np.ones(3), dim=object())
    with pytest.raises(tensorwire.InvalidArgumentError, match="cannot travel"):
        client.infer("identity", np.array(["text"]))


def test_a_client_sends_its_calls_through_the_transport_it_holds() -> None:
    # The transport is an object the client holds, of the kind its class names: a
    # subclass plugs in its own, here one that answers Info without a server.
    sent: list[str] = []

    class Answering(BlockingTransport):
        def invoke(self, send: Send) -> Received[Any]:
            sent.append(send.method)
            answer = pb.InfoResponse(server_version="9.9")
            return receive(pb.InfoResponse, answer.SerializeToString())

    class Plugged(Client):
        _TRANSPORT = Answering

    with Plugged("127.0.0.1:1", retries=0) as client:
        assert isinstance(client._transport, Answering)
        assert client.info().server_version == "9.9"
        assert client.pin()._transport is not client._transport  # its own, on one replica
    assert sent == ["Info"] and client.closed
