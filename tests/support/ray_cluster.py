"""A real two-node Ray cluster on one machine: the head in one network namespace, a
worker in the other (tests/support/netns.py's pair), tensorwire's fleet on the head,
and clients run in the head's namespace with the fleet's DNS as their resolver.

Every process is started in a session of its own and stopped by that session (Ray's
workers take process groups of their own, not sessions); never ``ray stop``, which
stops every Ray node on the machine. Skips without root, namespaces or Ray.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.netns import CLIENT_IP, SERVER_IP, Hosts, two_hosts
from support.servers import TESTS, server_env

HEAD_IP, WORKER_IP = SERVER_IP, CLIENT_IP
#: The name the fleet answers for, and its gRPC port on every node.
NAME, PORT = "tensorwire.ray", 50051
RAY = str(Path(sys.executable).with_name("ray"))
CLIENT = str(TESTS / "support" / "ray_client.py")
ROOT = TESTS.parent


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:  # state ppid pgrp session: session is the 4th
            found.append(int(entry))
    return found


def end_session(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM every process of ``proc``'s session (it leads one), SIGKILL those
    left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while session_pids(proc.pid) and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        if not session_pids(proc.pid):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@dataclass
class Cluster:
    """The namespaces, the two Ray nodes, and where their files go."""

    hosts: Hosts
    tmp: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)

    def spawn(self, key: str, namespace: str, *argv: str) -> subprocess.Popen[Any]:
        log = open(self.tmp / f"{key}.log", "ab")  # noqa: SIM115 - the child holds it
        proc = self.hosts.run(
            namespace, *argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True, cwd=self.tmp,
        )  # fmt: skip
        log.close()
        self.procs[key] = proc
        return proc

    def start_worker(self) -> None:
        """The worker node joins (again: a node Ray declared dead must restart)."""
        old = self.procs.get("worker")
        if old is not None:
            end_session(old)
        self.spawn(
            "worker", self.hosts.client, RAY, "start", f"--address={HEAD_IP}:6379",
            f"--node-ip-address={WORKER_IP}", "--num-cpus=1",
            "--object-store-memory=80000000", "--block",
        )  # fmt: skip

    def worker_alive(self) -> bool:
        return self.procs["worker"].poll() is None

    def link(self, up: bool) -> None:
        """Cut (or mend) the worker node's link, in its own namespace."""
        self.hosts.link(up)

    def log(self, key: str) -> str:
        return (self.tmp / f"{key}.log").read_text(errors="replace")

    def close(self) -> None:
        for key in reversed(list(self.procs)):  # the fleet first, the head last
            end_session(self.procs[key])

    # ------------------------------------------------------------ clients

    def client_argv(self, mode: str, target: str, opts: dict[str, Any]) -> list[str]:
        """A client in the head's namespace, resolving through the fleet's DNS: a
        mount namespace of its own sees resolv.conf naming it (nothing else does)."""
        inner = (
            f"mount --bind {self.tmp / 'resolv.conf'} /etc/resolv.conf && exec "
            f"{sys.executable} {CLIENT} {mode} {target} '{json.dumps(opts)}'"
        )
        return ["ip", "netns", "exec", self.hosts.server, "unshare", "-m", "sh", "-c", inner]

    def client(self, mode: str, target: str, timeout: float = 120, **opts: Any) -> dict[str, Any]:
        """Run one client; its report."""
        done = subprocess.run(
            self.client_argv(mode, target, opts), capture_output=True, text=True,
            env=self.env, timeout=timeout,
        )  # fmt: skip
        lines = done.stdout.strip().splitlines()
        assert done.returncode == 0 and lines, done.stderr[-3000:]
        report: dict[str, Any] = json.loads(lines[-1])
        return report


@dataclass
class Fleet:
    """A running ``python -m tensorwire_server.on_ray`` and its replica list."""

    cluster: Cluster
    proc: subprocess.Popen[Any]
    listing: Path

    def replicas(self) -> list[dict[str, Any]]:
        path = self.listing.with_name(self.listing.name + ".json")
        try:
            found: list[dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        return found

    def wait_for(self, count: int, timeout: float = 120) -> list[dict[str, Any]]:
        """The replicas, once there are ``count`` serving (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.replicas()
            if len(found) == count:
                return found
            assert self.proc.poll() is None, self.cluster.log("fleet")[-4000:]
            time.sleep(0.5)
        raise AssertionError(
            f"not {count} replicas: {self.replicas()}\n{self.cluster.log('fleet')[-4000:]}"
        )


@contextlib.contextmanager
def ray_cluster() -> Iterator[Cluster]:
    """Two namespaces, a Ray head in one and a worker in the other, both joined."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (tensorwire-server[ray])")
    if os.geteuid() != 0 or not Path("/usr/bin/unshare").exists():
        pytest.skip("a Ray cluster in namespaces needs root, iproute2 and unshare")
    with two_hosts() as hosts, tempfile.TemporaryDirectory(prefix="tw-ray-") as tmp:
        # A server's environment (REST on any free port: the benchmark's Ray Serve
        # proxy takes 8000 on the head), this checkout's packages first on the path.
        env = server_env(
            PYTHONPATH=os.pathsep.join([str(ROOT / "client"), str(ROOT / "server"), str(TESTS)]),
            RAY_USAGE_STATS_ENABLED="0",
            # Ray keeps files under ~/.ray (Serve writes an auth token there, which
            # every later cluster then demands): this cluster's own home instead.
            HOME=tmp,
            RAY_DEDUP_LOGS="0",
        )
        cluster = Cluster(hosts, Path(tmp), env)
        (cluster.tmp / "resolv.conf").write_text(f"nameserver {HEAD_IP}\noptions timeout:1\n")
        try:
            cluster.spawn(
                "head", hosts.server, RAY, "start", "--head", f"--node-ip-address={HEAD_IP}",
                "--port=6379", "--num-cpus=1", "--object-store-memory=80000000",
                "--include-dashboard=false", f"--temp-dir={cluster.tmp / 'ray'}", "--block",
            )  # fmt: skip
            wait_for_line(cluster, "head", "block forever", 120)
            cluster.start_worker()
            wait_for_line(cluster, "worker", "block forever", 120)
            yield cluster
        finally:
            cluster.close()


@contextlib.contextmanager
def fleet(cluster: Cluster, *args: str, server: tuple[str, ...] = ()) -> Iterator[Fleet]:
    """The fleet on the head node: ``args`` its own flags, ``server`` the server's."""
    listing = cluster.tmp / f"replicas-{time.monotonic_ns()}"
    proc = cluster.spawn(
        "fleet", cluster.hosts.server, sys.executable, "-m", "tensorwire_server.on_ray",
        f"--address={HEAD_IP}:6379", "--num-cpus=0.5", "--dns", NAME,
        "--replicas-file", str(listing), *args,
        "--", "--device", "cpu", "--port", str(PORT), "--shutdown-grace", "5", *server,
    )  # fmt: skip
    try:
        yield Fleet(cluster, proc, listing)
    finally:
        end_session(proc, grace=60)  # SIGTERM: it drains its replicas, then ends them
        cluster.procs.pop("fleet", None)


def wait_for_line(cluster: Cluster, key: str, text: str, timeout: float = 180) -> None:
    """Wait until process ``key``'s log holds ``text``; fail if it ends first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in cluster.log(key):
            return
        assert cluster.procs[key].poll() is None, cluster.log(key)[-4000:]
        time.sleep(0.5)
    raise AssertionError(f"{key} did not start: {cluster.log(key)[-4000:]}")
