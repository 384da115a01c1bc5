"""The kustomize overlays (deploy/kustomize: CPU, GPU, GPU with KEDA, KServe), rendered
by ``kubectl kustomize`` and checked: built-in kinds against the Kubernetes schemas,
the Prometheus Operator and KEDA resources against theirs (support/crd_schemas.py),
and the wiring between them: what scales what, on which metric, scraped from where."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support.crd_schemas import CUSTOM
from support.deploy_files import ROOT

from tensorwire_server.settings import Settings
from tensorwire_server.telemetry.metrics import Metrics

OVERLAYS = ROOT / "deploy" / "kustomize" / "overlays"
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
NAMESPACE = "tensorwire"


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` makes of an overlay."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: it renders the kustomize overlays")
    done = subprocess.run(
        [kubectl, "kustomize", str(OVERLAYS / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for document in objects:
        found.setdefault(document["kind"], document)
    return found


def exposed() -> set[str]:
    """The sample names the server's metrics endpoint exposes (histograms' too)."""
    names = set()
    for family in Metrics(None, "none").registry.collect():
        # A labelled family has no samples before its first observation: its names.
        suffixes = {
            "histogram": ("_bucket", "_sum", "_count"),
            "counter": ("_total",),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def metric_names(query: str) -> set[str]:
    return set(re.findall(r"\btensorwire_[a-z_]+", query))


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "gpu-keda", "kserve"])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_each_overlay_renders_objects_that_match_their_schemas(overlay: str, version: str) -> None:
    objects = render(overlay)
    assert objects
    for document in objects:
        assert document["metadata"].get("namespace") == NAMESPACE, document["metadata"]
        custom = CUSTOM.get((document["apiVersion"], document["kind"]))
        if custom is not None:
            jsonschema.validate(document, custom)
        elif document["apiVersion"].startswith("serving.kserve.io/"):
            continue  # KServe's own CRDs: test_kubernetes.py checks their containers
        else:
            kubernetes_validate.validate(document, version, strict=True)


def test_the_custom_schemas_bite() -> None:
    objects = by_kind(render("gpu-keda"))
    for kind, misspelt in (("ServiceMonitor", "endpionts"), ("ScaledObject", "minReplicas")):
        broken = copy.deepcopy(objects[kind])
        broken["spec"][misspelt] = 1
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, CUSTOM[(broken["apiVersion"], kind)])


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_hpa_scales_the_deployment_on_the_adapters_queue_time(overlay: str) -> None:
    objects = by_kind(render(overlay))
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    deployment = objects["Deployment"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    # prometheus-adapter serves that name, computed from metrics the server exposes.
    adapter = next(
        d
        for d in render(overlay)
        if d["kind"] == "ConfigMap" and "adapter" in d["metadata"]["name"]
    )
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == name
    assert metric_names(rule["seriesQuery"]) <= exposed()
    assert metric_names(rule["metricsQuery"]) and metric_names(rule["metricsQuery"]) <= exposed()
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_keda_scales_the_deployment_on_the_same_signal() -> None:
    objects = by_kind(render("gpu-keda"))
    assert "HorizontalPodAutoscaler" not in objects  # KEDA makes its own
    scaled = objects["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    query = trigger["metadata"]["query"]
    assert metric_names(query) == {
        "tensorwire_model_queue_seconds_sum",
        "tensorwire_model_queue_seconds_count",
    }
    assert metric_names(query) <= exposed()
    assert f'namespace="{NAMESPACE}"' in query
    float(trigger["metadata"]["threshold"])


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "gpu-keda"])
def test_the_service_monitor_scrapes_the_metrics_port_of_the_pods(overlay: str) -> None:
    objects = by_kind(render(overlay))
    monitor = objects["ServiceMonitor"]["spec"]
    service = objects["Service"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    (endpoint,) = monitor["endpoints"]
    config = Settings.from_env(objects["ConfigMap"]["data"])
    assert ports[endpoint["port"]]["port"] == config.metrics_port


def test_the_cpu_overlay_asks_for_no_gpu() -> None:
    objects = render("cpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(objects)
    found = by_kind(objects)
    assert Settings.from_env(found["ConfigMap"]["data"]).device == "cpu"
    (container,) = found["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "tensorwire:cpu"
    assert "tolerations" not in found["Deployment"]["spec"]["template"]["spec"]


def test_the_kserve_pod_monitor_scrapes_the_predictor_pods() -> None:
    objects = by_kind(render("kserve"))
    monitor = objects["PodMonitor"]["spec"]
    service = objects["InferenceService"]
    assert monitor["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": service["metadata"]["name"]
    }
    (container,) = objects["ServingRuntime"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert str(endpoint["portNumber"]) == env["TENSORWIRE_METRICS_PORT"]
