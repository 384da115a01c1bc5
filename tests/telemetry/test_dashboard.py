"""The Grafana dashboard (deploy/grafana/tensorwire.json), checked against a real
Prometheus scraping a live server under load: every template variable resolves, every
panel's query evaluates without error and returns series with values, and every metric
the server exports is on it. GPU panels (their queries read only tensorwire_gpu_*) must
return series only where the server exposes GPU metrics (CUDA with NVML); on a CPU
server their queries must still evaluate."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.deploy_files import run, tool
from support.prometheus import JOB, Prometheus, QueryError, running_prometheus

import tensorwire as tw
from tensorwire_server.server import TensorwireServer, build_engine
from tensorwire_server.settings import Settings

pytestmark = pytest.mark.timeout(120)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tensorwire.json"
#: What the test puts for Grafana's interval variables: several 1 s scrapes.
INTERVALS = {"__rate_interval": "10s", "__interval": "10s", "__range": "1m"}
#: Exported metric families the dashboard leaves out, and why.
NOT_ON_DASHBOARD = {
    "tensorwire_batch_size": "tensorwire_model_batch_size has the same, with the version",
}
GPU_PREFIX = "tensorwire_gpu_"
METRIC = re.compile(r"\btensorwire_\w+")
SUFFIX = re.compile(r"_(bucket|count|sum|total)$")
BIG = np.arange(3 << 20, dtype=np.float32).reshape(3, -1)  # 12 MiB: the data port's


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that query (rows hold none), nested ones included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return found


def metrics_in(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def is_gpu_only(panel: dict[str, Any]) -> bool:
    names = set().union(*(metrics_in(t["expr"]) for t in panel["targets"]))
    return bool(names) and all(n.startswith(GPU_PREFIX) for n in names)


def substitute(text: str, values: dict[str, str]) -> str:
    """``text`` with $name and ${name} replaced as Grafana replaces them; an unknown
    variable fails the test."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {text}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


# ------------------------------------------------------- the dashboard file alone


def test_the_dashboard_is_a_current_grafana_dashboard_on_a_prometheus_variable() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "model"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"]
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    assert "tensorwire_model_request_seconds_count" in variables["model"]["definition"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in query_panels(dashboard):
        where = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, where
        assert panel["targets"] and panel["description"], where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", where
            assert '=~"$instance"' in target["expr"], f"{where}: not filtered by instance"
        if is_gpu_only(panel):
            assert panel["description"].startswith("GPU only"), where
    # The panels the issue asks for, GPU ones among them.
    titles = " | ".join(p["title"].lower() for p in query_panels(dashboard))
    for words in ("request rate", "errors by code", "latency per model", "queue time per model",
                  "compute time", "batch size", "by path", "in flight per model", "gpu utilisation",
                  "gpu memory", "sessions", "regions"):  # fmt: skip
        assert words in titles, words


# ------------------------------------------------ against Prometheus, under load


@pytest.fixture(scope="module")
def server() -> Iterator[TensorwireServer]:
    settings = Settings(
        port=0,
        device="auto",  # a GPU where there is one: its panels are then held to series too
        metrics_port=0,
        models={"sleeper": "support.toy_models:sleeper"},
    )
    server = TensorwireServer(settings, build_engine(settings))
    server.start()
    try:
        yield server
    finally:
        server.stop(None)


def load(address: str, stop: threading.Event, errors: list[Exception]) -> None:
    """Every kind of traffic the dashboard shows, in rounds until ``stop``: small and
    batched inferences through gRPC, 12 MiB ones through shared memory (a client on this
    host) and the data port (same_host=False), a function call, calls that fail (unknown
    model, wrong shape), and a session holding tensors."""
    try:
        with (
            tw.Client(address, timeout=30) as near,
            tw.Client(address, timeout=30, same_host=False) as far,
        ):
            while not stop.is_set():
                near.infer("mlp", {"input": np.ones((4, 16), np.float32)})
                near.infer("identity", {"input": BIG})
                far.infer("identity", {"input": BIG})
                near.call("add", np.ones(3), np.ones(3))
                with pytest.raises(tw.NotFoundError):
                    near.infer("nobody", {"input": np.ones((1, 16), np.float32)})
                with pytest.raises(tw.TensorwireError):
                    near.infer("mlp", {"input": np.ones((2, 3), np.float32)})
                held = near.put(np.ones(1024, np.float32))
                near.session_info()
                near.free(held)
                stop.wait(0.1)
    except Exception as exc:  # the test reports it
        errors.append(exc)


def slow_calls(address: str, stop: threading.Event, errors: list[Exception]) -> None:
    """A model request always running (a second each): per-model in-flight has series."""
    try:
        with tw.Client(address, timeout=30) as client:
            while not stop.is_set():
                client.infer("sleeper", {"x": np.float64(1.0)})
    except Exception as exc:  # the test reports it
        errors.append(exc)


def exported_families(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    # The plain-text parser reads each counter's and histogram's _created samples as
    # families of their own: creation times, not metrics to chart.
    return {
        f.name
        for f in text_string_to_metric_families(text)
        if f.name.startswith("tensorwire") and not f.name.endswith("_created")
    }


def wait_for(
    prometheus: Prometheus, names: set[str], since: float, deadline: float
) -> tuple[set[str], float]:
    """Wait until Prometheus holds a series of each of ``names`` and five scrapes of
    traffic (bounded by ``deadline``); what is still missing, and the scrapes seen."""
    missing, scrapes = set(names), 0.0
    while time.monotonic() < deadline:
        missing = {n for n in missing if not prometheus.series(n, since)}
        counted = prometheus.query(
            'count_over_time(tensorwire_model_request_seconds_count{model="identity"}[10s])'
        )
        scrapes = min((float(s["value"][1]) for s in counted), default=0.0)
        if not missing and scrapes >= 5:
            break
        time.sleep(0.5)
    return missing, scrapes


def test_every_panel_query_answers_from_a_real_prometheus(
    server: TensorwireServer, tmp_path: Path
) -> None:
    dashboard = load_dashboard()
    panels = query_panels(dashboard)
    address = f"127.0.0.1:{server.port}"
    assert server.metrics_port
    on_gpu = any(f.startswith(GPU_PREFIX) for f in exported_families(server.metrics_port))
    used = set().union(*(metrics_in(t["expr"]) for p in panels for t in p["targets"]))
    needed = used if on_gpu else {n for n in used if not n.startswith(GPU_PREFIX)}

    with running_prometheus([f"127.0.0.1:{server.metrics_port}"], tmp_path) as prometheus:
        since = time.time() - 60
        stop, errors = threading.Event(), list[Exception]()
        workers = [
            threading.Thread(target=load, args=(address, stop, errors), daemon=True),
            threading.Thread(target=slow_calls, args=(address, stop, errors), daemon=True),
        ]
        for worker in workers:
            worker.start()
        try:
            missing, scrapes = wait_for(prometheus, needed, since, time.monotonic() + 45)
            assert not errors, errors
            # The load still runs: every window ends in traffic.
            at = time.time()
            values = resolve_variables(dashboard, prometheus, since)
            failures, report = evaluate(panels, values, prometheus, at, on_gpu)
            failures += scaling_signals(prometheus, at)
        finally:
            stop.set()
            for worker in workers:
                worker.join(30)
    print("\n".join(report))
    assert not errors, errors
    if missing:
        failures.append(f"Prometheus never saw {sorted(missing)} ({scrapes:.0f} scrapes)")
    assert not failures, "\n".join(failures)


def resolve_variables(
    dashboard: dict[str, Any], prometheus: Prometheus, since: float
) -> dict[str, str]:
    """Each query variable's values, as Grafana finds them (``label_values(selector,
    label)``, earlier variables substituted), joined into the regex a multi-value
    variable becomes; the models must include those the load called."""
    values = dict(INTERVALS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = substitute(variable["query"]["query"], values)
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
        assert match, f"${variable['name']}: not label_values(selector, label): {definition}"
        found = prometheus.label_values(match.group(2), match.group(1), since)
        assert found, f"${variable['name']} has no values: {definition}"
        # Regex-escaped, the backslashes doubled for PromQL's string: as Grafana does.
        escaped = (re.escape(v).replace("\\", "\\\\") for v in found)
        values[variable["name"]] = "(" + "|".join(escaped) + ")"
    assert values["job"] == f"({JOB})"
    models = set(values["model"].replace("\\", "").strip("()").split("|"))
    assert {"mlp", "identity", "sleeper"} <= models, models
    return values


def evaluate(
    panels: list[dict[str, Any]],
    values: dict[str, str],
    prometheus: Prometheus,
    at: float,
    on_gpu: bool,
) -> tuple[list[str], list[str]]:
    """Every panel's every target at ``at``: the failures (an error; no series; only
    NaN), and a line per target saying what it returned."""
    failures, report = [], []
    for panel in panels:
        gpu_only = is_gpu_only(panel) and not on_gpu
        for target in panel["targets"]:
            where = f"{panel['title']} [{target['refId']}]"
            expr = substitute(target["expr"], values)
            try:
                result = prometheus.query(expr, at)
            except QueryError as exc:
                failures.append(f"{where}: {exc}\n    {expr}")
                continue
            finite = [s for s in result if math.isfinite(float(s["value"][1]))]
            report.append(
                f"{where}: {len(result)} series, {len(finite)} with values"
                + (" (GPU only: may be empty on a CPU server)" if gpu_only else "")
            )
            if gpu_only:
                continue
            if not result:
                failures.append(f"{where}: no series\n    {expr}")
            elif not finite:
                failures.append(f"{where}: only NaN\n    {expr}")
    return failures, report


def scaling_signals(prometheus: Prometheus, at: float) -> list[str]:
    """The autoscalers' queries (deploy/kustomize: prometheus-adapter's rule for the
    HPA, KEDA's trigger) answer from the same Prometheus: one finite value each. The
    cluster's namespace and pod labels become this scrape's job and instance."""
    components = DASHBOARD.parents[2] / "deploy" / "kustomize" / "components"
    rules = yaml.safe_load((components / "hpa" / "adapter-rules.yaml").read_text())
    (rule,) = yaml.safe_load(rules["data"]["config.yaml"])["rules"]
    adapter = (
        rule["metricsQuery"]
        .replace("<<.LabelMatchers>>", f'job="{JOB}"')
        .replace("<<.GroupBy>>", "instance")
    )
    scaled = yaml.safe_load((components / "keda" / "scaledobject.yaml").read_text())
    keda = re.sub(
        r'namespace="[^"]*"', f'job="{JOB}"', scaled["spec"]["triggers"][0]["metadata"]["query"]
    )
    failures = []
    for name, expr in (("prometheus-adapter rule", adapter), ("KEDA trigger", keda)):
        try:
            result = prometheus.query(expr, at)
        except QueryError as exc:
            failures.append(f"{name}: {exc}\n    {expr}")
            continue
        if len(result) != 1 or not math.isfinite(float(result[0]["value"][1])):
            failures.append(f"{name}: not one finite value: {result}\n    {expr}")
    return failures


def test_every_exported_metric_is_on_the_dashboard(server: TensorwireServer) -> None:
    assert server.metrics_port
    panels = query_panels(load_dashboard())
    used = {
        SUFFIX.sub("", name)
        for panel in panels
        for target in panel["targets"]
        for name in metrics_in(target["expr"])
    }
    exported = exported_families(server.metrics_port)
    absent = exported - used - set(NOT_ON_DASHBOARD)
    assert not absent, f"exported but on no panel: {sorted(absent)}"
    # GPU panels' metrics are exported where there are GPUs; the rest always.
    unknown = {n for n in used - exported if not n.startswith(GPU_PREFIX)}
    assert not unknown, f"panels read metrics the server does not export: {sorted(unknown)}"


# ----------------------------------------------- CI's install of the prometheus binary

CI_SCRIPT = DASHBOARD.parents[2] / "scripts" / "ci-prometheus"


def test_the_ci_install_script_is_shellcheck_clean() -> None:
    done = run(tool("shellcheck"), str(CI_SCRIPT))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_ci_install_script_does_nothing_outside_ci() -> None:
    """scripts/test runs it first on every machine: outside CI it installs nothing,
    says nothing and never fails."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    done = subprocess.run(
        [str(CI_SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
