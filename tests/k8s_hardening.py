"""Reusable assertions over rendered Kubernetes manifests (the Helm chart's and the kustomize overlays').

Every function takes `docs`: the list of manifest dicts of one rendering (``yaml.safe_load_all`` output,
``None`` entries and ``List`` kinds are handled). The assertion functions raise ``AssertionError`` with a
message naming every offending object, so one failing scenario tells all that is wrong at once.

Conventions these checks rely on (from the project contract):
- the app runs in a Deployment whose container is named ``catalog`` (fallback: the one Deployment with a
  container port 8080); it runs as UID/GID 10001;
- the API keys Secret is a volume mounted at ``/var/run/secrets/catalog/api-keys`` (never ``subPath``);
- workload selectors hold exactly ``app.kubernetes.io/name`` and ``app.kubernetes.io/instance``.

Names here are stable: other test suites import them. Add new functions rather than changing old ones.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any

APP_CONTAINER = "catalog"
APP_UID = 10001
APP_PORT = 8080
API_KEYS_DIR = "/var/run/secrets/catalog/api-keys"
METRICS_DIR = "/tmp/metrics"
GUNICORN_GRACEFUL_TIMEOUT = 30
SELECTOR_KEYS = frozenset({"app.kubernetes.io/name", "app.kubernetes.io/instance"})

#: kind -> path (list of keys) from the object to its pod template spec (None: the object is a Pod)
WORKLOAD_KINDS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}

# Environment variable names that may carry a literal value even though they mention a secret word.
_ENV_NAME_ALLOWED_SUFFIXES = ("_FILE", "_DIR", "_HEADER", "_PATH", "_HOPS")
_SECRETISH_ENV_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|CREDENTIAL|PRIVATE", re.I)
_URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.I)


# --------------------------------------------------------------------------------------------- lookups


def flatten(docs: Iterable[Any]) -> list[dict]:
    """The manifest dicts of `docs`, without ``None`` entries and with ``kind: List`` expanded."""
    out: list[dict] = []
    for doc in docs:
        if not doc:
            continue
        if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
            out.extend(flatten(doc.get("items") or []))
        else:
            out.append(doc)
    return out


def ref(doc: dict) -> str:
    """``Kind/name`` of a manifest, for messages."""
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def of_kind(docs: Iterable[Any], kind: str) -> list[dict]:
    """All manifests of one `kind`."""
    return [d for d in flatten(docs) if d.get("kind") == kind]


def _dig(obj: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        obj = (obj or {}).get(key)
    return obj


def workload_pod_specs(docs: Iterable[Any]) -> list[tuple[str, dict]]:
    """``(Kind/name, pod spec)`` for every workload (Pod, Deployment, StatefulSet, DaemonSet, Job, ...)."""
    out = []
    for doc in flatten(docs):
        path = WORKLOAD_KINDS.get(doc.get("kind"))
        if path is None:
            continue
        spec = _dig(doc, path)
        assert isinstance(spec, dict), f"{ref(doc)} has no pod spec"
        out.append((ref(doc), spec))
    return out


def pod_template_labels(doc: dict) -> dict:
    """The labels of a workload's pods (the Pod's own for a Pod)."""
    path = WORKLOAD_KINDS[doc["kind"]]
    meta_path = (*path[:-1], "metadata") if len(path) > 1 else ("metadata",)
    return dict((_dig(doc, meta_path) or {}).get("labels") or {})


def all_containers(pod_spec: dict) -> list[tuple[str, dict]]:
    """``(kind, container)`` for the containers, init containers and ephemeral containers of a pod spec."""
    out = []
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod_spec.get(key) or []:
            out.append((key, c))
    return out


def app_deployment(docs: Iterable[Any]) -> dict:
    """The app's Deployment: the one with a container named ``catalog`` (else the one serving port 8080)."""
    deployments = of_kind(docs, "Deployment")
    found = [
        d
        for d in deployments
        if any(
            c.get("name") == APP_CONTAINER for c in _dig(d, ("spec", "template", "spec", "containers")) or []
        )
    ]
    if not found:
        found = [
            d
            for d in deployments
            if any(
                p.get("containerPort") == APP_PORT
                for c in _dig(d, ("spec", "template", "spec", "containers")) or []
                for p in c.get("ports") or []
            )
        ]
    assert len(found) == 1, f"expected exactly one app Deployment, found {[ref(d) for d in found]}"
    return found[0]


def app_pod_spec(docs: Iterable[Any]) -> dict:
    """The pod spec of the app's Deployment."""
    return app_deployment(docs)["spec"]["template"]["spec"]


def app_container(docs: Iterable[Any]) -> dict:
    """The app container (named ``catalog``, else the one with port 8080) of the app's Deployment."""
    containers = app_pod_spec(docs)["containers"]
    for c in containers:
        if c.get("name") == APP_CONTAINER:
            return c
    for c in containers:
        if any(p.get("containerPort") == APP_PORT for p in c.get("ports") or []):
            return c
    raise AssertionError("the app Deployment has no app container")


def secret_values(docs: Iterable[Any]) -> set[str]:
    """Every value held by a Secret in `docs` (decoded), for leak checks; values under 8 chars left out."""
    values: set[str] = set()
    for secret in of_kind(docs, "Secret"):
        for raw in (secret.get("data") or {}).values():
            try:
                values.add(base64.b64decode(raw).decode("utf-8", "replace").strip())
            except (ValueError, TypeError):
                continue
        for raw in (secret.get("stringData") or {}).values():
            values.add(str(raw).strip())
    return {v for v in values if len(v) >= 8}


def _fail(problems: list[str], what: str) -> None:
    if problems:
        raise AssertionError(f"{what}:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------- assertions


def assert_containers_hardened(docs: Iterable[Any], app_uid: int | None = APP_UID) -> None:
    """Every container (init containers too) of every workload is hardened and has resources.

    Effective security context (container over pod): runAsNonRoot true, a non-zero runAsUser if set,
    readOnlyRootFilesystem true, allowPrivilegeEscalation false, privileged not true, capabilities
    drop ALL (nothing added), seccomp RuntimeDefault (or Localhost); resources requests for cpu and
    memory and a memory limit. The app container runs as `app_uid` (user and group); with `app_uid` None no
    workload fixes a UID, GID or fsGroup (OpenShift's SCC assigns them).
    Pods: no hostNetwork/hostPID/hostIPC, no hostPath volumes.
    """
    problems: list[str] = []
    docs = flatten(docs)
    specs = workload_pod_specs(docs)
    assert specs, "no workload found"
    app = app_container(docs) if of_kind(docs, "Deployment") else None
    for name, spec in specs:
        pod_sc = spec.get("securityContext") or {}
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(host):
                problems.append(f"{name}: {host} is true")
        for vol in spec.get("volumes") or []:
            if "hostPath" in vol:
                problems.append(f"{name}: volume {vol.get('name')} is a hostPath")
        for kind, c in all_containers(spec):
            where = f"{name} {kind}/{c.get('name')}"
            sc = c.get("securityContext") or {}

            def eff(key: str, sc: dict = sc, pod_sc: dict = pod_sc) -> Any:
                return sc[key] if key in sc else pod_sc.get(key)

            if eff("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            uid = eff("runAsUser")
            if uid is not None and uid == 0:
                problems.append(f"{where}: runAsUser is 0")
            if app_uid is None:
                fixed = [k for k in ("runAsUser", "runAsGroup") if k in sc or k in pod_sc]
                fixed += ["fsGroup"] if "fsGroup" in pod_sc else []
                if fixed:
                    problems.append(f"{where}: fixes {fixed}, which the platform must assign")
            elif app is not None and c is app:
                if uid != app_uid:
                    problems.append(f"{where}: runAsUser is {uid}, want {app_uid}")
                gid = eff("runAsGroup")
                if gid is not None and gid != app_uid:
                    problems.append(f"{where}: runAsGroup is {gid}, want {app_uid}")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if caps.get("add"):
                problems.append(f"{where}: capabilities add {caps['add']}")
            seccomp = (eff("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: seccompProfile is {seccomp!r}, want RuntimeDefault")
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            for key in ("cpu", "memory"):
                if not requests.get(key):
                    problems.append(f"{where}: no resources.requests.{key}")
            if not limits.get("memory"):
                problems.append(f"{where}: no resources.limits.memory")
    _fail(problems, "containers not hardened")


def assert_app_probes(docs: Iterable[Any]) -> None:
    """The app container has liveness (/livez), readiness (/readyz) and startup probes over HTTP on 8080."""
    c = app_container(docs)
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    problems = []
    if ports.get("http") != APP_PORT:
        problems.append(f"container port named http is {ports.get('http')}, want {APP_PORT}")
    want = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": None}
    for probe, path in want.items():
        p = c.get(probe)
        if not p:
            problems.append(f"no {probe}")
            continue
        get = p.get("httpGet")
        if not get:
            problems.append(f"{probe} is not an httpGet")
            continue
        if path and get.get("path") != path:
            problems.append(f"{probe} path is {get.get('path')}, want {path}")
        if probe == "startupProbe" and get.get("path") not in ("/livez", "/healthz", "/readyz"):
            problems.append(f"startupProbe path is {get.get('path')}")
        if get.get("port") not in ("http", APP_PORT):
            problems.append(f"{probe} port is {get.get('port')}")
    _fail(problems, "app probes")


def _secret_volume_names(spec: dict) -> dict[str, list[str]]:
    """volume name -> names of the Secrets it projects."""
    out: dict[str, list[str]] = {}
    for vol in spec.get("volumes") or []:
        if "secret" in vol:
            out[vol["name"]] = [vol["secret"].get("secretName")]
        elif "projected" in vol:
            names = [
                (s.get("secret") or {}).get("name")
                for s in vol["projected"].get("sources") or []
                if "secret" in s
            ]
            if names:
                out[vol["name"]] = names
    return out


def api_keys_secret_name(docs: Iterable[Any]) -> str:
    """The name of the Secret mounted at the API keys path in the app container."""
    spec = app_pod_spec(docs)
    c = app_container(docs)
    secret_vols = _secret_volume_names(spec)
    for m in c.get("volumeMounts") or []:
        if m.get("mountPath", "").rstrip("/") == API_KEYS_DIR and m.get("name") in secret_vols:
            return secret_vols[m["name"]][0]
    raise AssertionError(f"no Secret volume mounted at {API_KEYS_DIR}")


def assert_api_keys_secret_mounted(docs: Iterable[Any]) -> None:
    """The API keys Secret is a volume at the contract path in the app container, read-only, never subPath."""
    spec = app_pod_spec(docs)
    c = app_container(docs)
    secret_vols = _secret_volume_names(spec)
    problems = []
    mounts = [m for m in c.get("volumeMounts") or [] if m.get("mountPath", "").rstrip("/") == API_KEYS_DIR]
    if len(mounts) != 1:
        problems.append(f"{len(mounts)} mounts at {API_KEYS_DIR}, want 1")
    for m in mounts:
        if m.get("name") not in secret_vols:
            problems.append(f"volume {m.get('name')} at {API_KEYS_DIR} is not from a Secret")
        if m.get("readOnly") is not True:
            problems.append(f"mount at {API_KEYS_DIR} is not readOnly")
    # subPath anywhere under the secrets tree stops live rotation
    for name, pod in workload_pod_specs(docs):
        vols = _secret_volume_names(pod)
        for kind, cont in all_containers(pod):
            for m in cont.get("volumeMounts") or []:
                if m.get("name") in vols and (m.get("subPath") or m.get("subPathExpr")):
                    problems.append(
                        f"{name} {kind}/{cont.get('name')}: Secret volume {m['name']} uses subPath"
                    )
    for env in c.get("env") or []:
        if env.get("name") == "CATALOG_API_KEYS_DIR" and env.get("value", "").rstrip("/") != API_KEYS_DIR:
            problems.append(f"CATALOG_API_KEYS_DIR is {env.get('value')}, want {API_KEYS_DIR}")
    _fail(problems, "API keys Secret mount")


def assert_no_secret_in_env(docs: Iterable[Any]) -> None:
    """No container takes a secret through the environment.

    Refused: ``secretKeyRef`` / ``envFrom.secretRef``; a literal value of any Secret in `docs`; a URL
    with a password in it; a literal value for a variable whose name says password/secret/token/key
    (``*_FILE``, ``*_DIR``, ``*_HEADER`` names are fine: they point at files or name headers).
    """
    docs = flatten(docs)
    leaked = secret_values(docs)
    problems = []
    for name, spec in workload_pod_specs(docs):
        for kind, c in all_containers(spec):
            where = f"{name} {kind}/{c.get('name')}"
            for src in c.get("envFrom") or []:
                if "secretRef" in src:
                    problems.append(f"{where}: envFrom secretRef {src['secretRef'].get('name')}")
            for env in c.get("env") or []:
                var = env.get("name", "")
                if "secretKeyRef" in (env.get("valueFrom") or {}):
                    problems.append(f"{where}: {var} from secretKeyRef")
                value = str(env.get("value") or "")
                if not value:
                    continue
                if any(v in value for v in leaked):
                    problems.append(f"{where}: {var} holds a Secret's value")
                if _URL_WITH_PASSWORD.search(value):
                    problems.append(f"{where}: {var} is a URL with a password")
                if _SECRETISH_ENV_NAME.search(var) and not var.upper().endswith(_ENV_NAME_ALLOWED_SUFFIXES):
                    problems.append(f"{where}: {var} has a literal value")
            for arg in (c.get("command") or []) + (c.get("args") or []):
                if any(v in str(arg) for v in leaked):
                    problems.append(f"{where}: a command argument holds a Secret's value")
    _fail(problems, "secrets in the environment")


def _selector_problems(where: str, selector: Any) -> list[str]:
    if not isinstance(selector, dict):
        return [f"{where}: no selector"]
    if "matchLabels" in selector or "matchExpressions" in selector:
        if selector.get("matchExpressions"):
            return [f"{where}: selector uses matchExpressions"]
        selector = selector.get("matchLabels") or {}
    keys = set(selector)
    if keys != SELECTOR_KEYS:
        return [f"{where}: selector keys {sorted(keys)}, want {sorted(SELECTOR_KEYS)}"]
    return []


def assert_selectors_name_instance(docs: Iterable[Any]) -> None:
    """Selectors of Deployments, StatefulSets, Services, PDBs and NetworkPolicies (their podSelector and
    same-namespace peer podSelectors, when not empty) and topology spread constraints are exactly name +
    instance, and each workload's pods carry its selector's labels."""
    docs = flatten(docs)
    problems = []
    for d in docs:
        kind, where = d.get("kind"), ref(d)
        spec = d.get("spec") or {}
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            problems += _selector_problems(where, spec.get("selector"))
            labels = pod_template_labels(d)
            for k, v in ((spec.get("selector") or {}).get("matchLabels") or {}).items():
                if labels.get(k) != v:
                    problems.append(f"{where}: pod label {k}={labels.get(k)!r} does not match selector {v!r}")
            for tsc in (spec.get("template") or {}).get("spec", {}).get("topologySpreadConstraints") or []:
                problems += _selector_problems(f"{where} topologySpreadConstraint", tsc.get("labelSelector"))
        elif (kind == "Service" and spec.get("type") != "ExternalName") or kind == "PodDisruptionBudget":
            problems += _selector_problems(where, spec.get("selector"))
        elif kind == "NetworkPolicy":
            pod_sel = spec.get("podSelector")
            if pod_sel:
                problems += _selector_problems(f"{where} podSelector", pod_sel)
            for direction in ("ingress", "egress"):
                for rule in spec.get(direction) or []:
                    for peer in rule.get("from") or rule.get("to") or []:
                        # a peer with a namespaceSelector picks another app's pods (e.g. Prometheus): its
                        # labels are that app's, not ours
                        if peer.get("podSelector") and "namespaceSelector" not in peer:
                            problems += _selector_problems(f"{where} {direction} peer", peer["podSelector"])
    _fail(problems, "selectors")


def assert_service_account_token_not_mounted(docs: Iterable[Any]) -> None:
    """ServiceAccounts and workload pods do not automount the API token."""
    docs = flatten(docs)
    problems = [
        f"{ref(sa)}: automountServiceAccountToken is not false"
        for sa in of_kind(docs, "ServiceAccount")
        if sa.get("automountServiceAccountToken") is not False
    ]
    problems += [
        f"{name}: automountServiceAccountToken is not false"
        for name, spec in workload_pod_specs(docs)
        if spec.get("automountServiceAccountToken") is not False
    ]
    _fail(problems, "service account token")


def assert_app_writable_dirs(docs: Iterable[Any]) -> None:
    """The app container has emptyDir volumes at /tmp and the metrics dir, and PROMETHEUS_MULTIPROC_DIR."""
    spec = app_pod_spec(docs)
    c = app_container(docs)
    empty_dirs = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
    mounts = {m.get("mountPath", "").rstrip("/"): m.get("name") for m in c.get("volumeMounts") or []}
    env = {e.get("name"): e.get("value") for e in c.get("env") or []}
    problems = []
    metrics_dir = (env.get("PROMETHEUS_MULTIPROC_DIR") or METRICS_DIR).rstrip("/")
    for path in ("/tmp", metrics_dir):
        if mounts.get(path) not in empty_dirs:
            problems.append(f"{path} is not an emptyDir mount")
    _fail(problems, "writable dirs")


def prestop_sleep_seconds(container: dict) -> int:
    """Seconds of the container's preStop sleep (exec ``sleep N`` or ``sleep.seconds``), 0 if none."""
    pre = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return int(pre["sleep"].get("seconds") or 0)
    cmd = (pre.get("exec") or {}).get("command") or []
    text = " ".join(str(x) for x in cmd)
    m = re.search(r"\bsleep\s+(\d+)", text)
    return int(m.group(1)) if m else 0


def assert_graceful_shutdown(docs: Iterable[Any], graceful_timeout: int = GUNICORN_GRACEFUL_TIMEOUT) -> None:
    """The app has a preStop sleep and terminationGracePeriodSeconds > sleep + gunicorn graceful timeout."""
    spec = app_pod_spec(docs)
    sleep = prestop_sleep_seconds(app_container(docs))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    problems = []
    if sleep <= 0:
        problems.append("no preStop sleep")
    if grace <= sleep + graceful_timeout:
        problems.append(
            f"terminationGracePeriodSeconds {grace} <= preStop {sleep} + graceful {graceful_timeout}"
        )
    _fail(problems, "graceful shutdown")


def assert_app_service(docs: Iterable[Any]) -> None:
    """A Service selects the app pods and maps port 80 named http to the container port http/8080."""
    docs = flatten(docs)
    labels = pod_template_labels(app_deployment(docs))
    problems = []
    found = False
    for svc in of_kind(docs, "Service"):
        sel = (svc.get("spec") or {}).get("selector") or {}
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            continue
        for port in svc["spec"].get("ports") or []:
            if port.get("port") == 80:
                found = True
                if port.get("name") != "http":
                    problems.append(f"{ref(svc)}: port 80 is named {port.get('name')!r}, want http")
                if port.get("targetPort") not in ("http", APP_PORT):
                    problems.append(f"{ref(svc)}: port 80 targets {port.get('targetPort')!r}")
    if not found:
        problems.append("no Service with port 80 selects the app pods")
    _fail(problems, "app Service")


def assert_all_hardening(docs: Iterable[Any]) -> None:
    """Every assertion above, for a rendering that contains the app."""
    docs = flatten(docs)
    assert_containers_hardened(docs)
    assert_app_probes(docs)
    assert_api_keys_secret_mounted(docs)
    assert_no_secret_in_env(docs)
    assert_selectors_name_instance(docs)
    assert_service_account_token_not_mounted(docs)
    assert_app_writable_dirs(docs)
    assert_graceful_shutdown(docs)
    assert_app_service(docs)
