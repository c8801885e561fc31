"""tests/e2e/run.sh: shellcheck clean, and its dry mode against the fake API server the chart tests use.

The dry mode runs every step as far as a read-only API server allows (helm --dry-run=server with the
chart's lookups, kubectl client-side dry runs, reads of the keys Secret) and says which steps need running
pods. What only a cluster can show (rollout, curl, Prometheus, rotation, upgrade under load, helm test,
uninstall) runs in .github/workflows/e2e.yml on kind.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fake_kubernetes import fake_kubernetes
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "e2e" / "run.sh"
IMAGE = "localhost/catalog:e2e"
HELM_NAMESPACE = "catalog"
# The keys Secrets as a first install leaves them (the chart's generated key; the dev overlay's).
SECRETS = {
    (HELM_NAMESPACE, "catalog-api-keys"): {"default": "generated-key-" + "g" * 30},
    ("catalog-dev", "catalog-api-keys"): {"dev": "catalog-dev-key-not-secret-0001"},
}
STEPS = [
    "preflight",
    "install",
    "rollout status",
    "read the API key",
    "port-forward",
    "the README's curl walkthrough",
    "/metrics holds the catalog_* series",
    "an in-cluster Prometheus scrapes every app pod",
    "rotate keys",
    "upgrade while a request loop runs",
    "helm test",
    "uninstall leaves nothing behind",
]


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with fake_kubernetes(tmp_path_factory.mktemp("kube"), SECRETS, HELM_NAMESPACE) as config:
        yield config


def dry_run(kubeconfig: Path, helm: str, **env: str) -> subprocess.CompletedProcess[str]:
    kubectl = require_tool("kubectl")
    return subprocess.run(
        ["bash", str(SCRIPT)],
        env={
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "E2E_DRY_RUN": "1",
            "E2E_IMAGE": IMAGE,
            "E2E_NAMESPACE": HELM_NAMESPACE,
            "HELM": require_tool(helm),
            "KUBECTL": kubectl,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def step_headers(output: str) -> list[str]:
    return re.findall(r"^==> \[\d\d:\d\d:\d\d\] (.*)$", output, re.M)


def test_shellcheck_clean() -> None:
    shellcheck = require_tool("shellcheck")
    scripts = [SCRIPT, *sorted((ROOT / ".ci" / "tools").glob("*.sh")), ROOT / ".ci" / "run"]
    proc = subprocess.run(
        [shellcheck, "-x", "--source-path=SCRIPTDIR", "--severity=style", *map(str, scripts)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    ("shape", "helm"),
    [("standalone", "helm3"), ("standalone", "helm4"), ("sidecar", "helm4"), ("kustomize", "helm3")],
)
def test_dry_run_walks_every_step(kubeconfig: Path, shape: str, helm: str) -> None:
    proc = dry_run(kubeconfig, helm, E2E_SHAPE=shape)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    headers = step_headers(proc.stdout)
    assert len(headers) == len(STEPS)
    for header, expected in zip(headers, STEPS, strict=True):
        assert header.startswith(expected), (header, expected)
    # what it ran against the API server, and what it says it could not
    assert f"renders the app with image {IMAGE}" in proc.stdout
    assert "a key of " in proc.stdout
    assert "e2e-prometheus created (dry run)" in proc.stdout
    assert "secret/catalog-api-keys configured (dry run)" in proc.stdout
    assert "pod/e2e-load created (dry run)" in proc.stdout
    assert (
        "dry run: skipped (needs running pods): create, MISS then HIT, 304, PATCH, 412, DELETE" in proc.stdout
    )
    assert "PASSED: " in proc.stdout
    # the key is read but never printed
    secret = SECRETS[("catalog-dev" if shape == "kustomize" else HELM_NAMESPACE, "catalog-api-keys")]
    assert next(iter(secret.values())) not in output


@pytest.mark.parametrize(("shape", "replicas"), [("standalone", 3), ("sidecar", 1)])
def test_dry_run_upgrade_renders_the_new_replica_count(kubeconfig: Path, shape: str, replicas: int) -> None:
    proc = dry_run(kubeconfig, "helm4", E2E_SHAPE=shape)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"renders {replicas} replicas and a new pod template" in proc.stdout
    assert re.search(
        rf"upgrade catalog \S+ --namespace catalog --reuse-values --set replicaCount={replicas}", proc.stderr
    )


def test_a_failing_step_stops_with_diagnostics(kubeconfig: Path) -> None:
    # a namespace where no install left a keys Secret: the key step fails
    proc = dry_run(kubeconfig, "helm3", E2E_NAMESPACE="nothing-here")
    assert proc.returncode == 1
    assert step_headers(proc.stdout)[-1].startswith("read the API key")
    assert "FAIL: cannot read Secret catalog-api-keys in namespace nothing-here" in proc.stderr
    assert "FAILED at step: read the API key" in proc.stderr
    step = "read the API key (catalog-api-keys, client default)"
    assert f'diagnostics of the failed step "{step}" (namespace nothing-here)' in proc.stderr
    assert "--- events" in proc.stderr
    assert "PASSED" not in proc.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"E2E_SHAPE": "operator"}, "E2E_SHAPE must be standalone, sidecar or kustomize"),
        ({"E2E_IMAGE": "localhost/catalog"}, "E2E_IMAGE must be repository:tag"),
    ],
)
def test_bad_settings_are_refused(kubeconfig: Path, env: dict[str, str], message: str) -> None:
    proc = dry_run(kubeconfig, "helm3", **env)
    assert proc.returncode != 0
    assert message in proc.stderr
