"""Scale-out: one client over several replicas, balanced by gRPC's round_robin, a
replica that stops mid-run, and calls pinned to the replica that holds their state.

Three real tensorwire servers on 127.0.0.1 ports; which server answered is read from
each one's own ModelStatistics.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trustme

from tensorwire import AsyncClient, Client, UnavailableError
from tensorwire._messages import infer_request
from tensorwire._transport.targets import ROUND_ROBIN, Target, parse_target, pinned, replicas
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

X = np.linspace(-1, 1, 2 * 16, dtype=np.float32).reshape(2, 16)


class Replicas:
    """Three CPU servers with the built-in models, each with an engine of its own."""

    def __init__(self, count: int = 3, **settings: Any) -> None:
        self.servers: list[TensorwireServer] = []
        for _ in range(count):
            config = Settings(host="127.0.0.1", port=0, device="cpu", **settings)
            server = TensorwireServer(config, build_engine(config))
            server.start()
            self.servers.append(server)
        self.addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
        self.stopped: set[int] = set()

    def served(self) -> list[int]:
        """mlp requests each server has answered (0 for a stopped one)."""
        counts = []
        for i, address in enumerate(self.addresses):
            if i in self.stopped:
                counts.append(0)
                continue
            with Client(address, timeout=10) as one:
                counts.append(sum(s.requests for s in one.model_statistics("mlp")))
        return counts

    def stop(self, i: int, grace: float | None) -> None:
        """Stop server ``i``: draining for ``grace`` seconds, or at once (None)."""
        self.stopped.add(i)
        if grace is None:
            self.servers[i].kill()
        else:
            self.servers[i].stop(grace)

    def close(self) -> None:
        for i, server in enumerate(self.servers):
            if i not in self.stopped:
                server.kill()


@pytest.fixture
def three() -> Iterator[Replicas]:
    group = Replicas()
    yield group
    group.close()


def _delta(after: list[int], before: list[int]) -> list[int]:
    return [a - b for a, b in zip(after, before, strict=True)]


# ------------------------------------------------------------------ balancing


def test_requests_spread_over_every_replica(three: Replicas) -> None:
    with Client(three.addresses, timeout=30) as client:
        assert client.target == ",".join(three.addresses)
        for _ in range(60):
            client.infer("mlp", X)
    served = three.served()
    assert sum(served) == 60
    assert min(served) >= 10, served  # round robin: about 20 each


def test_a_comma_separated_target_and_the_async_client_balance_too(three: Replicas) -> None:
    async def go() -> None:
        async with AsyncClient(",".join(three.addresses), timeout=30) as client:
            for _ in range(30):
                await client.infer("mlp", X)

    asyncio.run(go())
    served = three.served()
    assert sum(served) == 30 and min(served) >= 5, served


def test_a_policy_in_the_callers_options_replaces_round_robin(three: Replicas) -> None:
    options = [("grpc.lb_policy_name", "pick_first")]
    with Client(three.addresses, timeout=30, options=options) as client:
        for _ in range(20):
            client.infer("mlp", X)
    assert sorted(three.served()) == [0, 0, 20]


def test_a_replica_that_stops_mid_run_fails_no_call_the_retries_cover(three: Replicas) -> None:
    """One replica drains (SIGTERM's path), another vanishes at once: every call they
    refuse (UNAVAILABLE) or drop in flight (CANCELLED) is sent again to a live one."""
    failures: list[BaseException] = []
    done = [0]
    stop = threading.Event()
    with Client(three.addresses, timeout=30) as client:

        def call() -> None:
            while not stop.is_set():
                try:
                    client.infer("mlp", X)
                    done[0] += 1
                except BaseException as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.4)
            three.stop(1, grace=5.0)
            time.sleep(0.4)
            three.stop(0, grace=None)
            before = done[0]
            time.sleep(0.6)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
    assert not failures, failures
    assert done[0] - before > 20  # the last replica carried on alone
    assert three.served()[2] > 0


# ------------------------------------------------------------------ pinning


def test_pinned_calls_stay_with_one_replica(three: Replicas) -> None:
    with Client(three.addresses, timeout=30) as client:
        methods = client._transport.pinned_methods()
        assert client._transport.pinned_methods() is methods  # chosen once per client
        for _ in range(12):
            methods["Infer"](infer_request("mlp", X, None, 0, False).finish(), timeout=10)
        first = three.served()
        assert sorted(first) == [0, 0, 12]
        holder = first.index(12)
        with client.pin() as pinned_client:
            assert pinned_client.target == three.addresses[holder]
            for _ in range(12):
                pinned_client.infer("mlp", X)
            # The balanced client goes on spreading its own calls meanwhile.
            for _ in range(30):
                client.infer("mlp", X)
        served = _delta(three.served(), first)
        assert served[holder] >= 12 and sum(served) == 42
        assert all(n >= 5 for n in served), served


def test_calls_that_carry_handles_stay_with_the_replica_that_holds_them(
    three: Replicas,
) -> None:
    """A session's tensors live on one replica: every call that makes or names one
    goes there (the client's pinned channel), while plain calls go on spreading."""
    with Client(three.addresses, timeout=30) as client:
        tensor = client.put(X)
        for _ in range(10):
            client.infer("mlp", tensor)
        kept = client.infer("mlp", tensor, keep=True)["output"]
        after_handles = three.served()
        assert sorted(after_handles) == [0, 0, 11], after_handles
        for _ in range(30):
            client.infer("mlp", X)
        assert all(n >= 5 for n in _delta(three.served(), after_handles))
        assert np.array_equal(tensor.numpy(), X)
        assert np.allclose(kept.numpy(), client.infer("mlp", X)["output"])


def test_a_pinned_client_never_moves_to_another_replica(three: Replicas) -> None:
    """State lives on one replica: when it is gone, a pinned call fails, naming it,
    instead of reaching a replica that would not know the state."""
    with Client(three.addresses, timeout=30) as client, client.pin() as pinned_client:
        pinned_client.infer("mlp", X)
        holder = three.addresses.index(pinned_client.target)
        three.stop(holder, grace=None)
        with pytest.raises(UnavailableError, match=three.addresses[holder]):
            pinned_client.infer("mlp", X, timeout=3)
        client.infer("mlp", X)  # the balanced client still reaches the others


def test_an_async_client_pins_too(three: Replicas) -> None:
    async def go() -> str:
        async with (
            AsyncClient(three.addresses, timeout=30) as client,
            client.pin() as pinned_client,
        ):
            for _ in range(10):
                await pinned_client.infer("mlp", X)
            return pinned_client.target

    target = asyncio.run(go())
    served = three.served()
    assert served[three.addresses.index(target)] == 10 and sum(served) == 10


def test_a_client_of_one_server_pins_to_it() -> None:
    with Client("127.0.0.1:1") as client:
        assert client._transport.pinned_methods() is client._transport._methods
        with client.pin() as pinned_client:
            assert pinned_client.target == "127.0.0.1:1"
    with pytest.raises(RuntimeError, match="closed"):
        client.pin()


def test_tls_over_replicas_checks_one_name_and_pinning_keeps_it(tmp_path: Path) -> None:
    """Every replica's certificate names "localhost"; the client lists the replicas
    by that name (resolved to 127.0.0.1), so TLS checks it, on the pinned channel too."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(tmp_path / "server.pem"), append=True)
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    group = Replicas(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.key"))
    try:
        targets = [a.replace("127.0.0.1", "localhost") for a in group.addresses]
        roots = ca.cert_pem.bytes()
        with Client(targets, timeout=30, root_certificates=roots, token="t" * 16) as client:
            for _ in range(9):
                client.infer("mlp", X)
            with client.pin() as pinned_client:
                assert pinned_client.target in group.addresses
                pinned_client.infer("mlp", X)
        with Client(group.addresses, timeout=5, retries=0, root_certificates=roots) as client:
            with pytest.raises(UnavailableError):  # the certificate does not name 127.0.0.1
                client.infer("mlp", X)
            with Client(
                group.addresses, timeout=30, root_certificates=roots, server_name="localhost"
            ) as named:
                named.infer("mlp", X)
    finally:
        group.close()


def test_connections_that_age_out_lose_no_call() -> None:
    """max_connection_age ends connections (GOAWAY) so DNS is asked again; calls in
    flight then finish, and new ones find a new connection."""
    group = Replicas(count=2, max_connection_age=0.2)
    try:
        with Client(group.addresses, timeout=30) as client:
            deadline = time.monotonic() + 1.5
            calls = 0
            while time.monotonic() < deadline:
                client.infer("mlp", X)
                calls += 1
                time.sleep(0.01)
        assert sum(group.served()) == calls
    finally:
        group.close()


# ------------------------------------------------------------------ targets


def test_targets_of_one_server_pass_through() -> None:
    for target in ("127.0.0.1:50051", "gpu-box:50051", "dns:///gpu-box:1", "unix:/run/tw.sock"):
        assert parse_target(target) == Target(target, target)
    assert parse_target(["10.0.0.1:1"]) == Target("10.0.0.1:1", "10.0.0.1:1")
    # gRPC's own lists stay as they are.
    assert parse_target("ipv4:10.0.0.1:1,10.0.0.2:1").channel == "ipv4:10.0.0.1:1,10.0.0.2:1"


def test_several_addresses_become_one_address_list() -> None:
    listed = parse_target(["10.0.0.1:50051", " 10.0.0.2:50051", "10.0.0.1:50051"])
    assert listed == Target(
        "10.0.0.1:50051,10.0.0.2:50051,10.0.0.1:50051",
        "ipv4:10.0.0.1:50051,10.0.0.2:50051",
        authority="10.0.0.1:50051",
    )
    assert parse_target("[::1]:1,[::1]:2").channel == "ipv6:[::1]:1,[::1]:2"
    assert parse_target("localhost:7,127.0.0.2:7").channel == "ipv4:127.0.0.1:7,127.0.0.2:7"
    for bad in ("10.0.0.1:1,10.0.0.2", "10.0.0.1:1,,10.0.0.2:1", "10.0.0.1:1,[::1]:1"):
        with pytest.raises(ValueError, match="target"):
            parse_target(bad)
    with pytest.raises(TypeError):
        parse_target([b"10.0.0.1:1"])  # type: ignore[list-item]
    with pytest.raises(UnavailableError, match="cannot resolve"):
        parse_target("no-such-host.invalid:1,127.0.0.1:1")


def test_replicas_of_a_dns_name_are_its_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "tensorwire.ns.svc"
        v4 = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.0.0.{i}", port)) for i in (1, 2)]
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::1", port, 0, 0)), *v4]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for target in ("dns:///tensorwire.ns.svc:50051", "tensorwire.ns.svc:50051"):
        where = parse_target(target)
        assert replicas(where) == ["10.0.0.1:50051", "10.0.0.2:50051"]  # IPv4 first
        assert pinned(where, "10.0.0.2:50051") == Target(
            "10.0.0.2:50051", "10.0.0.2:50051", authority="tensorwire.ns.svc:50051"
        )
    for one in ("10.0.0.1:50051", "unix:/run/tw.sock", "ipv4:10.0.0.1:1", "[::1]:1"):
        assert replicas(parse_target(one)) == []
    listed = parse_target(["10.0.0.1:1", "10.0.0.2:1"])
    assert replicas(listed) == ["10.0.0.1:1", "10.0.0.2:1"]
    assert pinned(listed, "10.0.0.2:1").authority == "10.0.0.1:1"


def test_a_token_needs_tls_unless_every_address_is_this_machine() -> None:
    with Client(["127.0.0.1:1", "127.0.0.2:1"], token="t" * 16):
        pass
    with pytest.raises(ValueError, match="plain text") as info:
        Client(["127.0.0.1:1", "10.0.0.1:1"], token="s3cret-token-value")
    assert "s3cret" not in str(info.value)


def test_round_robin_is_a_valid_service_config() -> None:
    import json

    assert json.loads(ROUND_ROBIN) == {"loadBalancingConfig": [{"round_robin": {}}]}
