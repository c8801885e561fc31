"""What a first `helm install` and a `helm upgrade` do on a real cluster (kind, EKS, GKE, OpenShift), read off
the rendered chart, and run for real where a render alone proves nothing: the roles SQL on a private
PostgreSQL, the Redis command on a real redis-server, the helm test scripts and the NOTES' curl lines against
a real gunicorn. No cluster exists here; each test says what it stands for on one.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.request import Request, urlopen

import psycopg
import pytest
import redis
import requests
import yaml
from sqlalchemy import create_engine, text
from tests import k8s_hardening as hardening
from tests.chart.test_helm_chart import (
    CHART,
    HELMS,
    NAMESPACE,
    RELEASE,
    ROOT,
    by_kind,
    free_port,
    load_docs,
    normalised,
    one,
    run,
)
from tests.conftest import DEFAULT_KEYS, WRITER_KEY, SecretDir
from tests.fake_kubernetes import fake_kubernetes
from tests.k8s.k8s_render import overlay_docs
from tests.tools import require_tool

from catalog.config import Settings, read_secret_file
from catalog.db import make_engine


def render(
    *args: str, helm: str | None = None, release: str = RELEASE, chart: Path = CHART
) -> list[dict[str, Any]]:
    """`helm template` with extra arguments, by `helm` or else by helm 3 and helm 4, which must agree (the
    generated passwords aside); fails the test if a render fails."""
    rendered = []
    for binary in [helm] if helm else HELMS:
        proc = run([require_tool(binary), "template", release, str(chart), "--namespace", NAMESPACE, *args])
        assert proc.returncode == 0, f"{binary}: {proc.stderr}"
        rendered.append(load_docs(proc.stdout))
    assert all(normalised(docs) == normalised(rendered[0]) for docs in rendered), "helm 3 and helm 4 differ"
    return rendered[-1]


def refuse(*args: str) -> str:
    """`helm template` that helm 3 and helm 4 must both fail, with the same error; returns it."""
    errors = set()
    for binary in HELMS:
        proc = run([require_tool(binary), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args])
        assert proc.returncode != 0, f"{binary} accepted {args}"
        errors.add(proc.stderr.splitlines()[0])
    assert len(errors) == 1, errors
    return errors.pop()


def notes(*args: str) -> str:
    """NOTES.txt as `helm install` prints it (helm 4 renders it without a cluster)."""
    proc = run(
        [require_tool("helm4"), "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", *args]
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("NOTES:", 1)[1]


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in hardening.workload_pod_specs(docs)}


def images(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {
        f"{name}/{c['name']}": c["image"]
        for name, spec in hardening.workload_pod_specs(docs)
        for _, c in hardening.all_containers(spec)
    }


def template_of(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    template: dict[str, Any] = one(docs, kind, name)["spec"]["template"]
    return template


# ------------------------------------------------------------------- 1. an image the cluster can pull


def test_bundled_images_are_fully_qualified_on_the_newest_patch_release() -> None:
    """CRI-O (OpenShift) refuses short names in its enforcing short-name mode: docker.io/library/..."""
    found = images(render())
    assert re.fullmatch(
        r"docker\.io/library/redis:7\.4\.\d+-bookworm", found[f"Deployment/{RELEASE}-redis/redis"]
    )
    postgres = found[f"StatefulSet/{RELEASE}-postgresql/postgresql"]
    assert re.fullmatch(r"docker\.io/library/postgres:17\.\d+-bookworm", postgres)
    assert found[f"Deployment/{RELEASE}/catalog"] == "catalog:0.1.0"


def test_image_registry_repository_and_pull_secrets() -> None:
    """bitnami's shape: image.registry for the app, global.imageRegistry (a mirror) for every image, and
    pull secrets (names or {name}) on every pod, the helm test pods included."""
    podman = images(render("--set", "image.repository=localhost/catalog"))
    assert podman[f"Deployment/{RELEASE}/catalog"] == "localhost/catalog:0.1.0", "podman's build name"
    docs = render(
        "--set", "image.registry=registry.example.com/team",
        "--set", "global.imagePullSecrets[0]=regcred",
        "--set", "imagePullSecrets[0].name=team-pull",
    )  # fmt: skip
    for where, image in images(docs).items():
        if where.endswith(("/redis", "/postgresql")):
            assert image.startswith("docker.io/library/"), where
        else:
            assert image == "registry.example.com/team/catalog:0.1.0", where
    for name, spec in pod_specs(docs).items():
        assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "team-pull"}], name
    mirrored = images(render("--set", "global.imageRegistry=mirror.example.com"))
    assert all(image.startswith("mirror.example.com/") for image in mirrored.values()), mirrored
    assert mirrored[f"Deployment/{RELEASE}-redis/redis"].startswith("mirror.example.com/library/redis:")


def test_readme_and_notes_walk_through_building_and_loading_the_image() -> None:
    text = notes()
    readme = (ROOT / "README.md").read_text()
    for shown in (text, readme):
        assert "docker build -t catalog:0.1.0 ." in shown
        assert "kind load docker-image catalog:0.1.0" in shown
        assert "podman save -o catalog.tar localhost/catalog:0.1.0" in shown
        assert "kind load image-archive catalog.tar" in shown
        assert "--set image.repository=localhost/catalog" in shown
        assert "minikube image load" in shown and "k3d image import" in shown
    assert "No registry publishes" not in notes("--set", "image.registry=ghcr.io/acme"), (
        "a registry image needs no build instructions"
    )


# ------------------------------------------------------------------------- 2. the first install converges


def test_migration_waits_for_postgresql_as_the_owner_role() -> None:
    spec = hardening.app_pod_spec(render("--set", "migrations.waitSeconds=300"))
    (migrate,) = spec["initContainers"]
    assert migrate["args"] == ["catalog", "db", "upgrade", "--wait", "300"]
    env = {e["name"]: e.get("value") for e in migrate["env"]}
    assert env["CATALOG_DATABASE_URL"] == f"postgresql://catalog@{RELEASE}-postgresql:5432/catalog"
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in migrate["volumeMounts"] if m["mountPath"] == "/var/run/secrets/catalog/database"]
    assert volumes[mount["name"]]["secret"]["items"] == [{"key": "owner-password", "path": "password"}]


def test_notes_wait_for_the_rollout_then_port_forward() -> None:
    text = notes()
    rollout = text.index(f"kubectl rollout status --namespace {NAMESPACE} deployment/{RELEASE}")
    forward = text.index(f"kubectl port-forward --namespace {NAMESPACE} service/{RELEASE} 8080:80")
    assert rollout < forward
    assert f"kubectl get secret --namespace {NAMESPACE} {RELEASE}-api-keys" in text


@pytest.fixture
def api_server(gunicorn: Any, redis_server: Any, tmp_path: Path, keys_dir: SecretDir) -> Any:
    """The service as the chart runs it (gunicorn, Redis, an empty database): what port-forward reaches."""
    env = {
        "CATALOG_DATABASE_URL": f"sqlite:///{tmp_path / 'catalog.db'}",
        "CATALOG_API_KEYS_DIR": str(keys_dir.path),
    }
    return gunicorn({**env, "CATALOG_REDIS_URL": redis_server.url})


def test_the_notes_curl_lines_pick_a_real_product_and_show_miss_then_hit(api_server: Any) -> None:
    """Step 4 of the NOTES, run as written (bash, curl, sed) against the service: a real id, MISS, HIT."""
    require_tool("curl")
    step = notes().split("4. Call it.", 1)[1].split("\n5. ", 1)[0]
    commands = "\n".join(line for line in step.splitlines()[1:] if line.startswith("  "))
    script = (
        "set -e\n" + commands.replace("127.0.0.1:8080", f"127.0.0.1:{api_server.port}") + '\necho "ID=$ID"\n'
    )
    proc = run(["bash", "-c", script], env={**os.environ, "CATALOG_API_KEY": WRITER_KEY})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (product_id,) = re.findall(r"^ID=(\S+)$", proc.stdout, re.M)
    assert requests.get(
        f"{api_server.url}/api/v1/products/{product_id}", headers={"X-Api-Key": WRITER_KEY}, timeout=5
    ).ok
    assert [h.split(":")[1].strip() for h in re.findall(r"^x-cache:.*$", proc.stdout, re.M | re.I)] == [
        "MISS",
        "HIT",
    ]
    assert "catalog_cache_requests_total" in proc.stdout


# ------------------------------------------------------------------------ 3. upgrades without an outage


def _bumped_chart(tmp_path: Path) -> Path:
    """A copy of the chart with the next chart version and app version (what a release does)."""
    copy_ = tmp_path / "chart"
    shutil.copytree(CHART, copy_)
    meta = yaml.safe_load((copy_ / "Chart.yaml").read_text())
    meta["version"], meta["appVersion"] = "99.1.0", "99.1.0"
    (copy_ / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return copy_


@pytest.mark.parametrize("helm", HELMS)
def test_a_chart_upgrade_does_not_restart_redis_or_postgresql(helm: str, tmp_path: Path) -> None:
    """Same values, next chart version: Redis' and PostgreSQL's pod templates are unchanged (no restart, no
    cache loss, no database outage); the StatefulSet's spec, immutable parts included, is unchanged (the
    upgrade is accepted); the app rolls to its new image without taking a pod away first."""
    before = render(helm=helm)
    after = render(helm=helm, chart=_bumped_chart(tmp_path))
    postgresql, redis_ = f"{RELEASE}-postgresql", f"{RELEASE}-redis"
    assert one(before, "StatefulSet", postgresql)["spec"] == one(after, "StatefulSet", postgresql)["spec"]
    assert template_of(before, "Deployment", redis_) == template_of(after, "Deployment", redis_)
    for docs in (before, after):
        for kind, name in (("StatefulSet", postgresql), ("Deployment", redis_)):
            labels = template_of(docs, kind, name)["metadata"]["labels"]
            assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels, (kind, labels)
    app_before, app_after = hardening.app_deployment(before), hardening.app_deployment(after)
    assert app_before["spec"]["template"] != app_after["spec"]["template"]
    assert app_after["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert hardening.app_container(after)["image"] == "catalog:99.1.0"


def test_only_their_own_config_restarts_redis_and_postgresql() -> None:
    base = render()
    retuned = render("--set", "redis.maxmemory=32mb", "--set", "config.logLevel=DEBUG")
    redis_ = f"{RELEASE}-redis"
    assert template_of(base, "Deployment", redis_) != template_of(retuned, "Deployment", redis_)
    postgresql = f"{RELEASE}-postgresql"
    assert template_of(base, "StatefulSet", postgresql) == template_of(retuned, "StatefulSet", postgresql)


# -------------------------------------------------------------------- 4. a per-pod cache only with one pod


PER_POD_CACHE = [
    ("sidecar, 2 replicas", ["--set", "redis.architecture=sidecar"]),
    ("sidecar, autoscaling", ["--set", "redis.architecture=sidecar", "--set", "replicaCount=1",
                              "--set", "autoscaling.enabled=true"]),
    ("no Redis, 2 replicas", ["--set", "redis.enabled=false"]),
    ("no Redis, autoscaling", ["--set", "redis.enabled=false", "--set", "replicaCount=1",
                               "--set", "autoscaling.enabled=true"]),
]  # fmt: skip


@pytest.mark.parametrize(("what", "args"), PER_POD_CACHE, ids=[c[0] for c in PER_POD_CACHE])
def test_a_per_pod_cache_with_more_than_one_pod_is_refused(what: str, args: list[str]) -> None:
    error = refuse(*args)
    assert "each pod would cache and count rate limits on its own" in error, error


def test_one_pod_with_a_per_pod_cache_renders_and_the_sidecar_never_gates_readiness() -> None:
    render("--set", "redis.enabled=false", "--set", "replicaCount=1")
    docs = render("--set", "redis.architecture=sidecar", "--set", "replicaCount=1")
    (sidecar,) = [c for c in hardening.app_pod_spec(docs)["initContainers"] if c["name"] == "redis"]
    assert sidecar["restartPolicy"] == "Always"
    assert "readinessProbe" not in sidecar, (
        "a sidecar's readiness is the pod's: a cache outage must only degrade"
    )
    assert {"startupProbe", "livenessProbe"} <= set(sidecar)
    (standalone,) = template_of(render(), "Deployment", f"{RELEASE}-redis")["spec"]["containers"]
    assert "readinessProbe" in standalone, "the standalone Redis leaves its Service while it is down"


# ------------------------------------------------------------------------------ 5. connections add up


def test_the_chart_counts_connections_like_the_app_pools_them() -> None:
    """The chart's per-worker figure (2 x threads) is the engine's pool_size + max_overflow."""
    for threads in (1, 4, 9):
        engine = make_engine(Settings(database_url="postgresql://u@db.invalid/x", threads=threads))
        pool: Any = engine.pool
        assert pool.size() + pool._max_overflow == 2 * threads
        engine.dispose()


def test_connections_are_checked_against_max_connections() -> None:
    text = notes()
    # 2 workers x 2 x 4 threads x (2 replicas + 1 surging) = 48
    assert "the app may open up to 48 of max_connections 100 (reserve 10)" in text
    pg = one(render("--set", "postgresql.maxConnections=120"), "StatefulSet", f"{RELEASE}-postgresql")
    assert "max_connections=120" in pg["spec"]["template"]["spec"]["containers"][0]["args"]
    # 4 x 2 x 4 x (3 + 1) = 128 > 100 - 10
    error = refuse("--set", "config.webConcurrency=4", "--set", "replicaCount=3")
    assert "128 PostgreSQL connections" in error and "= 90" in error, error
    render(
        "--set",
        "config.webConcurrency=4",
        "--set",
        "replicaCount=3",
        "--set",
        "postgresql.maxConnections=150",
    )
    # with the HPA the maximum counts: 2 x 2 x 4 x (10 + 3) = 208
    assert "208 PostgreSQL connections" in refuse("--set", "autoscaling.enabled=true")
    external = ["--set", "postgresql.enabled=false", "--set", "externalDatabase.host=db",
                "--set", "externalDatabase.existingSecret=db"]  # fmt: skip
    render(*external)
    assert "48 connections to the external database" in refuse(
        *external, "--set", "externalDatabase.maxConnections=40"
    )


def test_readme_shows_the_connection_arithmetic() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## Connections" in readme
    section = readme.split("## Connections", 1)[1].split("\n## ", 1)[0]
    assert "2 x 2 x 4 x (2 + 1) = 48" in section
    assert "externalDatabase.maxConnections" in section and "PgBouncer" in section


# ------------------------------------------------------------- 6. least privilege in the bundled PostgreSQL


def _roles_sql_and_hba(docs: list[dict[str, Any]], secrets: Path) -> tuple[str, str]:
    data = one(docs, "ConfigMap", f"{RELEASE}-postgresql")["data"]
    sql = data["10-catalog-roles.sql"].replace("/var/run/secrets/postgresql", str(secrets))
    return sql, data["pg_hba.conf"]


def _as(url: str, statement: str) -> str | None:
    """Run one statement; None when it worked, else the SQLSTATE-ish error class name."""
    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as connection:
            connection.execute(statement)  # type: ignore[arg-type]
    except psycopg.Error as error:
        return type(error).__name__
    return None


def test_the_app_role_gets_dml_only_and_migrations_run_as_the_owner(
    private_postgres: Any, tmp_path: Path, keys_dir: SecretDir
) -> None:
    """The chart's roles script and pg_hba.conf on a real PostgreSQL, as the official image runs them at
    initdb; then the migration as the owner, the app as the app role, and a later migration's new table."""
    docs = render()
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    owner_password, app_password = "owner pass 'with' \"quotes\" \\ ", " app:pa$$ word\\"
    (secrets / "owner-password").write_text(owner_password + "\n")
    (secrets / "password").write_text(app_password + "\n")
    sql, hba = _roles_sql_and_hba(docs, secrets)
    (tmp_path / "roles.sql").write_text(sql)
    pg = private_postgres()
    (pg.root / "pg_hba.conf").write_text(hba)  # where the server's user can read it
    pg.server_options = ("-c", f"hba_file={pg.root / 'pg_hba.conf'}")
    pg.start()
    # what docker-entrypoint.sh does on an empty volume: POSTGRES_DB, then each initdb script with psql
    pg.psql("-c", "CREATE DATABASE catalog", over_socket=True)
    pg.psql(
        "--no-password",
        "--no-psqlrc",
        "-f",
        str(tmp_path / "roles.sql"),
        database="catalog",
        over_socket=True,
    )

    owner = pg.url("catalog", "catalog", owner_password.strip())
    app = pg.url("catalog_app", "catalog", app_password.strip())
    env = {
        "PATH": os.environ["PATH"],
        "CATALOG_DATABASE_URL": pg.url("catalog", "catalog"),
        "CATALOG_DATABASE_PASSWORD_FILE": str(secrets / "owner-password"),
    }
    migrated = run([sys.executable, "-m", "catalog.cli", "db", "upgrade", "--wait", "10"], env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr

    assert _as(app, "INSERT INTO products VALUES ('p1','SKU-1','n','',1,'EUR','[]',now(),now(),1)") is None
    assert _as(app, "UPDATE products SET name = 'm' WHERE id = 'p1'") is None
    assert _as(app, "SELECT * FROM products") is None
    assert _as(app, "DELETE FROM products WHERE id = 'p1'") is None
    for forbidden in (
        "CREATE TABLE intruder (id int)",
        "DROP TABLE products",
        "ALTER TABLE products ADD COLUMN x int",
        "TRUNCATE products",
        "CREATE TEMP TABLE scratch (id int)",
        "CREATE SCHEMA other",
        "CREATE ROLE other",
    ):
        assert _as(app, forbidden) == "InsufficientPrivilege", forbidden
    # a table (and its sequence) a later migration adds, as the owner: the app may use it at once
    assert _as(owner, "CREATE TABLE later_things (id serial PRIMARY KEY, name text)") is None
    assert _as(app, "INSERT INTO later_things (name) VALUES ('x')") is None
    assert _as(app, "DROP TABLE later_things") == "InsufficientPrivilege"
    # the roles are nothing more than that; the superuser never over the network; passwords are checked
    roles = pg.psql("-At", "-c", "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                    "WHERE rolname LIKE 'catalog%' ORDER BY 1", over_socket=True)  # fmt: skip
    assert roles.split() == ["catalog|f|f|f", "catalog_app|f|f|f"]
    assert _as(pg.url("postgres", "catalog"), "SELECT 1") == "OperationalError"
    assert _as(pg.url("catalog_app", "catalog", "wrong"), "SELECT 1") == "OperationalError"
    # the app itself, as the app role, through its own API
    from catalog import create_app

    settings = Settings(
        database_url=pg.url("catalog_app", "catalog"),
        database_password_file=str(secrets / "password"),
        api_keys_dir=str(keys_dir.path),
    )
    application = create_app(settings)
    body = {"sku": "LEAST-1", "name": "x", "price_cents": 1, "currency": "EUR"}
    response = application.test_client().post(
        "/api/v1/products", json=body, headers={"X-Api-Key": WRITER_KEY}
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    application.extensions["catalog.db"].engine.dispose()


def test_app_and_migrations_use_different_roles_from_one_secret() -> None:
    docs = render()
    env = dict(one(docs, "ConfigMap", RELEASE)["data"])
    assert env["CATALOG_DATABASE_URL"] == f"postgresql://catalog_app@{RELEASE}-postgresql:5432/catalog"
    secret = one(docs, "Secret", f"{RELEASE}-postgresql")
    assert set(secret["data"]) == {"password", "owner-password"}
    pg = template_of(docs, "StatefulSet", f"{RELEASE}-postgresql")["spec"]
    (container,) = pg["containers"]
    container_env = {e["name"]: e.get("value") for e in container["env"]}
    assert container_env["POSTGRES_USER"] == "postgres"
    assert "hba_file=/etc/postgresql/pg_hba.conf" in container["args"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {
        "/docker-entrypoint-initdb.d",
        "/etc/postgresql",
    }
    assert "the app's role" in refuse("--set", "postgresql.auth.ownerUsername=catalog_app")
    assert "superuser" in refuse("--set", "postgresql.auth.username=postgres")


def test_redis_and_postgresql_have_identities_of_their_own() -> None:
    """IRSA (EKS) and Workload Identity (GKE) bind a cloud role to the app's ServiceAccount: Redis and
    PostgreSQL must not run under it."""
    docs = render(
        "--set", "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/catalog",
        "--set", "serviceAccount.annotations.iam\\.gke\\.io/gcp-service-account=c@p.iam.gserviceaccount",
    )  # fmt: skip
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind(docs, "ServiceAccount")}
    specs = pod_specs(docs)
    assert specs[f"Deployment/{RELEASE}"]["serviceAccountName"] == RELEASE
    assert specs[f"Deployment/{RELEASE}-redis"]["serviceAccountName"] == f"{RELEASE}-redis"
    assert specs[f"StatefulSet/{RELEASE}-postgresql"]["serviceAccountName"] == f"{RELEASE}-postgresql"
    assert "eks.amazonaws.com/role-arn" in accounts[RELEASE]["metadata"]["annotations"]
    for name in (f"{RELEASE}-redis", f"{RELEASE}-postgresql"):
        assert not accounts[name]["metadata"].get("annotations"), name
        assert accounts[name]["automountServiceAccountToken"] is False


# -------------------------------------------------------------------- 7. secrets that survive GitOps


# What an earlier install left: the API keys and the Redis password Secrets (no PostgreSQL one yet).
EARLIER = {
    (NAMESPACE, f"{RELEASE}-api-keys"): {"default": "kept-key-" + "a" * 30},
    (NAMESPACE, f"{RELEASE}-redis"): {"password": "kept-redis-password-" + "r" * 20},
}
STATEFULSET = ("statefulsets", f"{RELEASE}-postgresql")
PVC = ("persistentvolumeclaims", f"data-{RELEASE}-postgresql-0")
REDIS_DEPLOYMENT = ("deployments", f"{RELEASE}-redis")


def _server_render(
    helm: str, tmp_path: Path, secrets: dict[tuple[str, str], dict[str, str]], objects: list[tuple[str, str]]
) -> subprocess.CompletedProcess[str]:
    """`helm template --dry-run=server` on a fake API holding `secrets` and `objects` (resource, name)."""
    owned = {  # what helm leaves on what it installed (helm 4 checks it before it adopts an object)
        "labels": {"app.kubernetes.io/managed-by": "Helm"},
        "annotations": {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE},
    }
    existing = {
        (NAMESPACE, resource, name): {
            "kind": "Object",
            "apiVersion": "v1",
            "metadata": {"name": name, **owned},
        }
        for resource, name in objects
    }
    with fake_kubernetes(tmp_path, secrets, NAMESPACE, existing) as kubeconfig:
        cmd = [require_tool(helm), "template", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=server"]
        if helm == "helm4":
            cmd.append("--disable-openapi-validation")
        return run(cmd, env={**os.environ, "KUBECONFIG": str(kubeconfig)})


@pytest.mark.parametrize(
    ("what", "left", "secret"),
    [
        ("PostgreSQL's volume", PVC, f"{RELEASE}-postgresql"),
        ("PostgreSQL's StatefulSet", STATEFULSET, f"{RELEASE}-postgresql"),
        ("the Redis Deployment", REDIS_DEPLOYMENT, f"{RELEASE}-redis"),
    ],
)
@pytest.mark.parametrize("helm", HELMS)
def test_a_password_a_server_already_took_is_never_replaced(
    helm: str, tmp_path: Path, what: str, left: tuple[str, str], secret: str
) -> None:
    """The Secret is gone, the server that took its password is not: the render stops, naming both."""
    secrets = {key: data for key, data in EARLIER.items() if key[1] != secret}
    proc = _server_render(helm, tmp_path, secrets, [left])
    assert proc.returncode != 0, f"{what}: a new password was rendered"
    assert f"the Secret {secret} is gone" in proc.stderr, proc.stderr


@pytest.mark.parametrize("helm", HELMS)
def test_kept_passwords_are_reused_and_missing_keys_added(helm: str, tmp_path: Path) -> None:
    secrets = {**EARLIER, (NAMESPACE, f"{RELEASE}-postgresql"): {"password": "app-password-kept-" + "k" * 20}}
    proc = _server_render(helm, tmp_path, secrets, [PVC, STATEFULSET, REDIS_DEPLOYMENT])
    assert proc.returncode == 0, proc.stderr
    data = one(load_docs(proc.stdout), "Secret", f"{RELEASE}-postgresql")["data"]
    assert base64.b64decode(data["password"]).decode() == "app-password-kept-" + "k" * 20
    assert len(base64.b64decode(data["owner-password"])) == 32


def test_bring_your_own_secrets_renders_none() -> None:
    docs = render(
        "--set", "auth.existingSecret=keys",
        "--set", "redis.auth.existingSecret=redis",
        "--set", "postgresql.auth.existingSecret=pg",
    )  # fmt: skip
    assert not by_kind(docs, "Secret")
    assert images(docs), "the workloads are all there"


def test_gitops_is_documented() -> None:
    values = (CHART / "values.yaml").read_text()
    readme = (CHART / "README.md").read_text()
    assert "Under `helm template` (Argo CD) `lookup` sees nothing" in values
    section = readme.split("## GitOps", 1)[1].split("\n## ", 1)[0]
    for word in ("Argo CD", "Flux", "lookup", "auth.existingSecret", "redis.auth.existingSecret",
                 "postgresql.auth.existingSecret"):  # fmt: skip
        assert word in section, word


# -------------------------------------------------------------------- 8. nothing operational on the edge


def _prefix_matches(prefix: str, path: str) -> bool:
    """Kubernetes Ingress `Prefix` and Gateway API `PathPrefix`: element-wise, a trailing slash ignored."""
    want = [p for p in prefix.split("/") if p]
    have = [p for p in path.split("/") if p]
    return have[: len(want)] == want


OPERATIONAL = ("/metrics", "/docs", "/openapi.json", "/readyz", "/livez", "/healthz", "/version")


@pytest.mark.parametrize(
    "scenario_args", [[], ["-f", str(CHART / "ci" / "ha-values.yaml")]], ids=["defaults", "ha"]
)
def test_ingress_and_httproute_route_only_the_api(scenario_args: list[str]) -> None:
    docs = render("--set", "ingress.enabled=true", "--set", "httpRoute.enabled=true", *scenario_args)
    (ingress,) = by_kind(docs, "Ingress")
    (route,) = by_kind(docs, "HTTPRoute")
    prefixes = [p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    prefixes += [m["path"]["value"] for r in route["spec"]["rules"] for m in r["matches"]]
    for path in OPERATIONAL:
        assert not any(_prefix_matches(prefix, path) for prefix in prefixes), f"{path} is on the public edge"
    for path in ("/api/v1/products", "/api/v1/products/01J"):
        assert all(_prefix_matches(prefix, path) for prefix in prefixes), path


def _admits(
    policy: dict[str, Any], namespace_labels: dict[str, str], pod_labels: dict[str, str], same_ns: bool
) -> bool:
    """Does this Ingress NetworkPolicy admit a peer to port http (label selectors by matchLabels)?"""

    def matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in ((selector or {}).get("matchLabels") or {}).items())

    for rule in policy["spec"].get("ingress") or []:
        if "http" not in [p["port"] for p in rule.get("ports") or [{"port": "http"}]]:
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            ns_ok = (
                matches(peer["namespaceSelector"], namespace_labels)
                if "namespaceSelector" in peer
                else same_ns
            )
            pod_ok = matches(peer.get("podSelector"), pod_labels)
            if ns_ok and pod_ok:
                return True
    return False


def test_prometheus_can_still_scrape_behind_allowed_from() -> None:
    docs = render("-f", str(CHART / "ci" / "ha-values.yaml"))
    policy = one(docs, "NetworkPolicy", RELEASE)
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    prometheus = {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack"}
    assert _admits(policy, monitoring, prometheus, same_ns=False), "Prometheus cannot scrape /metrics"
    assert not _admits(policy, monitoring, {"app.kubernetes.io/name": "grafana"}, same_ns=False)
    assert _admits(policy, {"kubernetes.io/metadata.name": "ingress-nginx"}, {}, same_ns=False)
    assert not _admits(policy, {"kubernetes.io/metadata.name": "default"}, {"app": "x"}, same_ns=False)
    test_pod = {"app.kubernetes.io/name": "catalog-test", "app.kubernetes.io/instance": RELEASE}
    assert _admits(policy, {"kubernetes.io/metadata.name": NAMESPACE}, test_pod, same_ns=True)
    # without allowedFrom everyone may connect (and so may Prometheus): no extra rule
    (open_rule,) = one(render(), "NetworkPolicy", RELEASE)["spec"]["ingress"]
    assert "from" not in open_rule


def test_nodeport_and_loadbalancer_warn_that_the_whole_port_is_exposed() -> None:
    assert "WARNING: service.type" not in notes()
    text = notes(
        "--set", "service.type=LoadBalancer", "--set", "service.loadBalancerSourceRanges[0]=10.0.0.0/8"
    )
    assert "exposes the whole port, /metrics and /docs included" in text
    balanced = render(
        "--set", "service.type=LoadBalancer", "--set", "service.loadBalancerSourceRanges[0]=10.0.0.0/8"
    )
    service = one(balanced, "Service", RELEASE)
    assert service["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]


# --------------------------------------------------------------------------------- 9. names and networks

LONG_RELEASE = "r" * 44 + "-release1"  # 53 characters: helm's longest release name


@pytest.mark.parametrize("scenario", ["defaults", "ha", "redis-sidecar", "extensions"])
@pytest.mark.parametrize("helm", HELMS)
def test_the_longest_release_name_gives_valid_names(helm: str, scenario: str, tmp_path: Path) -> None:
    assert len(LONG_RELEASE) == 53
    text = run([require_tool(helm), "template", LONG_RELEASE, str(CHART), "-n", NAMESPACE,
                "-f", str(CHART / "ci" / f"{scenario}-values.yaml")])  # fmt: skip
    assert text.returncode == 0, text.stderr
    docs = load_docs(text.stdout)
    dns_label = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and dns_label.fullmatch(name), f"{hardening.ref(doc)}: {len(name)} characters"
        labels = dict(doc["metadata"].get("labels") or {})
        if doc["kind"] in hardening.WORKLOAD_KINDS:
            labels.update(hardening.pod_template_labels(doc))
        for key, value in labels.items():
            assert len(str(value)) <= 63, f"{hardening.ref(doc)}: label {key} is {len(str(value))} characters"
    for sts in by_kind(docs, "StatefulSet"):
        # its pods get controller-revision-hash: <name>-<10-character hash>, a label of at most 63
        assert len(sts["metadata"]["name"]) <= 52, sts["metadata"]["name"]
        for claim in sts["spec"].get("volumeClaimTemplates") or []:
            assert len(f"{claim['metadata']['name']}-{sts['metadata']['name']}-0") <= 63
    rendered = tmp_path / "long.yaml"
    rendered.write_text(
        yaml.safe_dump_all(
            [d for d in docs if d["kind"] not in ("ServiceMonitor", "PrometheusRule", "HTTPRoute")]
        )
    )
    proc = run([require_tool("kubernetes-validate"), "--strict", "--quiet", "-k", "1.33.0", str(rendered)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _redis_as_rendered(source: str) -> tuple[str, str, dict[str, Any]]:
    """redis.conf, the start script and the container of the chart's Redis or the kustomize component's."""
    if source == "chart":
        docs = render()
        conf = one(docs, "ConfigMap", f"{RELEASE}-redis")["data"]["redis.conf"]
        (container,) = template_of(docs, "Deployment", f"{RELEASE}-redis")["spec"]["containers"]
        return conf, container["command"][2], container
    docs = overlay_docs("dev")
    (container,) = template_of(docs, "Deployment", "catalog-redis")["spec"]["containers"]
    (config,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("catalog-redis")]
    return config["data"]["redis.conf"], container["args"][0], container


@pytest.mark.parametrize("source", ["chart", "kustomize"])
@pytest.mark.parametrize("password", ['quote"d \\back\\slash\\ and spaces', "it's $(not) `run` $HOME", ' " '])
def test_a_redis_password_with_quotes_backslashes_and_spaces(
    source: str, password: str, tmp_path: Path
) -> None:
    """The Redis start script and probes, as rendered, on a real redis-server; the app reads the file."""
    server = require_tool("redis-server")
    conf, script, container = _redis_as_rendered(source)
    (tmp_path / "password").write_text(password + "\n")
    port = free_port()
    (tmp_path / "redis.conf").write_text(
        conf.replace("port 6379", f"port {port}").replace("dir /data", f"dir {tmp_path}")
    )

    def local(command: str) -> str:
        return (
            command.replace("/etc/redis/redis.conf", str(tmp_path / "redis.conf"))
            .replace("/var/run/secrets/redis/password", str(tmp_path / "password"))
            .replace("bind * -::*", "bind 127.0.0.1")
            .replace("redis-server", server)
            .replace("redis-cli -h 127.0.0.1", f"{require_tool('redis-cli')} -h 127.0.0.1 -p {port}")
        )

    with (tmp_path / "redis.log").open("wb") as log:
        process = subprocess.Popen(["sh", "-c", local(script)], stdout=log, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(
            port=port, password=read_secret_file(str(tmp_path / "password")), socket_timeout=2
        )
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                threading.Event().wait(0.05)
        assert client.ping(), (tmp_path / "redis.log").read_text()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password=password + "x", socket_timeout=2).ping()
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = container[probe]["exec"]["command"]
            assert run([command[0], command[1], local(command[2])]).returncode == 0, probe
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


# -------------------------------------------------------------------- 10. helm test leaves nothing behind


class RoundRobin(BaseHTTPRequestHandler):
    """A Service in front of several pods: each request goes to the next backend."""

    backends: ClassVar[list[str]] = []
    counter: ClassVar[int] = 0
    lock: ClassVar[threading.Lock] = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        with self.lock:
            backend = self.backends[RoundRobin.counter % len(self.backends)]
            RoundRobin.counter += 1
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        request = Request(backend + self.path, data=body, method=self.command, headers=headers)
        try:
            with urlopen(request, timeout=10) as answer:
                status, answer_headers, payload = answer.status, answer.headers, answer.read()
        except Exception as error:  # HTTPError carries an answer too
            status, answer_headers, payload = error.code, error.headers, error.read()  # type: ignore[attr-defined]
        self.send_response(status)
        for key, value in answer_headers.items():
            if key.lower() not in ("transfer-encoding", "connection", "date", "server"):
                self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _forward


@pytest.fixture
def service(gunicorn: Any, redis_server: Any, tmp_path: Path, keys_dir: SecretDir) -> Iterator[Any]:
    """Make a 'Service' of N real pods (gunicorn servers on one database, with or without a shared Redis)."""
    proxies: list[ThreadingHTTPServer] = []

    def make(pods: int, shared_redis: bool, ttl: int = 60, seeded: bool = True) -> tuple[str, str]:
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
        env = {"CATALOG_DATABASE_URL": url, "CATALOG_API_KEYS_DIR": str(keys_dir.path),
               "CATALOG_CACHE_TTL_SECONDS": str(ttl)}  # fmt: skip
        if shared_redis:
            env["CATALOG_REDIS_URL"] = redis_server.url
        if seeded:
            assert (
                run(
                    [sys.executable, "-m", "catalog.cli", "db", "upgrade"], env={**os.environ, **env}
                ).returncode
                == 0
            )
            assert (
                run([sys.executable, "-m", "catalog.cli", "db", "seed"], env={**os.environ, **env}).returncode
                == 0
            )
        RoundRobin.backends = [gunicorn(env).url for _ in range(pods)]
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), RoundRobin)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        proxies.append(proxy)
        return f"http://127.0.0.1:{proxy.server_address[1]}", url

    yield make
    for proxy in proxies:
        proxy.shutdown()
        proxy.server_close()


def _rows(url: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = [tuple(r) for r in connection.execute(text("SELECT * FROM products ORDER BY id"))]
    engine.dispose()
    return rows


def _run_test_pods(base_url: str, keys: Path, values: list[str], only: str | None = None) -> dict[str, Any]:
    """Each helm test pod's script, as rendered, against `base_url`; name -> completed process."""
    docs = render(*values)
    results = {}
    for pod in sorted(
        by_kind(docs, "Pod"), key=lambda p: p["metadata"]["annotations"]["helm.sh/hook-weight"]
    ):
        name = pod["metadata"]["name"]
        if only and not name.endswith(only):
            continue
        (container,) = pod["spec"]["containers"]
        script = container["command"][2].replace("/var/run/secrets/catalog/api-keys", str(keys))
        env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}, "CATALOG_URL": base_url}
        results[name] = run([sys.executable, "-c", script], env=env, timeout=120)
    return results


@pytest.mark.parametrize(("pods", "shared_redis", "values"), [
    (3, True, []),
    (1, True, ["--set", "redis.architecture=sidecar", "--set", "replicaCount=1"]),
    (1, False, ["--set", "redis.enabled=false", "--set", "replicaCount=1"]),
], ids=["3 pods, shared Redis", "1 pod, sidecar Redis", "1 pod, no Redis"])  # fmt: skip
def test_helm_tests_pass_on_a_real_service_and_leave_the_data_as_it_was(
    service: Any, keys_dir: SecretDir, pods: int, shared_redis: bool, values: list[str]
) -> None:
    base_url, url = service(pods, shared_redis)
    before = _rows(url)
    assert len(before) == 36, "a catalog with data the tests must not touch"
    results = _run_test_pods(base_url, keys_dir.path, values)
    assert len(results) == 3
    for name, proc in results.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"
        assert "PASS" in proc.stdout
    cache = results[f"{RELEASE}-test-cache"].stdout
    assert "POST /api/v1/products: 201" in cache and re.search(r"DELETE /api/v1/products/\S+: 204", cache)
    assert _rows(url) == before, "the helm tests changed the catalog"


def test_the_cache_test_deletes_its_product_when_a_step_fails(service: Any, keys_dir: SecretDir) -> None:
    base_url, url = service(1, True, ttl=0)  # caching off: every GET is a BYPASS, so the check fails
    before = _rows(url)
    proc = _run_test_pods(base_url, keys_dir.path, [], only="cache")[f"{RELEASE}-test-cache"]
    assert proc.returncode != 0
    assert "no cache HIT" in proc.stdout + proc.stderr
    assert re.search(r"DELETE /api/v1/products/\S+: 204", proc.stdout)
    assert _rows(url) == before


def test_passed_test_pods_are_deleted_and_a_failed_one_kept_for_its_logs() -> None:
    """helm uninstall never deletes hook pods: a passed check's pod goes at once, a failed one stays until the
    next `helm test` (which replaces it)."""
    pods = by_kind(render(), "Pod")
    assert len(pods) == 3
    for pod in pods:
        policy = set(pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(","))
        assert policy == {"before-hook-creation", "hook-succeeded"}, pod["metadata"]["name"]


def test_a_read_only_key_makes_the_cache_test_read_without_writing(service: Any, tmp_path: Path) -> None:
    keys = SecretDir(tmp_path / "read-only-keys")
    keys.write({"reader": DEFAULT_KEYS["reader"]})
    base_url, url = service(1, True)
    before = _rows(url)
    proc = _run_test_pods(base_url, keys.path, [], only="cache")[f"{RELEASE}-test-cache"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "POST /api/v1/products: 403" in proc.stdout and "DELETE" not in proc.stdout
    assert _rows(url) == before


# ----------------------------------------------------------------- 11. OpenShift and extension points


FIXED_IDS = ("runAsUser", "runAsGroup", "fsGroup")


def _fixed_ids(docs: list[dict[str, Any]]) -> list[str]:
    found = []
    for name, spec in hardening.workload_pod_specs(docs):
        found += [f"{name}: pod {k}" for k in FIXED_IDS if k in (spec.get("securityContext") or {})]
        for _, c in hardening.all_containers(spec):
            found += [f"{name}/{c['name']}: {k}" for k in FIXED_IDS if k in (c.get("securityContext") or {})]
    return found


@pytest.mark.parametrize("helm", HELMS)
def test_openshift_gets_no_fixed_uids_and_everything_else_stays_hardened(helm: str) -> None:
    on_openshift = render("--api-versions", "security.openshift.io/v1", helm=helm)  # auto
    forced = render("--set", "global.compatibility.openshift.adaptSecurityContext=force", helm=helm)
    for docs in (on_openshift, forced):
        assert not _fixed_ids(docs)
        hardening.assert_containers_hardened(docs, app_uid=None)
    assert _fixed_ids(render(helm=helm)), "elsewhere the fixed UIDs stay"
    disabled = "global.compatibility.openshift.adaptSecurityContext=disabled"
    kept = render("--api-versions", "security.openshift.io/v1", "--set", disabled, helm=helm)
    hardening.assert_containers_hardened(kept)


def test_extension_points() -> None:
    docs = render("-f", str(CHART / "ci" / "extensions-values.yaml"))
    spec = hardening.app_pod_spec(docs)
    app = hardening.app_container(docs)
    env = {e["name"]: e for e in app["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["FEATURE_FLAGS"]["valueFrom"]["configMapKeyRef"]["name"] == "catalog-features"
    assert {"configMapRef": {"name": "catalog-extra"}} in app["envFrom"]
    assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True} in app["volumeMounts"]
    assert "ca-bundle" in {v["name"] for v in spec["volumes"]}
    assert [c["name"] for c in spec["initContainers"]] == ["migrate", "wait-for-vault"]
    assert [c["name"] for c in spec["containers"]] == ["catalog", "log-shipper"]
    assert hardening.app_deployment(docs)["spec"]["template"]["metadata"]["labels"]["team"] == "catalog"
    assert spec["priorityClassName"] == "business-critical"
    service = one(docs, "Service", RELEASE)["spec"]
    assert service["type"] == "NodePort" and service["ports"][0]["nodePort"] == 30080
    assert one(docs, "ConfigMap", f"{RELEASE}-extra")["data"] == {"RELEASE": RELEASE}
    assert spec["imagePullSecrets"] == [{"name": "mirror-credentials"}]
    assert hardening.app_container(docs)["image"] == "mirror.example.com/catalog:0.1.0"


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "extraEnvFrom[0].secretRef.name=s"],
        ["--set", "extraEnv[0].name=X", "--set", "extraEnv[0].valueFrom.secretKeyRef.name=s"],
    ],
    ids=["envFrom secretRef", "env secretKeyRef"],
)
def test_secrets_through_the_environment_are_refused(args: list[str]) -> None:
    assert "schema" in refuse(*args)


# --------------------------------------------------------------------------------------------- 12. Chart.yaml


def test_chart_metadata_for_artifact_hub_and_production_notes() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for key in ("home", "icon"):
        assert re.fullmatch(r"https://\S+", meta[key]), key
    assert meta["sources"] and all(re.fullmatch(r"https://\S+", s) for s in meta["sources"])
    assert meta["maintainers"] and all(m.get("name") for m in meta["maintainers"])
    readme = (CHART / "README.md").read_text()
    notes_ = readme.split("## Production notes", 1)[1].split("\n## ", 1)[0]
    for topic in ("backups", "operator", "managed", "StorageClass", "EBS CSI", "major version", "pg_dump"):
        assert topic in notes_, topic
