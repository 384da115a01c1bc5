"""The data port between two hosts: a server and a client in two network namespaces
joined by a veth pair (tests/support/netns.py), TLS on as any off-loopback deployment runs
it, and the link cut mid-transfer. Skipped where namespaces cannot be made."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme
from support.netns import SERVER_IP, Hosts, two_hosts
from support.servers import TESTS, spawn_server

CLIENT = str(TESTS / "support" / "two_hosts_client.py")


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with two_hosts() as made:
        yield made


@pytest.fixture
def served(hosts: Hosts, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A TLS server (data port on) in the server's namespace: its address and CA."""
    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_IP)
    files = {"ca": ca.cert_pem, "cert": cert.cert_chain_pems[0], "key": cert.private_key_pem}
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / f"{name}.pem"))
    with spawn_server(
        "--host", SERVER_IP, "--device", "cpu", "--tls-cert", str(tmp_path / "cert.pem"),
        "--tls-key", str(tmp_path / "key.pem"),
        launch=partial(hosts.run, hosts.server),
    ) as (_, address, lines):  # fmt: skip
        assert any(re.search(r"data port on \S+:\d+", line) for line in lines), "".join(lines)
        yield address, str(tmp_path / "ca.pem")


def round_trip(hosts: Hosts, address: str, ca: str, mib: int, timeout: float) -> dict[str, Any]:
    proc = hosts.run(
        hosts.client, sys.executable, CLIENT, address, ca, str(mib), str(timeout),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=timeout + 60)
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


def test_the_data_plane_crosses_hosts_over_tls(hosts: Hosts, served: tuple[str, str]) -> None:
    address, ca = served
    report = round_trip(hosts, address, ca, 64, timeout=60)
    assert report["ok"] and report["data_plane"], report
    assert report["same_host_refused"], report  # another host: the network path


def test_a_link_cut_mid_transfer_fails_that_call_and_the_server_serves_on(
    hosts: Hosts, served: tuple[str, str]
) -> None:
    address, ca = served
    # 200 Mbit/s out of the client: 256 MiB take about 11 s, so the cut lands mid-way.
    subprocess.run(
        ["ip", "netns", "exec", hosts.client, "tc", "qdisc", "add", "dev", hosts.client_link,
         "root", "tbf", "rate", "200mbit", "burst", "256kb", "latency", "50ms"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    cut = threading.Timer(2.0, hosts.link, args=(False,))
    cut.start()
    try:
        report = round_trip(hosts, address, ca, 256, timeout=8)
    finally:
        cut.join()
        hosts.link(True)
    assert not report["ok"], report
    assert report["error"] in ("DeadlineExceededError", "UnavailableError"), report
    assert report["seconds"] < 8 + 10, report  # bounded by the call's deadline
    # Mended: the same server answers, over the data port.
    subprocess.run(
        ["ip", "netns", "exec", hosts.client, "tc", "qdisc", "del", "dev", hosts.client_link,
         "root"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    again = round_trip(hosts, address, ca, 16, timeout=60)
    assert again["ok"] and again["data_plane"], again
