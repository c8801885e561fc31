"""Render the kustomize overlays under k8s/ and the Helm chart once per test session (shared by tests/k8s)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file())
CHART = ROOT / "chart"


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
    return proc.stdout


@functools.cache
def _kustomize(path: str, kubectl: str) -> str:
    return _run([kubectl, "kustomize", path])


def kustomize_text(path: str) -> str:
    """`kubectl kustomize <path>` (path relative to the repo root) as YAML text."""
    return _kustomize(path, require_tool("kubectl"))


def kustomize_docs(path: str) -> list[dict[str, Any]]:
    """The manifests `kubectl kustomize <path>` renders."""
    return [d for d in yaml.safe_load_all(kustomize_text(path)) if d]


def overlay_docs(overlay: str) -> list[dict[str, Any]]:
    return kustomize_docs(f"k8s/overlays/{overlay}")


@functools.cache
def _helm_template(helm: str, release: str) -> str:
    return _run([helm, "template", release, str(CHART)])


def chart_default_docs(release: str = "catalog") -> list[dict[str, Any]]:
    """`helm3 template <release> chart/` with the chart's default values."""
    helm = require_tool("helm3")
    assert (CHART / "Chart.yaml").is_file(), "chart/Chart.yaml is missing"
    return [d for d in yaml.safe_load_all(_helm_template(helm, release)) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one manifest of `kind` named `name`."""
    found = [d for d in docs if d.get("kind") == kind and d["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str, key: str = "containers") -> dict[str, Any]:
    for c in spec.get(key) or []:
        if c.get("name") == name:
            return dict(c)
    raise AssertionError(f"no {key} entry named {name}")
