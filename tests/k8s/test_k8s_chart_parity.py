"""The app Deployment of k8s/overlays/dev and of the chart's defaults agree on what the contract fixes:
port, probes, the Secret mount path, the security context and the environment variable names."""

from __future__ import annotations

from typing import Any

import pytest
from tests import k8s_hardening as hard
from tests.k8s.k8s_render import chart_default_docs, overlay_docs

# Security context keys compared, effective value (container over pod).
SECURITY_KEYS = (
    "runAsNonRoot",
    "runAsUser",
    "runAsGroup",
    "readOnlyRootFilesystem",
    "allowPrivilegeEscalation",
    "privileged",
    "capabilities",
    "seccompProfile",
)
SECRET_PATHS = (
    hard.API_KEYS_DIR,
    "/var/run/secrets/catalog/redis",
    "/var/run/secrets/catalog/database",
)


@pytest.fixture(scope="module")
def both() -> dict[str, list[dict[str, Any]]]:
    return {"kustomize": overlay_docs("dev"), "chart": chart_default_docs("catalog")}


def _per_source(both: dict[str, list[dict[str, Any]]], fn: Any) -> dict[str, Any]:
    return {source: fn(docs) for source, docs in both.items()}


def _agree(values: dict[str, Any], what: str) -> None:
    assert values["kustomize"] == values["chart"], (
        f"{what} differ:\n  kustomize: {values['kustomize']}\n  chart:     {values['chart']}"
    )


def _ports(docs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        (p.get("name"), p.get("containerPort"), p.get("protocol", "TCP"))
        for p in hard.app_container(docs).get("ports") or []
    )


def _normalize_probe(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    if not probe:
        return None
    out = dict(probe)
    if "httpGet" in out:
        get = dict(out["httpGet"])
        get["port"] = hard.APP_PORT if get.get("port") == "http" else get.get("port")
        get.setdefault("scheme", "HTTP")
        out["httpGet"] = get
    # Kubernetes' defaults, so that spelling one out does not count as a difference
    for key, default in (("initialDelaySeconds", 0), ("successThreshold", 1), ("timeoutSeconds", 1)):
        out.setdefault(key, default)
    return out


def _probes(docs: list[dict[str, Any]]) -> dict[str, Any]:
    c = hard.app_container(docs)
    return {p: _normalize_probe(c.get(p)) for p in ("startupProbe", "livenessProbe", "readinessProbe")}


def _secret_mounts(docs: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """mount path -> (readOnly, subPath, from a Secret, the Secret's files) for the contract's secret dirs."""
    spec = hard.app_pod_spec(docs)
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    out = {}
    for m in hard.app_container(docs).get("volumeMounts") or []:
        path = m["mountPath"].rstrip("/")
        if path in SECRET_PATHS:
            secret = volumes[m["name"]].get("secret") or {}
            items = tuple(sorted(i["path"] for i in secret.get("items") or []))
            out[path] = (m.get("readOnly"), m.get("subPath"), "secret" in volumes[m["name"]], items)
    return out


def _security(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = hard.app_pod_spec(docs)
    pod_sc, sc = spec.get("securityContext") or {}, hard.app_container(docs).get("securityContext") or {}
    eff = {k: sc.get(k, pod_sc.get(k)) for k in SECURITY_KEYS}
    eff["privileged"] = bool(eff["privileged"])
    eff["fsGroup"] = pod_sc.get("fsGroup")
    eff["automountServiceAccountToken"] = spec.get("automountServiceAccountToken")
    return eff


def _env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """The container's environment: its env entries plus the keys of the ConfigMaps it takes with envFrom."""
    env: dict[str, Any] = {}
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in hard.of_kind(docs, "ConfigMap")}
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            name = src["configMapRef"]["name"]
            assert name in configmaps, f"envFrom ConfigMap {name} is not rendered"
            env.update({src.get("prefix", "") + k: v for k, v in configmaps[name].items()})
    for e in container.get("env") or []:
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


def test_ports(both: dict[str, list[dict[str, Any]]]) -> None:
    ports = _per_source(both, _ports)
    _agree(ports, "container ports")
    assert ("http", hard.APP_PORT, "TCP") in ports["chart"]


def test_probes(both: dict[str, list[dict[str, Any]]]) -> None:
    _agree(_per_source(both, _probes), "probes")


def test_secret_mounts(both: dict[str, list[dict[str, Any]]]) -> None:
    mounts = _per_source(both, _secret_mounts)
    _agree(mounts, "Secret mounts")
    assert set(mounts["chart"]) == set(SECRET_PATHS)


def test_security_context(both: dict[str, list[dict[str, Any]]]) -> None:
    _agree(_per_source(both, _security), "security contexts")


def test_graceful_shutdown(both: dict[str, list[dict[str, Any]]]) -> None:
    for docs in both.values():
        hard.assert_graceful_shutdown(docs)


def test_env_names(both: dict[str, list[dict[str, Any]]]) -> None:
    """Same variable names; the contract-fixed paths (secret files, metrics/keys dirs) have equal values."""
    envs = _per_source(both, lambda docs: _env(docs, hard.app_container(docs)))
    _agree({k: sorted(v) for k, v in envs.items()}, "environment variable names")
    fixed = [name for name in envs["chart"] if name.endswith(("_FILE", "_DIR"))]
    assert fixed
    _agree({k: {n: v.get(n) for n in fixed} for k, v in envs.items()}, "file and directory variables")


def test_init_container_env_names(both: dict[str, list[dict[str, Any]]]) -> None:
    """The migration init container gets the database settings the app gets, in both."""

    def init_env(docs: list[dict[str, Any]]) -> list[str]:
        spec = hard.app_pod_spec(docs)
        inits = [
            c
            for c in spec.get("initContainers") or []
            if "db upgrade" in " ".join((c.get("command") or []) + (c.get("args") or []))
        ]
        assert inits, "no init container runs `catalog db upgrade`"
        names = _env(docs, inits[0])
        return sorted(n for n in names if n.startswith("CATALOG_DATABASE"))

    _agree(_per_source(both, init_env), "init container database variables")
