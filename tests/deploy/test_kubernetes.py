"""The cluster manifests: deploy/kubernetes (the Deployment, its Service, ConfigMap,
volume claim and disruption budget) and deploy/kserve (the ServingRuntime and the
InferenceService), checked against the Kubernetes schemas (kubernetes-validate, from
the dev extra, offline) and against the settings and the image they rely on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support.deploy_files import KSERVE, KUBERNETES, VARIABLES, env_of, final_stage

from tensorwire._transport.methods import SERVICE
from tensorwire_server.settings import ENV_PREFIX, Settings

#: The oldest Kubernetes with gRPC probes on by default (GA in 1.27), and the newest
#: whose schemas kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


# ---------------------------------------------------------------------- Kubernetes


def manifests() -> dict[str, dict[str, Any]]:
    """Every object under deploy/kubernetes, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # the base of deploy/kustomize, not an object
            continue
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']}s"
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kubernetes_manifests_match_the_kubernetes_schemas(version: str) -> None:
    objects = manifests()
    assert set(objects) == {
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
    }
    for document in objects.values():
        kubernetes_validate.validate(document, version, strict=True)
    # The schemas bite: a misspelt field is refused.
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_deployment_asks_for_a_gpu_probes_grpc_health_and_mounts_its_secrets() -> None:
    objects = manifests()
    config = objects["ConfigMap"]["data"]
    settings = Settings.from_env(config)  # every variable a valid setting
    assert set(config) <= VARIABLES
    assert settings.host == "0.0.0.0" and settings.device == "cuda"
    assert settings.tls_cert and settings.tls_key and settings.tokens_file
    assert settings.max_connection_age is not None
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["envFrom"] == [
        {"configMapRef": {"name": objects["ConfigMap"]["metadata"]["name"]}}
    ]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["limits"]) & set(resources["requests"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == settings.port and ports["health"] == settings.health_port
    assert ports["http"] == settings.http_port  # the REST API
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe_name]["grpc"]["port"] == settings.health_port, probe_name
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE.full_name
    # Non-root, as the image's numeric user, on a read-only root with /tmp to write.
    (user,) = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "persistentVolumeClaim" in volumes[mounts[settings.model_repo or ""]]
    # torch.compile's cache survives a container's restart in its pod.
    assert "emptyDir" in volumes[mounts[settings.compile_cache_dir or ""]]
    # The TLS files and the tokens file the settings name come from secrets.
    for path in (settings.tls_cert, settings.tls_key, settings.tokens_file):
        volume = volumes[mounts[str(Path(str(path)).parent)]]
        assert "secret" in volume, path
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace


def test_a_headless_service_and_a_disruption_budget_select_the_pods() -> None:
    objects = manifests()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]["spec"]
    assert service["clusterIP"] == "None"  # headless: DNS answers every pod's address
    assert service["selector"].items() <= labels.items()
    assert {"name": "grpc", "port": 50051}.items() <= service["ports"][0].items()
    assert {"name": "http", "port": 8000, "targetPort": "http"} in [
        {k: p[k] for k in ("name", "port", "targetPort")} for p in service["ports"]
    ]
    budget = objects["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1
    assert objects["Deployment"]["spec"]["replicas"] > budget["maxUnavailable"]


# ---------------------------------------------------------------------- KServe


def kserve() -> tuple[dict[str, Any], dict[str, Any]]:
    """The ServingRuntime and the InferenceService under deploy/kserve."""
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    service = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    return runtime, service


def as_pod(container: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [container]},
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kserve_containers_match_the_kubernetes_pod_schema(version: str) -> None:
    # KServe's CRDs embed core Containers and ResourceRequirements; check them against
    # the Kubernetes schemas (the CRD schemas themselves are KServe's, not carried here).
    runtime, service = kserve()
    (container,) = runtime["spec"]["containers"]
    kubernetes_validate.validate(as_pod(container), version, strict=True)
    predictor = {
        "name": "p",
        "image": "i",
        "resources": service["spec"]["predictor"]["model"]["resources"],
    }
    kubernetes_validate.validate(as_pod(predictor), version, strict=True)
    broken = copy.deepcopy(container)
    broken["livenessProbe"]["grcp"] = broken["livenessProbe"].pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_pod(broken), version, strict=True)


def test_the_kserve_runtime_serves_grpc_v2_from_mnt_models_with_the_image_health_port() -> None:
    runtime, service = kserve()
    assert runtime["kind"] == "ServingRuntime" and service["kind"] == "InferenceService"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= VARIABLES | {"HOME"}
    image_env = env_of(final_stage())
    settings = Settings.from_env(
        {k: v for k, v in (image_env | env).items() if k.startswith(ENV_PREFIX)}
    )
    # KServe's storage initializer puts the storageUri in /mnt/models.
    assert settings.model_repo == "/mnt/models" and settings.host == "0.0.0.0"
    assert env["HOME"].startswith("/tmp")  # writable on the read-only root
    (port,) = container["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == settings.port
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe_name]["grpc"]["port"] == settings.health_port, probe_name
    assert runtime["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(
        settings.metrics_port
    )
    (user,) = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert str(container["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The InferenceService picks this runtime by format and name, on one GPU.
    (model_format,) = spec["supportedModelFormats"]
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == model_format["name"] == "tensorwire"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_kserve_rest_runtime_declares_the_rest_port_as_http1() -> None:
    """KServe gives a runtime's container one port: the REST runtime's is the v2 REST
    API (http1), with everything else as the gRPC runtime has it."""
    grpc_runtime, _ = kserve()
    runtime = yaml.safe_load((KSERVE / "servingruntime-rest.yaml").read_text())
    spec = runtime["spec"]
    assert runtime["metadata"]["name"] == "tensorwire-rest"
    assert spec["protocolVersions"] == ["v2"]
    (model_format,) = spec["supportedModelFormats"]
    assert model_format["name"] == "tensorwire" and model_format["autoSelect"] is False
    (container,) = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    image_env = env_of(final_stage())
    settings = Settings.from_env(
        {k: v for k, v in (image_env | env).items() if k.startswith(ENV_PREFIX)}
    )
    (port,) = container["ports"]
    assert port["name"] == "http1" and port["containerPort"] == settings.http_port
    assert settings.port != settings.http_port and settings.model_repo == "/mnt/models"
    (grpc_container,) = grpc_runtime["spec"]["containers"]
    for key in ("image", "startupProbe", "readinessProbe", "livenessProbe", "securityContext"):
        assert container[key] == grpc_container[key], key
    assert "servingruntime-rest.yaml" in (KSERVE / "kustomization.yaml").read_text()
