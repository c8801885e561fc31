"""k8s/: every overlay renders, validates for Kubernetes 1.29 and 1.33, and is hardened like the chart."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests import k8s_hardening as hard
from tests.k8s.k8s_render import (
    COMPONENTS,
    K8S,
    OVERLAYS,
    chart_default_docs,
    container,
    find,
    kustomize_docs,
    kustomize_text,
    overlay_docs,
    pod_spec,
)
from tests.tools import require_tool

KUBERNETES_VERSIONS = ("1.29", "1.33")
# Custom resources kubernetes-validate has no schema for (checked by test_service_monitor below).
CRD_KINDS = {"ServiceMonitor"}
# Secrets the prod overlay expects to be managed outside the repo.
EXTERNAL_SECRETS = {"catalog-api-keys", "catalog-redis", "catalog-postgresql"}
REDIS_PASSWORD_FILE = "/var/run/secrets/catalog/redis/password"
DATABASE_PASSWORD_FILE = "/var/run/secrets/catalog/database/password"


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def _secret_refs(docs: list[dict[str, Any]]) -> set[str]:
    """Names of the Secrets the workloads mount."""
    names = set()
    for _, spec in hard.workload_pod_specs(docs):
        names |= {v["secret"]["secretName"] for v in spec.get("volumes") or [] if "secret" in v}
    return names


# ------------------------------------------------------------------------------------------- layout


def test_layout() -> None:
    assert OVERLAYS == ["dev", "prod"]
    assert COMPONENTS == ["network-policy", "postgresql", "redis", "service-monitor"]


@pytest.mark.parametrize("path", _kustomizations(), ids=lambda p: str(p.parent.relative_to(K8S)))
def test_kustomization_style(path: Path) -> None:
    """`labels:` instead of the deprecated `commonLabels`; components are Components; no bare `vars`."""
    k = yaml.safe_load(path.read_text())
    assert "commonLabels" not in k, "use labels: instead of commonLabels"
    assert "vars" not in k, "vars is deprecated (use replacements)"
    assert "patchesStrategicMerge" not in k, "use patches:"
    assert "patchesJson6902" not in k, "use patches:"
    if path.parent.parent == K8S / "components":
        assert k["kind"] == "Component"
    elif path.parent.parent == K8S / "overlays" or path.parent == K8S / "base":
        assert k["kind"] == "Kustomization"
    assert k["apiVersion"] in ("kustomize.config.k8s.io/v1beta1", "kustomize.config.k8s.io/v1alpha1")
    for component in k.get("components") or []:
        assert (path.parent / component / "kustomization.yaml").is_file(), f"{component} is not a component"
    for res in k.get("resources") or []:
        assert (path.parent / res).exists(), f"{res} does not exist"


def test_base_one_resource_per_file_named_by_kind() -> None:
    k = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    kinds = set()
    for res in k["resources"]:
        docs = [d for d in yaml.safe_load_all((K8S / "base" / res).read_text()) if d]
        assert len(docs) == 1, f"{res} holds {len(docs)} resources"
        assert res == f"{docs[0]['kind'].lower()}.yaml", f"{res} holds a {docs[0]['kind']}"
        kinds.add(docs[0]["kind"])
    assert kinds == {"Deployment", "Service", "ServiceAccount"}
    assert [g["name"] for g in k["configMapGenerator"]] == ["catalog"]


# ------------------------------------------------------------------------------------------ render


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay: str) -> None:
    docs = overlay_docs(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount", "ConfigMap", "StatefulSet"} <= kinds
    namespace = {"dev": "catalog-dev", "prod": "catalog"}[overlay]
    for d in docs:
        meta = d["metadata"]
        if d["kind"] != "Namespace":
            assert meta["name"].startswith("catalog"), f"{hard.ref(d)}: names start with the release name"
            assert meta.get("namespace") == namespace, hard.ref(d)
        labels = meta.get("labels") or {}
        if d["kind"] != "Namespace":
            assert labels.get("app.kubernetes.io/instance") == "catalog", hard.ref(d)
            assert labels.get("app.kubernetes.io/name", "").startswith("catalog"), hard.ref(d)
        assert labels.get("app.kubernetes.io/part-of") == "catalog", hard.ref(d)
        assert labels.get("app.kubernetes.io/environment") == overlay, hard.ref(d)


def test_base_renders_and_is_hardened() -> None:
    """The base alone (SQLite in /tmp, in-process cache) is a complete, hardened app."""
    docs = kustomize_docs("k8s/base")
    hard.assert_all_hardening(docs)
    env = {e["name"] for e in hard.app_container(docs)["env"]}
    assert "CATALOG_DATABASE_PASSWORD_FILE" not in env
    assert "CATALOG_REDIS_PASSWORD_FILE" not in env


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict(overlay: str, version: str, tmp_path: Path) -> None:
    tool = require_tool("kubernetes-validate")
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(kustomize_text(f"k8s/overlays/{overlay}"))
    proc = subprocess.run(
        [tool, "--strict", "--quiet", "-k", version, str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # An unknown apiVersion/kind is only a warning: allow it for the known custom resources only.
    for line in out.splitlines():
        if line.startswith("WARN"):
            assert any(f"kind {kind} " in line for kind in CRD_KINDS), line
        assert not line.startswith("ERROR"), line


# --------------------------------------------------------------------------------------- hardening


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hardening(overlay: str) -> None:
    """The same assertions as the chart's (tests/k8s_hardening.py)."""
    hard.assert_all_hardening(overlay_docs(overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_pinned(overlay: str) -> None:
    for name, spec in hard.workload_pod_specs(overlay_docs(overlay)):
        for _, c in hard.all_containers(spec):
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag not in ("", "latest"), f"{name}/{c['name']}: image {image} is not pinned by tag"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_app_wiring(overlay: str) -> None:
    """Init container migrates, passwords come in as files from Secrets, URLs point at the components."""
    docs = overlay_docs(overlay)
    spec = hard.app_pod_spec(docs)
    app = hard.app_container(docs)
    init = container(spec, "migrate", "initContainers")
    assert init["command"] == ["catalog", "db", "upgrade"]
    assert init["image"] == app["image"]

    cm_name = app["envFrom"][0]["configMapRef"]["name"]
    config = find(docs, "ConfigMap", cm_name)["data"]
    assert config["CATALOG_DATABASE_URL"] == "postgresql://catalog_app@catalog-postgresql:5432/catalog"
    assert config["CATALOG_REDIS_URL"] == "redis://catalog-redis:6379/0"
    assert [e["configMapRef"]["name"] for e in init["envFrom"]] == [cm_name]

    assert {e["name"]: e.get("value") for e in app["env"]}["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
    # the migration connects as the owner role, with the owner's password
    assert {e["name"]: e.get("value") for e in init["env"]}["CATALOG_DATABASE_URL"] == (
        "postgresql://catalog@catalog-postgresql:5432/catalog"
    )
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c, wanted, key in (
        (app, (REDIS_PASSWORD_FILE, DATABASE_PASSWORD_FILE), "password"),
        (init, (DATABASE_PASSWORD_FILE,), "owner-password"),
    ):
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for path in wanted:
            var = "CATALOG_REDIS_PASSWORD_FILE" if "/redis/" in path else "CATALOG_DATABASE_PASSWORD_FILE"
            assert env[var] == path
            mount = mounts[str(Path(path).parent)]
            assert mount["readOnly"] is True
            assert "subPath" not in mount
            secret = volumes[mount["name"]]["secret"]
            wanted_key = "password" if "/redis/" in path else key
            assert {"key": wanted_key, "path": "password"} in secret["items"]


def test_dev_overlay() -> None:
    docs = overlay_docs("dev")
    assert (
        find(docs, "Namespace", "catalog-dev")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        == "restricted"
    )
    assert hard.app_deployment(docs)["spec"]["replicas"] == 1
    svc = find(docs, "Service", "catalog")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    # Self-contained: every Secret and ConfigMap a pod uses is generated here.
    present = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert _secret_refs(docs) <= present
    # The API keys Secret keeps its name (no hash), so a key rotates without a rollout.
    keys = find(docs, "Secret", hard.api_keys_secret_name(docs))
    assert keys["metadata"]["name"] == "catalog-api-keys"
    assert all(len(v) >= 16 for v in keys["data"].values())


def test_prod_overlay() -> None:
    docs = overlay_docs("prod")
    deployment = hard.app_deployment(docs)
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count: an apply must not reset it"
    # No Secret in the repo: the three Secrets are created in the namespace beforehand.
    assert not hard.of_kind(docs, "Secret")
    assert _secret_refs(docs) == EXTERNAL_SECRETS
    hpa = find(docs, "HorizontalPodAutoscaler", "catalog")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "catalog"}
    assert hpa["spec"]["minReplicas"] >= 3
    pdb = find(docs, "PodDisruptionBudget", "catalog")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert {d["metadata"]["name"] for d in hard.of_kind(docs, "NetworkPolicy")} == {
        "catalog",
        "catalog-redis",
        "catalog-postgresql",
    }
    assert hard.of_kind(docs, "ServiceMonitor")
    image = hard.app_container(docs)["image"]
    assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:\d+\.\d+\.\d+", image), image
    # prod sizes the app above the base
    base = hard.app_container(kustomize_docs("k8s/base"))["resources"]
    assert hard.app_container(docs)["resources"] != base


# -------------------------------------------------------------------------------------- components


def _args(c: dict[str, Any]) -> str:
    return " ".join(c.get("command") or []) + " " + " ".join(c.get("args") or [])


def _redis_conf(text: str) -> dict[str, str]:
    lines = (line.strip() for line in text.splitlines())
    return dict(line.split(None, 1) for line in lines if line and not line.startswith("#") and " " in line)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis(overlay: str) -> None:
    docs = overlay_docs(overlay)
    spec = pod_spec(find(docs, "Deployment", "catalog-redis"))
    redis = container(spec, "redis")
    assert re.fullmatch(r"docker\.io/library/redis:\d+\.\d+\.\d+(-\w+)?", redis["image"])
    script = _args(redis)
    assert "exec redis-server /etc/redis/redis.conf - <<EOF" in script
    assert 'requirepass "$password"' in script and "/var/run/secrets/redis/password" in script
    assert "REDISCLI_AUTH" in str(redis["readinessProbe"])  # the probe authenticates without argv
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in redis["volumeMounts"]}
    config = find(docs, "ConfigMap", volumes[mounts["/etc/redis"]]["configMap"]["name"])
    conf = _redis_conf(config["data"]["redis.conf"])
    # a cache: bounded, LRU, no persistence
    assert conf["maxmemory-policy"] == "allkeys-lru"
    assert conf["save"] == '""'
    assert conf["appendonly"] == "no"
    assert "requirepass" not in conf
    maxmemory = int(conf["maxmemory"].removesuffix("mb"))
    limit = redis["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert maxmemory * 1.5 <= int(limit.removesuffix("Mi")), "leave the container room above maxmemory"
    svc = find(docs, "Service", "catalog-redis")
    assert svc["spec"]["ports"][0]["port"] == 6379


def test_prod_redis_conf_differs_only_in_memory() -> None:
    base = _redis_conf((K8S / "components" / "redis" / "redis.conf").read_text())
    prod = _redis_conf((K8S / "overlays" / "prod" / "redis-memory" / "redis.conf").read_text())
    assert {k: v for k, v in base.items() if k != "maxmemory"} == {
        k: v for k, v in prod.items() if k != "maxmemory"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgresql(overlay: str) -> None:
    docs = overlay_docs(overlay)
    sts = find(docs, "StatefulSet", "catalog-postgresql")
    pg = container(pod_spec(sts), "postgresql")
    assert re.fullmatch(r"docker\.io/library/postgres:\d+\.\d+(-\w+)?", pg["image"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert pg[probe]["exec"]["command"][0] == "pg_isready", probe
    env = {e["name"]: e.get("value") for e in pg["env"]}
    assert env["POSTGRES_PASSWORD_FILE"] == "/var/run/secrets/postgresql/owner-password"
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("postgres", "catalog")
    assert "hba_file=/etc/postgresql/pg_hba.conf" in pg["args"]
    claims = sts["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    assert {m["name"]: m["mountPath"] for m in pg["volumeMounts"]}["data"] == "/var/lib/postgresql/data"
    assert env["PGDATA"].startswith("/var/lib/postgresql/data/")
    assert find(docs, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_network_policies() -> None:
    """Redis and PostgreSQL take connections only from catalog pods; the app takes HTTP."""
    docs = overlay_docs("prod")
    app_labels = hard.pod_template_labels(hard.app_deployment(docs))
    for name, port in (("catalog-redis", 6379), ("catalog-postgresql", 5432)):
        policy = find(docs, "NetworkPolicy", name)["spec"]
        workload = next(
            d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name
        )
        target = hard.pod_template_labels(workload)
        # The kubelet's network probes would need a rule of their own: exec probes only.
        for _, c in hard.all_containers(pod_spec(workload)):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert set(c[probe]) & {"exec", "httpGet", "tcpSocket", "grpc"} == {"exec"}, (name, probe)
        assert all(target.get(k) == v for k, v in policy["podSelector"]["matchLabels"].items())
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
        assert not policy.get("egress")
        [rule] = policy["ingress"]
        [peer] = rule["from"]
        assert set(peer) == {"podSelector"}
        assert all(app_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
    app_policy = find(docs, "NetworkPolicy", "catalog")["spec"]
    assert app_policy["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]


# ServiceMonitor fields (monitoring.coreos.com/v1 CRD) this project uses.
_SERVICE_MONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
_SERVICE_MONITOR_ENDPOINT = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
}


def test_service_monitor() -> None:
    docs = overlay_docs("prod")
    monitor = find(docs, "ServiceMonitor", "catalog")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= _SERVICE_MONITOR_SPEC
    selected = [
        s
        for s in hard.of_kind(docs, "Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in spec["selector"]["matchLabels"].items())
    ]
    assert [s["metadata"]["name"] for s in selected] == ["catalog"]
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= _SERVICE_MONITOR_ENDPOINT
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[sm]", endpoint["interval"])


# ------------------------------------------------------------------------------- the chart's twin


def test_every_object_carries_the_app_kubernetes_io_labels() -> None:
    """Namespace included: name, instance, part-of and managed-by on everything an overlay applies."""
    for overlay in OVERLAYS:
        for doc in overlay_docs(overlay):
            labels = doc["metadata"].get("labels") or {}
            missing = {
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/part-of",
                "app.kubernetes.io/managed-by",
            } - set(labels)
            assert not missing, f"{overlay}: {hard.ref(doc)} lacks {sorted(missing)}"


def test_dev_sets_one_replica_and_prod_leaves_them_to_its_hpa() -> None:
    assert hard.app_deployment(overlay_docs("dev"))["spec"]["replicas"] == 1
    prod = overlay_docs("prod")
    assert "replicas" not in hard.app_deployment(prod)["spec"]
    assert "replicas" not in hard.app_deployment(kustomize_docs("k8s/base"))["spec"]
    assert find(prod, "HorizontalPodAutoscaler", "catalog")["spec"]["minReplicas"] == 3


def test_postgresql_roles_and_hba_are_the_charts() -> None:
    """The component's copies of the roles script and pg_hba.conf are the chart's rendered text (tested for
    real in tests/chart/test_chart_on_a_cluster.py); the StatefulSet mounts them where the image looks."""
    chart = find(chart_default_docs("catalog"), "ConfigMap", "catalog-postgresql")["data"]
    component = K8S / "components" / "postgresql"
    for name in ("10-catalog-roles.sql", "pg_hba.conf"):
        assert (component / name).read_text() == chart[name], f"k8s/components/postgresql/{name} is stale"
    for overlay in OVERLAYS:
        docs = overlay_docs(overlay)
        spec = pod_spec(find(docs, "StatefulSet", "catalog-postgresql"))
        mounts = {m["mountPath"]: m["name"] for m in container(spec, "postgresql")["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for path in ("/docker-entrypoint-initdb.d", "/etc/postgresql"):
            generated = volumes[mounts[path]]["configMap"]["name"]
            assert generated.startswith("catalog-postgresql-"), generated  # the hashed generator name
            assert find(docs, "ConfigMap", generated)
