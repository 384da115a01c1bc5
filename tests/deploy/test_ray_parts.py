"""The parts of tensorwire on Ray that need no cluster: the fleet's DNS answers (a real
UDP responder on 127.0.0.1) and its scaling decisions; tests/deploy/test_ray.py runs the
whole on two Ray nodes."""

from __future__ import annotations

import socket
import struct

import pytest

from tensorwire_server.on_ray.autoscale import Autoscaler, Scaling
from tensorwire_server.on_ray.dns import MAX_REPLY, Responder, answer, record
from tensorwire_server.on_ray.replica import port_clash, slot_port
from tensorwire_server.settings import Settings


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
                rcode, ips = a_records(sock.recv(512), packet)
                return rcode, sorted(ips)  # the answers take turns in their order

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
    name, records = b"\x02tw\x00", [record("10.0.0.1")]
    assert answer(b"\x00" * 11, name, records) is None  # too short
    reply = query("tw")
    response = bytes([reply[0], reply[1], reply[2] | 0x80]) + reply[3:]
    assert answer(response, name, records) is None  # a response, not a query
    head = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)  # QR=0: a query
    tail = struct.pack("!HH", 1, 1)
    # A compression pointer (to the header) as the question's name.
    assert answer(head + b"\xc0\x0c" + tail, name, records) is None
    # A label length in the reserved range (64..191: 0x40 and 0x80 set).
    assert answer(head + b"\x50" + b"a" * 80 + b"\0" + tail, name, records) is None
    # A label longer than what follows it.
    assert answer(head + b"\x3f" + b"a" * 10, name, records) is None
    # A name of more than 255 bytes, every label well formed.
    assert answer(head + (b"\x3f" + b"a" * 63) * 5 + b"\0" + tail, name, records) is None
    assert answer(head + b"\x02tw\0" + tail, name, records) is not None  # and still answers


def test_replies_fit_in_512_bytes_and_take_turns_over_many_addresses() -> None:
    name = b"\x0atensorwire\x03ray\x00"
    ips = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(100)]
    records = [record(ip) for ip in ips]
    asked = query("tensorwire.ray")
    seen: set[str] = set()
    for turn in range(4):
        reply = answer(asked, name, records, start=turn * 30)
        assert reply is not None and len(reply) <= MAX_REPLY
        rcode, got = a_records(reply, asked)
        assert rcode == 0 and len(got) == (MAX_REPLY - len(asked)) // 16
        assert got[0] == ips[turn * 30]
        seen.update(got)
    assert seen == set(ips)  # round the list, every address gets its turn


def test_an_address_that_is_no_ipv4_is_left_out_and_the_name_answers_on() -> None:
    dns = Responder("tensorwire.ray", "127.0.0.1", 0)
    try:
        dns.set_addresses(["fd00::1", "10.0.0.1", "node-3", "10.0.0.2"])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            for _ in range(2):
                sock.sendto(query("tensorwire.ray"), ("127.0.0.1", dns.port))
                rcode, ips = a_records(sock.recv(512), query("tensorwire.ray"))
                assert (rcode, sorted(ips)) == (0, ["10.0.0.1", "10.0.0.2"])
    finally:
        dns.close()


def test_replicas_on_one_node_take_fixed_ports_by_slot_that_never_overlap() -> None:
    settings = Settings(port=50051, data_port=50053, metrics_port=9100, http_port=8000)
    assert [slot_port(settings.port, slot) for slot in range(3)] == [50051, 50052, 50053]
    assert slot_port(0, 2) == 0  # any port stays any
    assert port_clash(settings, 2) is None
    clash = port_clash(settings, 3)  # 50051..50053 and the data port's 50053..50055
    assert clash is not None and "--port 50051 and --data-port 50053 overlap" in clash
    assert port_clash(Settings(port=65535), 2) is not None
    assert port_clash(Settings(port=0, data_port=0, http_port=None), 16) is None


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
    with pytest.raises(ValueError, match="--replicas <= --max-replicas"):
        Scaling(minimum=3, maximum=2)
    with pytest.raises(ValueError, match="need 1 <= --replicas"):
        Scaling(minimum=0, maximum=2)  # no replica would read no load: never 0


def test_the_command_checks_its_flags_and_the_servers_before_it_joins_a_cluster(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorwire_server.on_ray.cli import main

    assert main(["--replicas", "3", "--max-replicas", "2", "--", "--device", "cpu"]) == 2
    assert "--replicas <= --max-replicas" in capsys.readouterr().err
    assert main(["--replicas", "0", "--max-replicas", "2", "--", "--insecure"]) == 2
    assert "need 1 <= --replicas" in capsys.readouterr().err
    # The server's flags are tensorwire-server's own, checked by its own parser.
    assert main(["--", "--model", "no-equals-sign"]) == 2
    assert "--model expects NAME=SOURCE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--", "--no-such-flag"])
    # Replicas bind their nodes' addresses: plain text only when asked for.
    assert main(["--", "--device", "cpu"]) == 2
    assert "give --tls-cert and --tls-key" in capsys.readouterr().err
    # Tokens from the environment would travel inside every actor's arguments.
    monkeypatch.setenv("TENSORWIRE_TOKENS", "ops * " + "t" * 32)
    assert main(["--", "--insecure"]) == 2
    assert "give --tokens-file" in capsys.readouterr().err
    monkeypatch.delenv("TENSORWIRE_TOKENS")
    # Replicas on port 0 each take another port: no name can carry them.
    assert main(["--dns", "tw.ray", "--", "--port", "0", "--insecure"]) == 2
    assert "--dns needs a fixed --port" in capsys.readouterr().err
