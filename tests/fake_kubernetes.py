"""A read-only fake Kubernetes API server for `helm --dry-run=server` and `kubectl --dry-run=client`.

It serves discovery for the kinds the chart, the kustomize manifests and tests/e2e use, `/version`, GETs
and label-selected lists of the Secrets it is given (as an earlier install would have left them), GETs of
other objects it is given, and empty lists of everything else; writes are refused. Enough for helm's
`lookup`, its release-history queries and kubectl's client-side dry runs, and nothing more.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import yaml

CORE: dict[str, str] = {
    "configmaps": "ConfigMap",
    "secrets": "Secret",
    "services": "Service",
    "serviceaccounts": "ServiceAccount",
    "pods": "Pod",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "events": "Event",
}
CLUSTER_CORE: dict[str, str] = {"namespaces": "Namespace"}
GROUPS: dict[tuple[str, str], dict[str, str]] = {
    ("apps", "v1"): {"deployments": "Deployment", "statefulsets": "StatefulSet"},
    ("policy", "v1"): {"poddisruptionbudgets": "PodDisruptionBudget"},
    ("networking.k8s.io", "v1"): {"networkpolicies": "NetworkPolicy", "ingresses": "Ingress"},
    ("autoscaling", "v2"): {"horizontalpodautoscalers": "HorizontalPodAutoscaler"},
    ("rbac.authorization.k8s.io", "v1"): {"roles": "Role", "rolebindings": "RoleBinding"},
}

# (namespace, name) -> data of a Secret that "exists"
Secrets = Mapping[tuple[str, str], Mapping[str, str]]
# (namespace, resource, name) -> another object that "exists", e.g. ("catalog", "statefulsets", "db")
Objects = Mapping[tuple[str, str, str], Mapping[str, Any]]


def _resources(group_version: str, resources: dict[str, str], namespaced: bool = True) -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {
                "name": name,
                "singularName": kind.lower(),
                "namespaced": namespaced,
                "kind": kind,
                "verbs": ["get", "list"],
            }
            for name, kind in resources.items()
        ],
    }


class _Handler(BaseHTTPRequestHandler):
    secrets: ClassVar[Secrets] = {}
    objects: ClassVar[Objects] = {}
    release: ClassVar[str] = "catalog"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _secret(self, namespace: str, name: str) -> dict[str, Any]:
        meta = {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {
                "meta.helm.sh/release-name": self.release,
                "meta.helm.sh/release-namespace": namespace,
            },
        }
        data = {k: base64.b64encode(v.encode()).decode() for k, v in self.secrets[(namespace, name)].items()}
        return {"kind": "Secret", "apiVersion": "v1", "metadata": meta, "data": data}

    def _list(self, kind: str, namespace: str, selector: str) -> dict[str, Any]:
        items = []
        if kind == "Secret":
            wanted = dict(term.split("=", 1) for term in selector.split(",") if "=" in term)
            for ns, name in self.secrets:
                secret = self._secret(ns, name)
                if ns == namespace and wanted.items() <= secret["metadata"]["labels"].items():
                    items.append(secret)
        return {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {}, "items": items}

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        selector = parse_qs(url.query).get("labelSelector", [""])[0]
        if url.path == "/version":
            self._send(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"})
        elif url.path == "/api":
            self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        elif url.path == "/apis":
            groups = [
                {
                    "name": g,
                    "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                    "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                }
                for g, v in GROUPS
            ]
            self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        elif url.path == "/api/v1":
            listing = _resources("v1", CORE)
            listing["resources"] += _resources("v1", CLUSTER_CORE, namespaced=False)["resources"]
            self._send(200, listing)
        elif parts[0] == "apis" and len(parts) == 3 and (parts[1], parts[2]) in GROUPS:
            self._send(200, _resources(f"{parts[1]}/{parts[2]}", GROUPS[(parts[1], parts[2])]))
        elif "namespaces" in parts and parts.index("namespaces") + 2 < len(parts):
            self._namespaced(parts, selector)
        else:
            self._not_found()

    def _namespaced(self, parts: list[str], selector: str) -> None:
        """.../namespaces/<ns>/<resource>[/<name>] (core or group)."""
        index = parts.index("namespaces")
        namespace, rest = parts[index + 1], parts[index + 2 :]
        kinds = {**CORE, **{r: k for group in GROUPS.values() for r, k in group.items()}}
        if len(rest) == 1 and rest[0] in kinds:
            self._send(200, self._list(kinds[rest[0]], namespace, selector))
        elif len(rest) == 2 and rest[0] == "secrets" and (namespace, rest[1]) in self.secrets:
            self._send(200, self._secret(namespace, rest[1]))
        elif len(rest) == 2 and (namespace, rest[0], rest[1]) in self.objects:
            self._send(200, self.objects[(namespace, rest[0], rest[1])])
        else:
            self._not_found()

    def _not_found(self) -> None:
        self._send(
            404,
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404},
        )

    def _refuse(self) -> None:
        self._send(
            405,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": "read-only fake",
                "code": 405,
            },
        )

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse


@contextmanager
def fake_kubernetes(
    directory: Path, secrets: Secrets, namespace: str, objects: Objects | None = None
) -> Iterator[Path]:
    """Serve a fake API with `secrets` (and other `objects`); yield a kubeconfig (context namespace
    `namespace`) pointing at it."""
    handler = type("Handler", (_Handler,), {"secrets": dict(secrets), "objects": dict(objects or {})})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = directory / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}
                ],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "namespace": namespace}}],
                "current-context": "fake",
                "users": [],
            }
        )
    )
    config.chmod(0o600)
    try:
        yield config
    finally:
        server.shutdown()
        server.server_close()
