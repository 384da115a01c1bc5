"""tensorwire on a real two-node Ray cluster (server/tensorwire_server/on_ray): the head
and a worker in two network namespaces, the fleet on the head, clients on the head
reaching the replicas by the fleet's DNS name. One cluster for the module; each test
deploys its own fleet and ends it (drained). Skipped without root, namespaces or Ray.
"""

from __future__ import annotations

import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from support.ray_cluster import HEAD_IP, NAME, PORT, WORKER_IP, Cluster, fleet, ray_cluster

pytestmark = pytest.mark.timeout(900)

TARGET = f"{NAME}:{PORT}"
HEAD, WORKER = f"{HEAD_IP}:{PORT}", f"{WORKER_IP}:{PORT}"


def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line ``proc`` prints, waiting ``timeout`` seconds at most."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line in {timeout} s"
    return proc.stdout.readline()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with ray_cluster() as made:
        yield made


def test_two_replicas_serve_and_a_big_call_takes_the_remote_data_port(cluster: Cluster) -> None:
    with fleet(cluster, "--replicas", "2", server=("--insecure",)) as deployed:
        placed = {r["address"]: r for r in deployed.wait_for(2)}
        assert set(placed) == {HEAD, WORKER}, placed  # spread: one replica per node
        before = cluster.client("stats", f"{HEAD},{WORKER}")["requests"]
        assert cluster.client("calls", TARGET, n=40)["failed"] == []
        after = cluster.client("stats", f"{HEAD},{WORKER}")["requests"]
        served = {a: after[a] - before[a] for a in after}
        assert all(n > 0 for n in served.values()), served  # round robin over both
        assert sum(served.values()) == 40, served
        # 64 MiB each way to the replica on the other node, over its data port.
        remote = placed[WORKER]
        report = cluster.client(
            "big", WORKER, mib=64, metrics=f"http://{WORKER_IP}:{remote['metrics_port']}/metrics"
        )
        assert report["equal"], report
        assert report["tcp_bytes"] >= 2 * (64 << 20), report


def test_the_fleet_grows_on_load_and_shrinks_when_idle_and_no_call_fails(
    cluster: Cluster,
) -> None:
    with fleet(
        cluster, "--replicas", "1", "--max-replicas", "2", "--target-load", "2",
        "--scale-up-seconds", "1", "--scale-down-seconds", "4",
        # Callers re-resolve the name as their connections age: within the load's 45 s
        # even when the new replica takes half a minute to start on a busy machine.
        server=("--insecure", "--max-connection-age", "10"),
    ) as deployed:  # fmt: skip
        deployed.wait_for(1)
        # Callers through scale-up, a while on two replicas, then scale-down.
        heavy = subprocess.Popen(
            cluster.client_argv("load", TARGET, {"threads": 12, "seconds": 60}),
            stdout=subprocess.PIPE, text=True, env=cluster.env,
        )  # fmt: skip
        light = subprocess.Popen(
            cluster.client_argv("load", TARGET, {"threads": 1, "seconds": 90}),
            stdout=subprocess.PIPE, text=True, env=cluster.env,
        )  # fmt: skip
        try:
            began = time.monotonic()
            grown = deployed.wait_for(2, timeout=60)
            grew_in = time.monotonic() - began
            assert {r["address"] for r in grown} == {HEAD, WORKER}
            # The callers find the new replica (on the worker) as their connections age.
            while cluster.client("stats", WORKER)["requests"][WORKER] == 0:
                assert heavy.poll() is None, "the load ended before the new replica served"
                time.sleep(2)
            heavy_out, _ = heavy.communicate(timeout=120)
            shrunk = deployed.wait_for(1, timeout=60)
            light_out, _ = light.communicate(timeout=120)
        finally:
            for proc in (heavy, light):
                proc.kill()
                proc.wait()
        log = cluster.log("fleet")
        assert "scaling down: draining" in log, log[-3000:]
        for out in (heavy_out, light_out):
            report = __import__("json").loads(out.strip().splitlines()[-1])
            assert report["failed"] == {} and report["ok"] > 0, report
        assert len(shrunk) == 1
        print(f"scale-up 1 -> 2 replicas under load: {grew_in:.1f} s")


def test_a_node_lost_and_back(cluster: Cluster, tmp_path: Path) -> None:
    with fleet(cluster, "--replicas", "2", server=("--insecure",)) as deployed:
        deployed.wait_for(2)
        flag = tmp_path / "cut"
        pinned = subprocess.Popen(
            cluster.client_argv("session", WORKER, {"wait_file": str(flag), "deadline": 50}),
            stdout=subprocess.PIPE, text=True, env=cluster.env,
        )  # fmt: skip
        load: subprocess.Popen[str] | None = None
        try:
            assert "opened" in first_line(pinned, timeout=120)
            load = subprocess.Popen(
                cluster.client_argv("load", TARGET, {"threads": 4, "seconds": 30, "deadline": 60}),
                stdout=subprocess.PIPE, text=True, env=cluster.env,
            )  # fmt: skip
            time.sleep(3)
            cluster.link(False)
            flag.touch()
            session_out, _ = pinned.communicate(timeout=120)
            load_out, _ = load.communicate(timeout=180)
            survivors = deployed.wait_for(1, timeout=60)
        finally:
            cluster.link(True)
            for proc in (pinned, load):
                if proc is not None:
                    proc.kill()
                    proc.wait()
        json = __import__("json")
        report = json.loads(load_out.strip().splitlines()[-1])
        assert report["failed"] == {} and report["ok"] > 0, report  # idempotent calls finish
        session = json.loads(session_out.strip().splitlines()[-1])
        assert session["again"] == "UnavailableError", session
        assert WORKER in session["message"], session  # the error names the lost replica
        assert [r["address"] for r in survivors] == [HEAD]
        # The link back: Ray may have declared the node dead (its raylet then exits,
        # and its supervisor starts it again, as here); the fleet places a replica
        # there once more, and both serve.
        time.sleep(2)
        if not cluster.worker_alive():
            cluster.start_worker()
        assert {r["address"] for r in deployed.wait_for(2, timeout=120)} == {HEAD, WORKER}
        before = cluster.client("stats", f"{HEAD},{WORKER}")["requests"]
        assert cluster.client("calls", TARGET, n=20)["failed"] == []
        after = cluster.client("stats", f"{HEAD},{WORKER}")["requests"]
        assert all(after[a] > before[a] for a in after), (before, after)


def test_tls_and_tokens_on_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert(NAME, HEAD_IP, WORKER_IP)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    token = "t" * 32
    (tmp_path / "tokens").write_text(f"ops * {token}\n")
    tls = (
        "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
        "--tokens-file", str(tmp_path / "tokens"),
    )  # fmt: skip
    with fleet(cluster, "--replicas", "2", server=tls) as deployed:
        placed = {r["address"]: r for r in deployed.wait_for(2)}
        ca_file = str(tmp_path / "ca.pem")
        good = cluster.client("calls", TARGET, n=20, ca=ca_file, token=token)
        assert good["failed"] == [], good
        bad = cluster.client("calls", TARGET, n=1, ca=ca_file, token="x" * 32)
        assert bad["failed"] and bad["failed"][0].startswith("UnauthenticatedError"), bad
        # Bulk bytes over the remote replica's data port, in TLS.
        big = cluster.client(
            "big", WORKER, mib=16, ca=ca_file, token=token,
            metrics=f"http://{WORKER_IP}:{placed[WORKER]['metrics_port']}/metrics",
        )  # fmt: skip
        assert big["equal"] and big["tcp_bytes"] >= 2 * (16 << 20), big
