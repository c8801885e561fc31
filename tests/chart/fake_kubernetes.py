"""The chart tests' fake Kubernetes API: discovery for the chart's kinds and an earlier install's objects,
so `helm template --dry-run=server` runs the chart's `lookup` calls as an upgrade on a cluster would."""

from __future__ import annotations

import base64
import json
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

RELEASE = "catalog"
NAMESPACE = "catalog"


class FakeKubernetes(BaseHTTPRequestHandler):
    """A read-only Kubernetes API with discovery for the chart's kinds and some Secrets of an earlier install,
    so `helm template --dry-run=server` runs the chart's `lookup` calls like an upgrade does."""

    core: ClassVar[dict[str, str]] = {
        "configmaps": "ConfigMap",
        "secrets": "Secret",
        "services": "Service",
        "serviceaccounts": "ServiceAccount",
        "pods": "Pod",
        "persistentvolumeclaims": "PersistentVolumeClaim",
    }
    groups: ClassVar[dict[tuple[str, str], dict[str, str]]] = {
        ("apps", "v1"): {"deployments": "Deployment", "statefulsets": "StatefulSet"},
        ("policy", "v1"): {"poddisruptionbudgets": "PodDisruptionBudget"},
        ("networking.k8s.io", "v1"): {"networkpolicies": "NetworkPolicy", "ingresses": "Ingress"},
        ("autoscaling", "v2"): {"horizontalpodautoscalers": "HorizontalPodAutoscaler"},
    }
    secrets: ClassVar[dict[str, dict[str, str]]] = {
        f"{RELEASE}-api-keys": {"default": "rotated-key-" + "a" * 30, "second": "another-key-" + "b" * 30},
        f"{RELEASE}-redis": {"password": "existing-redis-password-" + "r" * 20},
    }
    # Other objects of the earlier install, by API path (a test sets them and resets them afterwards).
    objects: ClassVar[dict[str, dict[str, Any]]] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    @staticmethod
    def _resources(group_version: str, resources: dict[str, str]) -> dict[str, Any]:
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": [
                {"name": n, "singularName": k.lower(), "namespaced": True, "kind": k, "verbs": ["get"]}
                for n, k in resources.items()
            ],
        }

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        name = path.rpartition("/")[2]
        if path == "/version":
            self._send(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"})
        elif path == "/api":
            self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        elif path == "/apis":
            groups = [
                {
                    "name": g,
                    "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                    "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                }
                for g, v in self.groups
            ]
            self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        elif path == "/api/v1":
            self._send(200, self._resources("v1", self.core))
        elif path.startswith("/apis/") and tuple(path.split("/")[2:]) in self.groups:
            group, version = path.split("/")[2:]
            self._send(200, self._resources(f"{group}/{version}", self.groups[(group, version)]))
        elif path in self.objects:
            self._send(200, self.objects[path])
        elif path.rpartition("/")[0] == f"/api/v1/namespaces/{NAMESPACE}/secrets" and name in self.secrets:
            meta = {
                "name": name,
                "namespace": NAMESPACE,
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {
                    "meta.helm.sh/release-name": RELEASE,
                    "meta.helm.sh/release-namespace": NAMESPACE,
                },
            }
            data = {k: base64.b64encode(v.encode()).decode() for k, v in self.secrets[name].items()}
            self._send(200, {"kind": "Secret", "apiVersion": "v1", "metadata": meta, "data": data})
        else:
            self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
