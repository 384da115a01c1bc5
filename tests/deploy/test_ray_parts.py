"""The parts of tensorwire on Ray that need no cluster: the fleet's DNS answers (a real
UDP responder on 127.0.0.1) and its scaling decisions; tests/deploy/test_ray.py runs the
whole on two Ray nodes."""

from __future__ import annotations

import socket
import struct

import pytest

from tensorwire_server.on_ray.autoscale import Autoscaler, Scaling
from tensorwire_server.on_ray.dns import Responder, answer


def query(name: str, qtype: int = 1, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, 1)


def a_records(reply: bytes, asked: bytes) -> tuple[int, list[str]]:
    """The reply's RCODE and the addresses of its A records."""
    ident, flags, _, count = struct.unpack_from("!HHHH", reply)
    assert ident == struct.unpack_from("!H", asked)[0] and flags & 0x8000
    at, ips = len(asked), []
    for _ in range(count):
        _, rtype, _, _, size = struct.unpack_from("!HHHIH", reply, at)
        at += 12
        assert rtype == 1 and size == 4
        ips.append(socket.inet_ntoa(reply[at : at + 4]))
        at += 4
    return flags & 0xF, ips


def test_the_responder_answers_its_name_with_the_replicas_as_they_change() -> None:
    dns = Responder("tensorwire.ray", "127.0.0.1", 0)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)

            def ask(packet: bytes) -> tuple[int, list[str]]:
                sock.sendto(packet, ("127.0.0.1", dns.port))
                return a_records(sock.recv(512), packet)

            assert ask(query("tensorwire.ray")) == (0, [])
            dns.set_addresses(["10.0.0.1", "10.0.0.2", "10.0.0.1"])
            assert ask(query("TensorWire.Ray")) == (0, ["10.0.0.1", "10.0.0.2"])
            assert ask(query("tensorwire.ray", qtype=28)) == (0, [])  # AAAA: none
            assert ask(query("other.ray")) == (3, [])  # NXDOMAIN
            dns.set_addresses(["10.0.0.2"])
            assert ask(query("tensorwire.ray")) == (0, ["10.0.0.2"])
            # Garbage is dropped, and it answers on.
            for junk in (b"", b"\x00" * 5, query("tensorwire.ray")[:-3], b"\xff" * 40):
                sock.sendto(junk, ("127.0.0.1", dns.port))
            assert ask(query("tensorwire.ray")) == (0, ["10.0.0.2"])
    finally:
        dns.close()


def test_answer_refuses_what_it_does_not_serve() -> None:
    name = b"\x02tw\x00"
    assert answer(b"\x00" * 11, name, ["10.0.0.1"]) is None  # too short
    reply = query("tw")
    response = bytes([reply[0], reply[1], reply[2] | 0x80]) + reply[3:]
    assert answer(response, name, ["10.0.0.1"]) is None  # a response, not a query


def test_the_autoscaler_grows_on_load_shrinks_when_idle_and_keeps_its_bounds() -> None:
    scale = Autoscaler(Scaling(minimum=1, maximum=3, target_load=4, up_seconds=2, down_seconds=5))
    assert scale.decide(0.0, 0, 0) == 1  # below the minimum: at once
    assert scale.decide(0.0, 1, 10) == 0  # above target, not yet for long
    assert scale.decide(1.0, 1, 10) == 0
    assert scale.decide(2.0, 1, 10) == 1
    assert scale.decide(3.0, 3, 100) == 0  # at the maximum
    assert scale.decide(4.0, 3, 3) == 0  # fits in two at half target: wait
    assert scale.decide(8.0, 3, 3) == 0
    assert scale.decide(9.0, 3, 3) == -1
    assert scale.decide(10.0, 2, 3) == 0  # 3 > 4 * 1 / 2: two are needed
    assert scale.decide(10.0, 4, 0) == -1  # above the maximum: at once
    with pytest.raises(ValueError, match="minimum <= maximum"):
        Scaling(minimum=3, maximum=2)


def test_the_command_checks_its_flags_and_the_servers_before_it_joins_a_cluster(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tensorwire_server.on_ray.cli import main

    assert main(["--replicas", "3", "--max-replicas", "2", "--", "--device", "cpu"]) == 2
    assert "minimum <= maximum" in capsys.readouterr().err
    # The server's flags are tensorwire-server's own, checked by its own parser.
    assert main(["--", "--model", "no-equals-sign"]) == 2
    assert "--model expects NAME=SOURCE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--", "--no-such-flag"])
