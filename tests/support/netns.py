"""Two hosts on one machine: network namespaces joined by a veth pair, for tests that
need a real link off loopback (TLS required, other addresses, a link cut mid-way).

Needs root and iproute2; ``two_hosts`` skips the test where they cannot be had, and
removes everything it made, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

#: A private range, used inside the namespaces only.
SERVER_IP = "10.77.0.1"
CLIENT_IP = "10.77.0.2"


@dataclass(frozen=True)
class Hosts:
    """The two namespaces and the ends of the link between them."""

    server: str
    client: str
    server_link: str
    client_link: str

    def run(self, namespace: str, *command: str, **kwargs: object) -> subprocess.Popen[str]:
        """Start ``command`` inside ``namespace``."""
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            ["ip", "netns", "exec", namespace, *command], **{"text": True, **kwargs}
        )

    def link(self, up: bool) -> None:
        """Cut the link (or mend it), from the client's side."""
        ip("netns", "exec", self.client, "ip", "link", "set", self.client_link,
           "up" if up else "down")  # fmt: skip


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Namespaces ``server`` (10.77.0.1) and ``client`` (10.77.0.2) over a veth pair."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("two hosts need root and iproute2 (ip netns)")
    tag = uuid.uuid4().hex[:6]
    hosts = Hosts(f"tw-s-{tag}", f"tw-c-{tag}", f"tws{tag}", f"twc{tag}")
    made: list[str] = []
    try:
        for namespace in (hosts.server, hosts.client):
            ip("netns", "add", namespace)
            made.append(namespace)
        ip("link", "add", hosts.server_link, "type", "veth", "peer", "name", hosts.client_link)
        for namespace, link, address in (
            (hosts.server, hosts.server_link, SERVER_IP),
            (hosts.client, hosts.client_link, CLIENT_IP),
        ):
            ip("link", "set", link, "netns", namespace)
            ip("netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", link)
            ip("netns", "exec", namespace, "ip", "link", "set", link, "up")
            ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        for namespace in made:
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot make network namespaces here: {exc} {detail.decode().strip()}")
    try:
        yield hosts
    finally:
        for namespace in made:  # deleting a namespace deletes its end of the pair too
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
