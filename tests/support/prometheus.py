"""A real Prometheus server for tests: ``running_prometheus`` starts the ``prometheus``
binary (Debian's package; CI installs it where apt answers, scripts/ci-prometheus)
scraping the given targets every second, its storage in a test's tmp dir, on a free
loopback port; ``Prometheus`` asks its HTTP API. A test skips, saying why, where the
binary is absent."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: The job name the scrape config gives the targets.
JOB = "tensorwire"


def prometheus_binary() -> str:
    """The ``prometheus`` binary ($TENSORWIRE_PROMETHEUS, else on PATH, else Debian's);
    skips the test, saying why, where there is none."""
    named = os.environ.get("TENSORWIRE_PROMETHEUS")
    if named:
        if not os.access(named, os.X_OK):
            pytest.skip(f"TENSORWIRE_PROMETHEUS={named} is not an executable file")
        return named
    found = shutil.which("prometheus")
    if found is None and os.access("/usr/bin/prometheus", os.X_OK):
        found = "/usr/bin/prometheus"
    if found is None:
        pytest.skip(
            "the prometheus binary is not installed (Debian/Ubuntu: apt-get install "
            "prometheus; or set TENSORWIRE_PROMETHEUS): the dashboard's queries are unchecked"
        )
    return found


class QueryError(Exception):
    """Prometheus answered a query with an error (its message)."""


@dataclass
class Prometheus:
    """A running Prometheus's HTTP API."""

    url: str

    def get(self, path: str, **params: str | Sequence[str]) -> Any:
        """The ``data`` of an API answer; QueryError with Prometheus's message when it
        answers with an error (a bad query is a 400 with a JSON body)."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as page:
                answer = json.load(page)
        except urllib.error.HTTPError as exc:
            try:
                answer = json.load(exc)
            except ValueError:
                raise QueryError(f"HTTP {exc.code} from {path}") from exc
        if answer.get("status") != "success":
            raise QueryError(f"{answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to (a scalar as one unlabelled sample)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.get("/api/v1/query", **params)
        if data["resultType"] == "vector":
            return list(data["result"])
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise QueryError(f"{expr}: a {data['resultType']}, not an instant vector")

    def series(self, match: str, since: float) -> list[dict[str, str]]:
        """The series matching ``match`` with samples since ``since``."""
        return list(self.get("/api/v1/series", **{"match[]": match, "start": f"{since:.3f}"}))

    def label_values(self, label: str, match: str, since: float) -> list[str]:
        """The values ``label`` takes in the series matching ``match`` since ``since``."""
        params = {"match[]": match, "start": f"{since:.3f}"}
        return list(self.get(f"/api/v1/label/{label}/values", **params))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(targets: Sequence[str]) -> str:
    # JSON is YAML: no yaml dump needed for this little.
    return json.dumps(
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
        }
    )


@contextmanager
def running_prometheus(targets: Sequence[str], tmp: Path) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` ("host:port") every second until the block ends;
    then stopped by its own process (terminate, kill after 10 s)."""
    binary = prometheus_binary()
    config = tmp / "prometheus.yml"
    config.write_text(_config(targets))
    log_path = tmp / "prometheus.log"
    for _attempt in range(3):  # a port picked free may be taken before Prometheus binds it
        port = _free_port()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            api = Prometheus(f"http://127.0.0.1:{port}")
            if _ready(api, proc, deadline=time.monotonic() + 30):
                yield api
                return
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if "address already in use" not in log_path.read_text():
            break
    pytest.fail(f"prometheus did not become ready:\n{log_path.read_text()[-4000:]}")


def _ready(api: Prometheus, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether Prometheus answers /-/ready before ``deadline`` (False once it exited)."""
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{api.url}/-/ready", timeout=2) as page:
                if page.status == 200:
                    return True
        except OSError:  # not listening yet, or 503 while it replays its (empty) WAL
            pass
        time.sleep(0.1)
    return False
