"""The data port between two hosts, against the floors of the same link, in one run.

    sudo .venv/bin/python benchmarks/two_hosts.py [--mib 256] [--repeats 3]

A server namespace (10.77.0.1) and a client namespace (10.77.0.2) joined by a veth pair
(tests/support/netns.py; root and iproute2 needed). Identity round trips of ``--mib`` MiB,
(sent + received) / best time: a raw TCP echo and a Python ``ssl`` echo over the same
link (the floors; each takes the whole request, then sends it back, as a call does),
then tensorwire with its data port in plain text and over TLS, and over TLS with
every payload in gRPC (``data_plane=False``). Targets (issue 18): plain >= 0.8 x the
TCP echo, TLS >= 0.8 x the ssl echo.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.netns import SERVER_IP, Hosts, two_hosts  # noqa: E402

ECHO_PORT = 50999


def echo_server(port: int, size: int, cert: str | None, key: str | None) -> None:
    """Take ``size`` bytes of each connection, then send them back: a round trip of
    one request and one response, as an identity call is (a streaming echo would
    overlap the two directions, which no request-response call can)."""
    listener = socket.create_server((SERVER_IP, port))
    tls = None
    if cert and key:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
    print("ready", flush=True)
    buf = memoryview(bytearray(size))
    while True:
        conn, _ = listener.accept()
        sock = tls.wrap_socket(conn, server_side=True) if tls else conn
        fill(sock, buf)
        sock.sendall(buf)
        sock.close()


def fill(sock: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < buf.nbytes:
        n = sock.recv_into(buf[got:])
        if not n:
            raise ConnectionError("closed early")
        got += n


def echo_client(port: int, ca: str | None, size: int, repeats: int) -> float:
    """Best seconds to send ``size`` bytes and have them all back."""
    payload = memoryview(bytearray(size))
    back = memoryview(bytearray(size))
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        raw = socket.create_connection((SERVER_IP, port))
        sock = ssl.create_default_context(cafile=ca).wrap_socket(
            raw, server_hostname=SERVER_IP
        ) if ca else raw  # fmt: skip
        began = time.perf_counter()
        sock.sendall(payload)
        fill(sock, back)
        best = min(best, time.perf_counter() - began)
        sock.close()
    return best


def tensorwire_client(address: str, ca: str | None, size: int, repeats: int, data: bool) -> float:
    import numpy as np

    import tensorwire as tw

    array = np.ones(size // 4, np.float32)
    tls = {"root_certificates": ca} if ca else {}
    best = float("inf")
    with tw.Client(address, timeout=600, data_plane=data, **tls) as client:  # type: ignore[arg-type]
        for _ in range(repeats + 1):
            began = time.perf_counter()
            client.infer("identity", array)
            best = min(best, time.perf_counter() - began)
    return best


def in_client(hosts: Hosts, *args: str) -> float:
    out = subprocess.run(
        ["ip", "netns", "exec", hosts.client, sys.executable, __file__, *args],
        capture_output=True, text=True, check=True, timeout=1800,
    ).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def serve_tensorwire(
    hosts: Hosts, tls: list[str], extra: Sequence[str] = (), env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """A tensorwire server in the server namespace (``extra`` flags, ``env`` added to
    this one's environment) and its address, once its models are loaded."""
    flags = tls or ["--insecure"]
    proc = hosts.run(
        hosts.server,
        sys.executable, "-m", "tensorwire_server", "--host", SERVER_IP, "--port", "0",
        "--device", "cpu", "--log-level", "INFO", *flags, *extra,
        stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
    )  # fmt: skip
    address = ""
    for line in proc.stderr:  # type: ignore[union-attr]
        if m := re.search(r"listening on (\S+)", line):
            address = m.group(1)
        if "server serving" in line:  # the models are loaded: the first call is served
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            return proc, address
    raise RuntimeError("the tensorwire server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.mib << 20
    if args.role:  # one half, inside a namespace
        role = json.loads(args.args)
        if args.role == "echo-server":
            echo_server(ECHO_PORT, size, role.get("cert"), role.get("key"))
        elif args.role == "echo-client":
            print(echo_client(ECHO_PORT, role.get("ca"), size, args.repeats))
        else:
            print(tensorwire_client(role["address"], role.get("ca"), size, args.repeats,
                                    role["data"]))  # fmt: skip
        return
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_IP)
    folder = Path(__import__("tempfile").mkdtemp())
    for name, blob in (("ca", ca.cert_pem), ("cert", cert.cert_chain_pems[0]),
                       ("key", cert.private_key_pem)):  # fmt: skip
        blob.write_to_path(str(folder / f"{name}.pem"))
    paths = {name: str(folder / f"{name}.pem") for name in ("ca", "cert", "key")}
    common = ["--mib", str(args.mib), "--repeats", str(args.repeats)]
    rows: dict[str, float] = {}
    with two_hosts() as hosts:
        for label, secured in (("raw TCP echo (floor)", False), ("Python ssl echo (floor)", True)):
            keys = {"cert": paths["cert"], "key": paths["key"]} if secured else {}
            echo = hosts.run(
                hosts.server, sys.executable, __file__, *common, "--role", "echo-server",
                "--args", json.dumps(keys), stdout=subprocess.PIPE,
            )  # fmt: skip
            echo.stdout.readline()  # type: ignore[union-attr]
            role = {"ca": paths["ca"]} if secured else {}
            rows[label] = in_client(hosts, *common, "--role", "echo-client",
                                    "--args", json.dumps(role))  # fmt: skip
            echo.kill()
            echo.wait()
        secure = ["--tls-cert", paths["cert"], "--tls-key", paths["key"]]
        for label, tls, data in (
            ("tensorwire, data port, plain", [], True),
            ("tensorwire, data port, TLS", secure, True),
            ("tensorwire, payloads in gRPC, TLS", secure, False),
        ):
            server, address = serve_tensorwire(hosts, tls)
            role = {"address": address, "ca": paths["ca"] if tls else None, "data": data}
            rows[label] = in_client(hosts, *common, "--role", "tensorwire",
                                    "--args", json.dumps(role))  # fmt: skip
            server.kill()
            server.wait()
    print(f"\n| {args.mib} MiB round trip, two namespaces over a veth pair | MiB/s |\n|---|---:|")
    for label, seconds in rows.items():
        print(f"| {label} | {2 * size / seconds / 2**20:,.0f} |")
    plain = rows["raw TCP echo (floor)"] / rows["tensorwire, data port, plain"]
    tls_ratio = rows["Python ssl echo (floor)"] / rows["tensorwire, data port, TLS"]
    print(f"\n- plain / TCP echo: {plain:.2f} (target >= 0.8)")
    print(f"- TLS / ssl echo: {tls_ratio:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
