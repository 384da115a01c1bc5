"""What scripts/container-check asks of the running containers, from this machine.

    container_check.py secrets DIR
        Make throwaway TLS files and a token in DIR: server.pem and server.key (for
        127.0.0.1, localhost and the compose service names), ca.pem, tokens (the
        server's), token (the client's).
    container_check.py check PROJECT SERVICE DIR REPLICAS
        Check the replicas compose started: TLS and tokens, every replica answering
        through one balancing client, the plain-text health port, the metrics port,
        the image's user and read-only root, a replica restarted under load with no
        failed call, and a drain on SIGTERM that finishes the request in flight.

It needs the repository's environment (tensorwire, trustme): scripts/_env.sh dev.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tensorwire as tw

X = np.linspace(-1, 1, 8 * 16, dtype=np.float32).reshape(8, 16)


def make_secrets(folder: Path) -> None:
    import secrets

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "tensorwire", "tensorwire-cpu")
    (folder / "server.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(folder / "server.key"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    token = secrets.token_urlsafe(24)
    (folder / "tokens").write_text(f"check * {token}\n")
    (folder / "token").write_text(token)
    for path in folder.iterdir():
        path.chmod(0o644)  # the server runs as uid 10001; these are throwaway files


def docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


class Replicas:
    """The replicas of ``service`` in compose project ``project``, and their ports."""

    def __init__(self, project: str, service: str, count: int) -> None:
        self.project, self.service = project, service
        self.containers = [f"{project}-{service}-{i}" for i in range(1, count + 1)]
        self.grpc = [self.port(c, 50051) for c in self.containers]
        self.health = [self.port(c, 50052) for c in self.containers]
        self.metrics = [self.port(c, 9100) for c in self.containers]

    @staticmethod
    def port(container: str, inner: int) -> str:
        return docker("port", container, f"{inner}/tcp").splitlines()[0]


def check(replicas: Replicas, folder: Path) -> None:
    ca = (folder / "ca.pem").read_bytes()
    token = (folder / "token").read_text()
    secure = {"root_certificates": ca, "token": token, "timeout": 60}
    addresses = replicas.grpc

    print("== TLS and tokens, every replica")
    for address in addresses:
        with tw.Client(address, **secure) as one:  # type: ignore[arg-type]
            info = one.info()
            y = one.infer("mlp", X)["output"]
            g = one.grad("mlp", X, grad_outputs=np.ones((8, 4), np.float32))
        assert {"mlp", "identity"} <= set(info.models), info.models
        assert y.shape == (8, 4) and np.isfinite(y).all()
        assert np.allclose(g.outputs["output"], y, atol=1e-5)
        print(f"{address}: {info.device.name}, torch {info.torch_version}, mlp and grad answered")
    with tw.Client(addresses[0], root_certificates=ca, timeout=10) as anonymous:
        try:
            anonymous.info()
            raise AssertionError("a call without a token was answered")
        except tw.UnauthenticatedError:
            pass
    with tw.Client(addresses[0], tls=False, timeout=5, retries=0) as plain:
        try:
            plain.info()
            raise AssertionError("a plain-text call was answered on the TLS port")
        except tw.TensorwireError:
            pass
    print("no token: UNAUTHENTICATED; plain text to the TLS port: refused")

    print("== one client over every replica")
    with tw.Client(addresses, **secure) as client:  # type: ignore[arg-type]
        for _ in range(10 * len(addresses)):
            client.infer("mlp", X)
    for address in addresses:
        with tw.Client(address, **secure) as one:  # type: ignore[arg-type]
            served = sum(s.requests for s in one.model_statistics("mlp"))
        assert served > 1, f"{address} got no balanced requests"
        print(f"{address}: {served} mlp requests")

    print("== health in plain text, metrics, the image's user and root")
    for health, metrics, container in zip(
        replicas.health, replicas.metrics, replicas.containers, strict=True
    ):
        with grpc.insecure_channel(health) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert status.status == health_pb2.HealthCheckResponse.SERVING, status
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as page:
            text = page.read().decode()
        assert 'tensorwire_requests_total{code="OK"' in text, text[:500]
        uid = docker("exec", container, "id", "-u")
        assert uid == "10001", uid
        read_only = docker("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", container)
        assert read_only == "true", read_only
        print(
            f"{container}: health SERVING on {health}, metrics on {metrics}, uid {uid}, "
            "read-only root"
        )

    if len(addresses) > 1:
        print(f"== {replicas.containers[-1]} restarted under load")
        restart_under_load(replicas, secure)

    print(f"== {replicas.containers[0]} stopped (SIGTERM) with a request in flight")
    drain(replicas, secure)


def restart_under_load(replicas: Replicas, secure: dict[str, object]) -> None:
    """Idempotent calls through the balancing client while one replica restarts: the
    client's retries carry every call to a replica that answers."""
    failures: list[BaseException] = []
    done = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal done
        with tw.Client(replicas.grpc, **secure) as client:  # type: ignore[arg-type]
            while not stop.is_set():
                try:
                    np.testing.assert_array_equal(client.infer("identity", X)["output"], X)
                    done += 1
                except BaseException as exc:
                    failures.append(exc)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(2)
    began = time.monotonic()
    docker("restart", "--time", "30", replicas.containers[-1])
    wait_healthy(replicas.containers[-1])
    restarted = time.monotonic() - began
    time.sleep(2)
    stop.set()
    for worker in workers:
        worker.join(120)
    assert not failures, failures[:3]
    print(f"{done} calls, none failed; the replica was back and healthy in {restarted:.1f} s")


def drain(replicas: Replicas, secure: dict[str, object]) -> None:
    """SIGTERM while a request runs: the request finishes, the server exits 0."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 2000))
    result: dict[str, object] = {}
    with tw.Client(replicas.grpc[0], **secure) as client:  # type: ignore[arg-type]
        client.call("linalg.svdvals", a[:100, :100])  # warm

        def slow() -> None:
            began = time.monotonic()
            result["s"] = client.call("linalg.svdvals", a)
            result["seconds"] = time.monotonic() - began

        caller = threading.Thread(target=slow)
        caller.start()
        time.sleep(0.3)
        began = time.monotonic()
        docker("stop", "--time", "40", replicas.containers[0])
        stopped = time.monotonic() - began
        caller.join(60)
    s = result.get("s")
    assert isinstance(s, np.ndarray) and s.shape == (2000,), result
    np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False), rtol=1e-8)
    code = docker("inspect", "--format", "{{.State.ExitCode}}", replicas.containers[0])
    assert code == "0", code
    print(
        f"the {result['seconds']:.1f} s request finished; the container stopped in "
        f"{stopped:.1f} s with exit code {code}"
    )


def wait_healthy(container: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", "--format", "{{json .State}}", container))
        if state.get("Health", {}).get("Status") == "healthy":
            return
        time.sleep(0.5)
    raise AssertionError(f"{container} did not become healthy again")


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "secrets":
        make_secrets(Path(args[0]))
    elif command == "check":
        project, service, folder, count = args
        check(Replicas(project, service, int(count)), Path(folder))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
