"""The Helm chart at chart/: lint and render with helm 3 and helm 4, validate, harden, scan.

Every scenario is a `chart/ci/*-values.yaml` file. Each scenario is rendered once per helm binary (the
module-scoped `renders` fixture caches the output); checkov and trivy run once over all renderings.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from tests import k8s_hardening as hardening
from tests.fake_kubernetes import fake_kubernetes
from tests.tools import require_tool

from catalog.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"
OBSERVABILITY = ROOT / "observability"
CHART_OBSERVABILITY = CHART / "files" / "observability"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
HELMS = ("helm3", "helm4")
RELEASE = "catalog"
NAMESPACE = "catalog"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
TIMEOUT = 180

# Kinds kubernetes-validate knows; the CRD kinds are checked against tests/chart/schemas/ instead.
BUILTIN_KINDS = {
    "ConfigMap",
    "Deployment",
    "HorizontalPodAutoscaler",
    "Ingress",
    "NetworkPolicy",
    "Pod",
    "PodDisruptionBudget",
    "Secret",
    "Service",
    "ServiceAccount",
    "StatefulSet",
}
CRD_SCHEMAS = {
    "ServiceMonitor": "servicemonitor.schema.json",
    "PrometheusRule": "prometheusrule.schema.json",
    "HTTPRoute": "httproute.schema.json",
}

# Checks of the scanners that do not apply, each with its reason: (check id, pattern, reason); checkov's
# patterns match "<id> <resource> (<scenario file>)".
CHECKOV_SKIPS = [
    (
        "CKV_K8S_40",
        r"\(openshift\.yaml\)$",
        "On OpenShift the restricted-v2 SCC assigns a high UID from the namespace's range (e.g. 1000680000): "
        "the chart leaves runAsUser unset there on purpose.",
    ),
    (
        "CKV_K8S_43",
        r".*",
        "Images are pinned by tag; `image.digest`, `redis.image.digest` and `postgresql.image.digest` pin "
        "by digest. The chart cannot know the digest of the app image the user builds.",
    ),
    (
        "CKV_K8S_15",
        r".*",
        "imagePullPolicy IfNotPresent with pinned tags/digests: a restart must not depend on the registry; "
        "the policy is a value (`*.image.pullPolicy`).",
    ),
    (
        "CKV_K8S_8",
        r"Pod\..*-test-",
        "helm test pods run one check to completion; a liveness probe has nothing to watch.",
    ),
    (
        "CKV_K8S_9",
        r"Pod\..*-test-",
        "helm test pods run one check to completion and serve nothing; readiness does not apply.",
    ),
]
TRIVY_SKIPS = [
    (
        "KSV-0109",
        r"ConfigMap '[^']*-postgresql'.*CREATE ROLE",
        "False positive: the roles script reads both passwords from the mounted Secret at initdb "
        "(psql `\\set ... `sed ... /var/run/secrets/postgresql/...``); the ConfigMap holds no password.",
    ),
    (
        "KSV-0109",
        r"ConfigMap '[^']*-dashboard'",
        "False positive: the Grafana dashboard JSON has `description` fields, which the heuristic for "
        "secret-like keys matches; it holds no secret.",
    ),
    (
        "KSV-01010",
        r"ConfigMap '[^']*'.*CATALOG_API_KEY_HEADER",
        "False positive: CATALOG_API_KEY_HEADER is the *name* of the header (X-Api-Key), PORT and "
        "CATALOG_LOG_LEVEL are plain settings; the keys themselves are in a mounted Secret.",
    ),
]


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: int = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, check=False, env=env, timeout=timeout, cwd=ROOT
    )


def values_file(scenario: str) -> str:
    return str(CHART / "ci" / f"{scenario}-values.yaml")


def load_docs(text: str) -> list[dict[str, Any]]:
    return hardening.flatten(yaml.safe_load_all(text))


class Renders:
    """`helm template` output per (helm, scenario), rendered once."""

    def __init__(self) -> None:
        self._text: dict[tuple[str, str], str] = {}

    def text(self, helm: str, scenario: str) -> str:
        key = (helm, scenario)
        if key not in self._text:
            binary = require_tool(helm)
            cmd = [
                binary,
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                NAMESPACE,
                "-f",
                values_file(scenario),
            ]
            proc = run(cmd)
            assert proc.returncode == 0, f"{helm} template {scenario} failed:\n{proc.stderr}"
            self._text[key] = proc.stdout
        return self._text[key]

    def docs(self, helm: str, scenario: str) -> list[dict[str, Any]]:
        return load_docs(self.text(helm, scenario))


@pytest.fixture(scope="module")
def renders() -> Renders:
    return Renders()


@pytest.fixture(scope="module")
def rendered_dir(renders: Renders, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every scenario rendered by helm 4 (helm 3 renders the same; see test_helm3_and_helm4_agree)."""
    out = tmp_path_factory.mktemp("rendered")
    for scenario in SCENARIOS:
        (out / f"{scenario}.yaml").write_text(renders.text("helm4", scenario))
    return out


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return hardening.of_kind(docs, kind)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def test_scenarios_present() -> None:
    assert set(SCENARIOS) >= {"defaults", "redis-sidecar", "external", "ha"}, SCENARIOS


# ------------------------------------------------------------------------------------- lint / render


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("helm", HELMS)
def test_helm_lint_strict(helm: str, scenario: str) -> None:
    binary = require_tool(helm)
    proc = run(
        [binary, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", values_file(scenario)]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("helm", HELMS)
def test_template_names_and_namespaces(renders: Renders, helm: str, scenario: str) -> None:
    docs = renders.docs(helm, scenario)
    assert docs
    for doc in docs:
        meta = doc["metadata"]
        assert meta["name"].startswith(RELEASE), f"{hardening.ref(doc)} does not start with the release name"
        assert meta.get("namespace") == NAMESPACE, f"{hardening.ref(doc)} namespace {meta.get('namespace')}"
        assert doc["kind"] in BUILTIN_KINDS | set(CRD_SCHEMAS), f"unexpected kind {doc['kind']}"
    names = [hardening.ref(d) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def normalised(docs: list[dict[str, Any]]) -> list[str]:
    """Docs without the values that differ per rendering (random keys/passwords and their checksums)."""
    out = []
    for doc in docs:
        doc = copy.deepcopy(doc)
        if doc["kind"] == "Secret":
            doc["data"] = {k: "<random>" for k in doc.get("data") or {}}
        out.append(json.dumps(doc, sort_keys=True))
    return sorted(out)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm3_and_helm4_agree(renders: Renders, scenario: str) -> None:
    assert normalised(renders.docs("helm3", scenario)) == normalised(renders.docs("helm4", scenario))


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_kubernetes_validate_strict(rendered_dir: Path, tmp_path: Path, kube_version: str) -> None:
    tool = require_tool("kubernetes-validate")
    files = []
    for path in sorted(rendered_dir.glob("*.yaml")):
        builtin = [d for d in load_docs(path.read_text()) if d["kind"] in BUILTIN_KINDS]
        target = tmp_path / path.name
        target.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
        files.append(str(target))
    proc = run([tool, "--strict", "--quiet", "-k", kube_version, *files])
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, out
    assert not re.search(r"^(WARN|ERROR|FAIL)", out, re.M), out


# --------------------------------------------------------------------------------------------- CRDs


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crd_objects_match_their_crd_fields(renders: Renders, scenario: str) -> None:
    docs = renders.docs("helm4", scenario)
    for kind, schema_file in CRD_SCHEMAS.items():
        schema = json.loads((SCHEMAS / schema_file).read_text())
        for doc in by_kind(docs, kind):
            jsonschema.validate(doc, schema)


def test_crd_schemas_refuse_unknown_fields(renders: Renders) -> None:
    docs = renders.docs("helm4", "ha")
    for kind, schema_file in CRD_SCHEMAS.items():
        schema = json.loads((SCHEMAS / schema_file).read_text())
        bad = copy.deepcopy(by_kind(docs, kind)[0])
        bad["spec"]["unknownField"] = True
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_service_monitor_scrapes_the_app_service(renders: Renders) -> None:
    docs = renders.docs("helm4", "ha")
    (monitor,) = by_kind(docs, "ServiceMonitor")
    service = one(docs, "Service", RELEASE)
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())
    selected = [
        s
        for s in by_kind(docs, "Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ]
    assert selected == [service], "the ServiceMonitor must select only the app Service"
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # observability/alerts.yaml selects job=~".*catalog.*": the job label comes from the Service's name label
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert "catalog" in job
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_is_the_observability_rules(renders: Renders) -> None:
    docs = renders.docs("helm4", "ha")
    (rule,) = by_kind(docs, "PrometheusRule")
    source = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    alerts = [r for g in rule["spec"]["groups"] for r in g.get("rules", []) if "alert" in r]
    assert alerts, "no alerting rule in the PrometheusRule"


def test_http_route_and_ingress_target_the_app_service(renders: Renders) -> None:
    docs = renders.docs("helm4", "ha")
    (route,) = by_kind(docs, "HTTPRoute")
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["name"], backend["port"]) == (RELEASE, 80)
    (ingress,) = by_kind(docs, "Ingress")
    svc = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert svc == {"name": RELEASE, "port": {"name": "http"}}


# ---------------------------------------------------------------------------------- observability copies


def test_observability_copies_are_current() -> None:
    originals = [*sorted(OBSERVABILITY.glob("*.json")), OBSERVABILITY / "alerts.yaml"]
    assert (OBSERVABILITY / "alerts.yaml").is_file(), "observability/alerts.yaml is missing"
    for original in originals:
        copy_ = CHART_OBSERVABILITY / original.name
        assert copy_.is_file(), f"chart/files/observability/{original.name} is missing: copy {original}"
        assert copy_.read_bytes() == original.read_bytes(), (
            f"chart/files/observability/{original.name} differs from observability/{original.name}: "
            f"cp observability/{original.name} chart/files/observability/"
        )
    extra = {p.name for p in CHART_OBSERVABILITY.iterdir()} - {p.name for p in originals}
    assert not extra, f"chart/files/observability/ has files observability/ no longer has: {extra}"


def test_dashboard_configmap_for_the_grafana_sidecar(renders: Renders) -> None:
    docs = renders.docs("helm4", "ha")
    cm = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "catalog"
    dashboards = sorted(OBSERVABILITY.glob("*.json"))
    assert sorted(cm["data"]) == [p.name for p in dashboards]
    for path in dashboards:
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())


# -------------------------------------------------------------------------------------------- hardening


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("helm", HELMS)
def test_hardening(renders: Renders, helm: str, scenario: str) -> None:
    docs = renders.docs(helm, scenario)
    # the openshift scenario leaves UIDs to the restricted-v2 SCC
    hardening.assert_containers_hardened(docs, app_uid=None if scenario == "openshift" else hardening.APP_UID)
    hardening.assert_app_probes(docs)
    hardening.assert_api_keys_secret_mounted(docs)
    hardening.assert_no_secret_in_env(docs)
    hardening.assert_selectors_name_instance(docs)
    hardening.assert_service_account_token_not_mounted(docs)
    hardening.assert_app_writable_dirs(docs)
    hardening.assert_graceful_shutdown(docs)
    hardening.assert_app_service(docs)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_selectors_pick_only_their_own_pods(renders: Renders, scenario: str) -> None:
    docs = renders.docs("helm4", scenario)
    workloads = [d for d in docs if d["kind"] in hardening.WORKLOAD_KINDS]
    selectors = [
        (hardening.ref(d), (d["spec"].get("selector") or {}).get("matchLabels") or d["spec"].get("selector"))
        for d in docs
        if d["kind"] in ("Service", "PodDisruptionBudget", "Deployment", "StatefulSet")
    ]
    for where, selector in selectors:
        matched = [
            hardening.ref(w)
            for w in workloads
            if all(hardening.pod_template_labels(w).get(k) == v for k, v in selector.items())
        ]
        assert len(matched) == 1, f"{where} selects {matched}"


def _mutations() -> list[tuple[str, Any]]:
    def ro_fs(docs: list[dict[str, Any]]) -> None:
        hardening.app_container(docs)["securityContext"]["readOnlyRootFilesystem"] = False

    def root(docs: list[dict[str, Any]]) -> None:
        hardening.app_container(docs)["securityContext"]["runAsUser"] = 0

    def no_limits(docs: list[dict[str, Any]]) -> None:
        by_kind(docs, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]["resources"] = {}

    def caps(docs: list[dict[str, Any]]) -> None:
        by_kind(docs, "Pod")[0]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = [
            "NET_ADMIN"
        ]

    def sub_path(docs: list[dict[str, Any]]) -> None:
        for m in hardening.app_container(docs)["volumeMounts"]:
            if m["name"] == "api-keys":
                m["subPath"] = "default"

    def secret_env(docs: list[dict[str, Any]]) -> None:
        hardening.app_container(docs)["env"].append(
            {
                "name": "CATALOG_REDIS_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": "x", "key": "password"}},
            }
        )

    def url_password(docs: list[dict[str, Any]]) -> None:
        hardening.app_container(docs)["env"].append(
            {"name": "CATALOG_REDIS_URL", "value": "redis://:pw@r:6379/0"}
        )

    def selector(docs: list[dict[str, Any]]) -> None:
        one(docs, "Service", RELEASE)["spec"]["selector"]["app.kubernetes.io/component"] = "api"

    def probe(docs: list[dict[str, Any]]) -> None:
        del hardening.app_container(docs)["readinessProbe"]

    def token(docs: list[dict[str, Any]]) -> None:
        hardening.app_pod_spec(docs)["automountServiceAccountToken"] = True

    def grace(docs: list[dict[str, Any]]) -> None:
        hardening.app_pod_spec(docs)["terminationGracePeriodSeconds"] = 30

    return [
        ("readOnlyRootFilesystem", ro_fs),
        ("runAsUser", root),
        ("resources", no_limits),
        ("capabilities", caps),
        ("subPath", sub_path),
        ("secretKeyRef", secret_env),
        ("URL with a password", url_password),
        ("selector", selector),
        ("readinessProbe", probe),
        ("automountServiceAccountToken", token),
        ("terminationGracePeriodSeconds", grace),
    ]


@pytest.mark.parametrize(("what", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_hardening_assertions_catch(renders: Renders, what: str, mutate: Any) -> None:
    docs = copy.deepcopy(renders.docs("helm4", "defaults"))
    hardening.assert_all_hardening(docs)
    mutate(docs)
    with pytest.raises(AssertionError):
        hardening.assert_all_hardening(docs)


# ----------------------------------------------------------------------------------- scenario behaviour


def _app_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    env = {e["name"]: e.get("value", "") for e in hardening.app_container(docs).get("env") or []}
    env.update(one(docs, "ConfigMap", RELEASE)["data"])
    return env


def test_defaults_scenario(renders: Renders) -> None:
    docs = renders.docs("helm4", "defaults")
    env = _app_env(docs)
    assert env["CATALOG_DATABASE_URL"] == f"postgresql://catalog_app@{RELEASE}-postgresql:5432/catalog"
    assert env["CATALOG_REDIS_URL"] == f"redis://{RELEASE}-redis:6379/0"
    assert env["CATALOG_DATABASE_PASSWORD_FILE"] == "/var/run/secrets/catalog/database/password"
    assert env["CATALOG_REDIS_PASSWORD_FILE"] == "/var/run/secrets/catalog/redis/password"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
    assert not [name for name in env if name.startswith(("OTEL_", "K8S_"))], "tracing is off by default"
    deployment = hardening.app_deployment(docs)
    assert deployment["metadata"]["name"] == RELEASE
    pod = deployment["spec"]["template"]
    (migrate,) = pod["spec"]["initContainers"]
    assert migrate["args"] == ["catalog", "db", "upgrade", "--wait", "120"]
    assert "command" not in migrate, "the image entrypoint must run (it prepares the metrics dir)"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert "checksum/config" in annotations
    assert not any("api-keys" in k for k in annotations), "the API keys rotate live: no checksum for them"
    # Redis: own Deployment + Service, password from a generated Secret kept across upgrades
    redis = one(docs, "Deployment", f"{RELEASE}-redis")
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"docker\.io/library/redis:\d+\.\d+\.\d+-\w+", redis_container["image"])
    one(docs, "Service", f"{RELEASE}-redis")
    conf = one(docs, "ConfigMap", f"{RELEASE}-redis")["data"]["redis.conf"]
    assert "maxmemory-policy allkeys-lru" in conf
    assert re.search(r"^maxmemory \S+", conf, re.M)
    assert 'save ""' in conf
    assert "appendonly no" in conf
    # PostgreSQL: StatefulSet + PVC, pg_isready probes, official image pinned
    pg = one(docs, "StatefulSet", f"{RELEASE}-postgresql")
    (pg_container,) = pg["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"docker\.io/library/postgres:\d+\.\d+-\w+", pg_container["image"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "pg_isready" in " ".join(pg_container[probe]["exec"]["command"])
    assert {e["name"] for e in pg_container["env"]} >= {"POSTGRES_PASSWORD_FILE", "PGDATA"}
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    # generated once: lookup-based Secrets, kept on uninstall so a reinstall finds the same data
    for name in (f"{RELEASE}-api-keys", f"{RELEASE}-redis", f"{RELEASE}-postgresql"):
        secret = one(docs, "Secret", name)
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    keys = secret_data(one(docs, "Secret", f"{RELEASE}-api-keys"))
    assert list(keys) == ["default"]
    assert re.fullmatch(r"[A-Za-z0-9]{40}", keys["default"])
    assert len(secret_data(one(docs, "Secret", f"{RELEASE}-redis"))["password"]) >= 32
    # replicas 2 -> PDB; NetworkPolicies: app, redis, postgresql, test pods
    assert one(docs, "PodDisruptionBudget", RELEASE)["spec"]["minAvailable"] == 1
    policies = {d["metadata"]["name"]: d for d in by_kind(docs, "NetworkPolicy")}
    assert set(policies) == {RELEASE, f"{RELEASE}-redis", f"{RELEASE}-postgresql", f"{RELEASE}-test"}
    app_selector = deployment["spec"]["selector"]["matchLabels"]
    for name in (f"{RELEASE}-redis", f"{RELEASE}-postgresql"):
        (rule,) = policies[name]["spec"]["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": app_selector}}]
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    assert not by_kind(docs, "Ingress")
    assert not by_kind(docs, "HTTPRoute")
    sa = one(docs, "ServiceAccount", RELEASE)
    assert sa["automountServiceAccountToken"] is False


def test_redis_sidecar_scenario(renders: Renders) -> None:
    docs = renders.docs("helm4", "redis-sidecar")
    assert _app_env(docs)["CATALOG_REDIS_URL"] == "redis://127.0.0.1:6379/0"
    assert not [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-redis")]
    assert not [d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-redis")]
    spec = hardening.app_pod_spec(docs)
    redis = [c for c in spec["initContainers"] if c["name"] == "redis"]
    assert len(redis) == 1
    assert redis[0]["restartPolicy"] == "Always", "redis runs as a native sidecar"
    assert "bind 127.0.0.1" in redis[0]["command"][-1]
    assert not by_kind(docs, "PodDisruptionBudget"), "no PDB with one replica"
    keys = secret_data(one(docs, "Secret", f"{RELEASE}-api-keys"))
    assert keys["ci"] == "0123456789abcdef0123456789abcdef"
    assert keys["dashboard"].startswith("sha256:")
    assert json.loads(keys["reporting"]) == {
        "key": "reporting-key-0123456789",
        "scopes": ["read"],
        "rate_limit": "50/second",
    }
    assert "annotations" not in one(docs, "Secret", f"{RELEASE}-api-keys")["metadata"], (
        "keys from values: no keep"
    )
    pg = one(docs, "StatefulSet", f"{RELEASE}-postgresql")
    assert "volumeClaimTemplates" not in pg["spec"]


def test_external_scenario(renders: Renders) -> None:
    docs = renders.docs("helm4", "external")
    env = _app_env(docs)
    assert env["CATALOG_REDIS_URL"] == "rediss://redis.cache.svc.cluster.local:6380/0"
    assert env["CATALOG_DATABASE_URL"] == (
        "postgresql://catalog_app@postgres.db.svc.cluster.local:5432/catalog?sslmode=require"
    )
    assert not by_kind(docs, "Secret"), "every credential is in a Secret the user manages"
    assert not by_kind(docs, "StatefulSet")
    assert [d["metadata"]["name"] for d in by_kind(docs, "Deployment")] == [RELEASE]
    volumes = {v["name"]: v for v in hardening.app_pod_spec(docs)["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "catalog-api-keys"
    assert volumes["redis-password"]["secret"] == {
        "secretName": "catalog-redis",
        "defaultMode": 0o440,
        "items": [{"key": "redis-password", "path": "password"}],
    }
    assert volumes["database-password"]["secret"]["items"] == [
        {"key": "postgres-password", "path": "password"}
    ]
    policies = {d["metadata"]["name"] for d in by_kind(docs, "NetworkPolicy")}
    assert policies == {RELEASE, f"{RELEASE}-test"}


def test_ha_scenario(renders: Renders) -> None:
    docs = renders.docs("helm4", "ha")
    hpa = one(docs, "HorizontalPodAutoscaler", RELEASE)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert "replicas" not in hardening.app_deployment(docs)["spec"], "the HPA owns the replica count"
    assert one(docs, "PodDisruptionBudget", RELEASE)["spec"] == {
        "maxUnavailable": 1,
        "selector": {
            "matchLabels": {"app.kubernetes.io/name": "catalog", "app.kubernetes.io/instance": RELEASE}
        },
    }
    rule, prometheus = one(docs, "NetworkPolicy", RELEASE)["spec"]["ingress"]
    assert len(rule["from"]) == 2, "the ingress controller's namespace and the helm test pods"
    assert prometheus["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    spread = hardening.app_pod_spec(docs)["topologySpreadConstraints"]
    assert {c["whenUnsatisfiable"] for c in spread} == {"DoNotSchedule"}
    for kind in ("ServiceMonitor", "PrometheusRule", "Ingress", "HTTPRoute"):
        assert len(by_kind(docs, kind)) == 1, kind
    env = _app_env(docs)
    tracing = {name: value for name, value in env.items() if name.startswith("OTEL_")}
    assert tracing == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
        "OTEL_SERVICE_NAME": "catalog",
        "OTEL_RESOURCE_ATTRIBUTES": f"k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=catalog,"
        f"k8s.deployment.name={RELEASE},deployment.environment.name=production",
    }
    assert Settings.from_env(tracing).tracing_enabled, "the app takes the rendered variables"
    names = [e["name"] for e in hardening.app_container(docs)["env"]]
    assert names.index("K8S_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES"), "$(K8S_POD_NAME) resolves"
    for doc in docs:
        assert doc["metadata"]["labels"]["team"] == "platform", hardening.ref(doc)


# ----------------------------------------------------------------------------------- values and schema


BAD_VALUES = [
    ("wrong type", ["--set", "replicaCount=three"]),
    ("unknown top-level key", ["--set", "replicas=3"]),
    ("unknown nested key", ["--set", "redis.persistence=true"]),
    ("bad enum", ["--set", "redis.architecture=cluster"]),
    ("bad log level", ["--set", "config.logLevel=LOUD"]),
    ("string for boolean", ["--set-string", "ingress.enabled=yes"]),
    ("short API key", ["--set", "auth.apiKeys.ci=short"]),
    (
        "secret in extraEnv",
        ["--set", "extraEnv[0].name=X", "--set", "extraEnv[0].valueFrom.secretKeyRef.name=s"],
    ),
    ("bad digest", ["--set", "image.digest=latest"]),
    ("bad redis url", ["--set", "redis.enabled=false", "--set", "externalRedis.url=http://x"]),
    ("tracing without an endpoint", ["--set", "tracing.enabled=true"]),
    ("tracing endpoint not a URL", ["--set", "tracing.endpoint=collector:4318"]),
    ("unknown sampler", ["--set", "tracing.sampler=sometimes"]),
    ("sampler ratio above 1", ["--set", "tracing.samplerRatio=2"]),
]


@pytest.mark.parametrize(("what", "args"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
@pytest.mark.parametrize("helm", HELMS)
def test_schema_rejects_bad_values(helm: str, what: str, args: list[str]) -> None:
    binary = require_tool(helm)
    proc = run([binary, "template", RELEASE, str(CHART), *args])
    assert proc.returncode != 0, f"{what} was accepted"
    assert "schema" in proc.stderr, proc.stderr


GUARDS = [
    (
        "external database without a Secret",
        ["--set", "postgresql.enabled=false", "--set", "externalDatabase.host=db"],
    ),
    ("external database without a host", ["--set", "postgresql.enabled=false"]),
    (
        "password in the Redis URL",
        ["--set", "redis.enabled=false", "--set", "externalRedis.url=redis://:pw@r:6379/0"],
    ),
    ("grace period too short", ["--set", "terminationGracePeriodSeconds=30"]),
    ("Kubernetes too old", ["--kube-version", "1.28.0"]),
]


@pytest.mark.parametrize(("what", "args"), GUARDS, ids=[g[0] for g in GUARDS])
def test_template_refuses(what: str, args: list[str]) -> None:
    binary = require_tool("helm4")
    proc = run([binary, "template", RELEASE, str(CHART), *args])
    assert proc.returncode != 0, f"{what} was accepted"


def _leaf_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Value paths that need a @param: keys whose schema is not a nested object of known properties."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        sub = schema["properties"][key]
        if isinstance(value, dict) and "properties" in sub:
            yield from _leaf_paths(value, sub, f"{path}.")
        else:
            yield path


def test_every_value_is_documented_and_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(values, schema)
    params = re.findall(r"^\s*## @param (\S+) \S", text, re.M)
    leaves = list(_leaf_paths(values, schema))
    missing, stale = sorted(set(leaves) - set(params)), sorted(set(params) - set(leaves))
    assert sorted(params) == sorted(leaves), f"missing @param: {missing}; stale @param: {stale}"
    readme = (CHART / "README.md").read_text()
    missing = [p for p in params if f"| `{p}` |" not in readme]
    assert not missing, f"chart/README.md lacks the parameters {missing}"
    for scenario in SCENARIOS:
        jsonschema.validate(yaml.safe_load(Path(values_file(scenario)).read_text()) or {}, schema)


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "catalog"
    assert chart["kubeVersion"]
    assert chart["appVersion"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])


# ------------------------------------------------------------------------------- redis config, for real


def test_redis_command_and_config_run_on_a_real_redis(renders: Renders, tmp_path: Path) -> None:
    server = require_tool("redis-server")
    cli = require_tool("redis-cli")
    docs = renders.docs("helm4", "defaults")
    conf = one(docs, "ConfigMap", f"{RELEASE}-redis")["data"]["redis.conf"]
    (container,) = one(docs, "Deployment", f"{RELEASE}-redis")["spec"]["template"]["spec"]["containers"]
    password = "p" * 32
    (tmp_path / "password").write_text(password)
    port = free_port()
    (tmp_path / "redis.conf").write_text(
        conf.replace("port 6379", f"port {port}").replace("dir /data", f"dir {tmp_path}")
    )
    script = (
        container["command"][2]
        .replace("/etc/redis/redis.conf", str(tmp_path / "redis.conf"))
        .replace("/var/run/secrets/redis/password", str(tmp_path / "password"))
        .replace("bind * -::*", "bind 127.0.0.1")
        .replace("redis-server", server)
    )
    log = tmp_path / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT)
    try:
        base = [cli, "-h", "127.0.0.1", "-p", str(port)]
        auth = {**os.environ, "REDISCLI_AUTH": password}
        for _ in range(50):
            if run([*base, "ping"], env=auth, timeout=5).stdout.strip() == "PONG":
                break
            time.sleep(0.1)
        assert run([*base, "ping"], env=auth, timeout=5).stdout.strip() == "PONG", log.read_text()
        assert "NOAUTH" in run([*base, "ping"], timeout=5).stdout, "redis must require the password"
        info = run([*base, "info", "memory"], env=auth, timeout=5).stdout
        assert "maxmemory_policy:allkeys-lru" in info
        assert re.search(r"^maxmemory:[1-9]", info, re.M)
        persistence = run([*base, "info", "persistence"], env=auth, timeout=5).stdout
        assert "aof_enabled:0" in persistence
        assert "ERR unknown command" in run([*base, "config", "get", "*"], env=auth, timeout=5).stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (released again, so a server can bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------- generated once (lookup)


# API keys (also ones rotated or added by hand since) and the Redis password an earlier install left.
EARLIER_SECRETS = {
    (NAMESPACE, f"{RELEASE}-api-keys"): {
        "default": "rotated-key-" + "a" * 30,
        "second": "another-key-" + "b" * 30,
    },
    (NAMESPACE, f"{RELEASE}-redis"): {"password": "existing-redis-password-" + "r" * 20},
}


@pytest.fixture(scope="module")
def fake_kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with fake_kubernetes(tmp_path_factory.mktemp("kube"), EARLIER_SECRETS, NAMESPACE) as config:
        yield config


@pytest.mark.parametrize("helm", HELMS)
def test_generated_secrets_are_kept_on_upgrade(helm: str, fake_kubeconfig: Path) -> None:
    binary = require_tool(helm)
    cmd = [binary, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=server"]
    if helm == "helm4":
        cmd.append("--disable-openapi-validation")  # the fake API serves no OpenAPI document
    proc = run(cmd, env={**os.environ, "KUBECONFIG": str(fake_kubeconfig)})
    assert proc.returncode == 0, proc.stderr
    docs = load_docs(proc.stdout)
    # the API keys (also ones rotated or added by hand since) and the Redis password are kept as they are
    for namespace, name in EARLIER_SECRETS:
        assert secret_data(one(docs, "Secret", name)) == EARLIER_SECRETS[(namespace, name)]
    # the PostgreSQL Secret did not exist yet: generated now
    assert len(secret_data(one(docs, "Secret", f"{RELEASE}-postgresql"))["password"]) == 32


# ------------------------------------------------------------------------------------------- scanners


def _skip_reason(skips: list[tuple[str, str, str]], check_id: str, subject: str) -> str | None:
    for skip_id, pattern, reason in skips:
        if skip_id == check_id and re.search(pattern, subject):
            return reason
    return None


def test_checkov_finds_nothing_unexplained(rendered_dir: Path) -> None:
    tool = require_tool("checkov")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    cmd = [tool, "-d", str(rendered_dir), "--framework", "kubernetes", "--skip-download", "--quiet"]
    proc = run([*cmd, "--compact", "-o", "json"], env=env)
    assert proc.stdout.strip(), proc.stderr
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failures, skipped = [], []
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        assert report["summary"]["passed"] > 0
        for check in report["results"]["failed_checks"]:
            where = f"{check['check_id']} {check['resource']} ({Path(check['file_path']).name})"
            reason = _skip_reason(CHECKOV_SKIPS, check["check_id"], where)
            (skipped if reason else failures).append(where if not reason else f"{where}: {reason}")
    print("checkov skipped (with reasons):", *sorted(set(skipped)), sep="\n  ")
    assert not failures, "checkov failures:\n" + "\n".join(failures)


def _trivy(target: Path, tmp_path: Path, name: str) -> list[dict[str, Any]]:
    tool = require_tool("trivy")
    out = tmp_path / f"{name}.json"
    cache = tmp_path / "trivy-cache"
    cmd = [tool, "config", "--skip-check-update", "--cache-dir", str(cache), "--format", "json"]
    proc = run([*cmd, "--output", str(out), str(target)])
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text()).get("Results") or []
    assert results, f"trivy found no config file in {target}"
    return [
        {**m, "Target": r["Target"]}
        for r in results
        for m in r.get("Misconfigurations") or []
        if m["Status"] == "FAIL"
    ]


def test_trivy_config_no_high_or_critical(rendered_dir: Path, tmp_path: Path) -> None:
    findings = _trivy(rendered_dir, tmp_path, "rendered") + _trivy(CHART, tmp_path, "chart")
    blocking, noted = [], []
    for f in findings:
        where = f"{f['ID']} {f['Severity']} {f['Target']}: {f['Message']}"
        reason = _skip_reason(TRIVY_SKIPS, f["ID"], f["Message"])
        if reason:
            noted.append(f"{where} -- skipped: {reason}")
        elif f["Severity"] in ("HIGH", "CRITICAL"):
            blocking.append(where)
        else:
            noted.append(where)
    print("trivy findings below HIGH or skipped:", *noted, sep="\n  ")
    assert not blocking, "trivy HIGH/CRITICAL:\n" + "\n".join(blocking)
