"""JSON schemas for the custom resources under deploy/kustomize, written here from the
projects' API references (Prometheus Operator's monitoring.coreos.com/v1 ServiceMonitor
and PodMonitor; KEDA's keda.sh/v1alpha1 ScaledObject), covering the fields tensorwire
could use and refusing any other: a misspelt field fails as it would against the CRD's
structural schema. The CRDs themselves are not carried: kubernetes-validate knows only
the built-in kinds."""

from __future__ import annotations

from typing import Any

_STRING: dict[str, Any] = {"type": "string"}
_DURATION: dict[str, Any] = {"type": "string", "pattern": r"^(0|(([0-9]+)(ms|s|m|h))+)$"}
_LABELS: dict[str, Any] = {"type": "object", "additionalProperties": _STRING}


def _strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_SELECTOR = _strict(
    {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": _strict(
                {
                    "key": _STRING,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": _STRING},
                },
                ("key", "operator"),
            ),
        },
    }
)
_METADATA = _strict(
    {"name": _STRING, "namespace": _STRING, "labels": _LABELS, "annotations": _LABELS},
    ("name",),
)
_RELABELINGS = {"type": "array", "items": {"type": "object"}}
_ENDPOINT = {
    "path": _STRING,
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": _DURATION,
    "scrapeTimeout": _DURATION,
    "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"},
    "relabelings": _RELABELINGS,
    "metricRelabelings": _RELABELINGS,
    "tlsConfig": {"type": "object"},
    "params": {"type": "object"},
}
_NAMESPACES = _strict({"any": {"type": "boolean"}, "matchNames": {"type": "array"}})


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _strict(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _strict(
        {
            "selector": _SELECTOR,
            "namespaceSelector": _NAMESPACES,
            "jobLabel": _STRING,
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": _strict(
                    {"port": _STRING, "targetPort": {"type": ["string", "integer"]}, **_ENDPOINT}
                ),
            },
        },
        ("selector", "endpoints"),
    ),
)

POD_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "PodMonitor",
    _strict(
        {
            "selector": _SELECTOR,
            "namespaceSelector": _NAMESPACES,
            "jobLabel": _STRING,
            "podMetricsEndpoints": {
                "type": "array",
                "minItems": 1,
                "items": _strict(
                    {
                        "port": _STRING,
                        "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                        **_ENDPOINT,
                    }
                ),
            },
        },
        ("selector",),
    ),
)

_POLICIES = {
    "type": "array",
    "items": _strict(
        {
            "type": {"enum": ["Pods", "Percent"]},
            "value": {"type": "integer", "minimum": 1},
            "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
        },
        ("type", "value", "periodSeconds"),
    ),
}
_RULES = _strict(
    {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": _POLICIES,
    }
)

SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    _strict(
        {
            "scaleTargetRef": _strict(
                {
                    "name": _STRING,
                    "kind": _STRING,
                    "apiVersion": _STRING,
                    "envSourceContainerName": _STRING,
                },
                ("name",),
            ),
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "idleReplicaCount": {"type": "integer", "minimum": 0},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "initialCooldownPeriod": {"type": "integer", "minimum": 0},
            "fallback": _strict(
                {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}},
                ("failureThreshold", "replicas"),
            ),
            "advanced": _strict(
                {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": _strict(
                        {
                            "name": _STRING,
                            "behavior": _strict({"scaleUp": _RULES, "scaleDown": _RULES}),
                        }
                    ),
                }
            ),
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": _strict(
                    {
                        "type": _STRING,
                        "name": _STRING,
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                        "metadata": _LABELS,
                        "authenticationRef": _strict({"name": _STRING, "kind": _STRING}, ("name",)),
                    },
                    ("type", "metadata"),
                ),
            },
        },
        ("scaleTargetRef", "triggers"),
    ),
)

#: The schema of each custom kind, by (apiVersion, kind).
CUSTOM: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}
