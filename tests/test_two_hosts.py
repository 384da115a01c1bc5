"""The data plane between two hosts: a server and a client in two network namespaces
joined by a veth pair (tests/netns.py), TLS on as any off-loopback deployment runs
it, and the link cut mid-transfer. Skipped where namespaces cannot be made."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import TESTS
from netns import SERVER_IP, Hosts, two_hosts

CLIENT = str(TESTS / "two_hosts_client.py")


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with two_hosts() as made:
        yield made


@pytest.fixture
def served(hosts: Hosts, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A TLS server (data plane on) in the server's namespace: its address and CA."""
    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_IP)
    files = {"ca": ca.cert_pem, "cert": cert.cert_chain_pems[0], "key": cert.private_key_pem}
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / f"{name}.pem"))
    proc = hosts.run(
        hosts.server,
        sys.executable, "-m", "tensorwire_server", "--host", SERVER_IP, "--port", "0",
        "--device", "cpu", "--tls-cert", str(tmp_path / "cert.pem"),
        "--tls-key", str(tmp_path / "key.pem"),
        stderr=subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []
    try:
        port = data_port = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (port is None or data_port is None):
            line = proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if m := re.search(r"listening on \S+:(\d+)", line):
                port = m.group(1)
            if m := re.search(r"data plane on \S+:(\d+)", line):
                data_port = m.group(1)
        assert port and data_port, "".join(lines)
        # Keep reading its log, so that a full pipe never blocks it.
        threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True).start()
        yield f"{SERVER_IP}:{port}", str(tmp_path / "ca.pem")
    finally:
        proc.kill()
        proc.wait(30)


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
    # Mended: the same server answers, over the data plane.
    subprocess.run(
        ["ip", "netns", "exec", hosts.client, "tc", "qdisc", "del", "dev", hosts.client_link,
         "root"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    again = round_trip(hosts, address, ca, 16, timeout=60)
    assert again["ok"] and again["data_plane"], again
