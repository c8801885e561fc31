"""skaffold.yaml: valid against Skaffold's schema for its apiVersion, and every path it names exists."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from tests import k8s_hardening as hard
from tests.k8s.k8s_render import ROOT, chart_default_docs, find, overlay_docs
from tests.tools import unavailable

SKAFFOLD = ROOT / "skaffold.yaml"
# CI lays the steering repo's shared/ beside the clone.
SCHEMAS = ROOT.parent / "shared" / "schemas" / "skaffold"
API_VERSIONS = ("skaffold/v4beta13", "skaffold/v4beta14")
APP_PORT_FORWARD = {"resourceType": "service", "resourceName": "catalog", "port": 80, "localPort": 8080}


def _config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(SKAFFOLD.read_text())
    return config


def _profile(name: str) -> dict[str, Any]:
    profiles = {p["name"]: p for p in _config().get("profiles") or []}
    assert name in profiles, f"no profile {name!r}"
    return profiles[name]


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _apply_profile(config: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """What Skaffold makes of `config` with `profile` active: the profile's sections overlay the main ones
    field by field (a deployer it names is added, lists replace), then its JSON patches apply."""

    def overlay(base: Any, top: Any) -> Any:
        if isinstance(base, dict) and isinstance(top, dict):
            merged = dict(base)
            for key, value in top.items():
                merged[key] = overlay(base.get(key), value) if key in base else value
            return merged
        return copy.deepcopy(top)

    out = copy.deepcopy(config)
    out.pop("profiles", None)
    for key, value in profile.items():
        if key not in ("name", "activation", "patches", "requiresAllActivations"):
            out[key] = overlay(out.get(key), value) if key in out else copy.deepcopy(value)
    for patch in profile.get("patches") or []:
        *parents, last = _pointer(patch["path"])
        node: Any = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = patch.get("op", "replace")
        assert isinstance(node, dict), f"patch {patch} is only checked on mappings"
        if op == "remove":
            assert last in node, f"patch path {patch['path']} does not exist (Skaffold fails)"
            del node[last]
        elif op in ("replace", "add"):
            assert op == "add" or last in node, f"patch path {patch['path']} does not exist"
            node[last] = patch["value"]
        else:
            raise AssertionError(f"op {op} not handled here")
    return out


def test_schema_valid() -> None:
    config = _config()
    version = config.get("apiVersion")
    assert version in API_VERSIONS, f"apiVersion {version!r}, want one of {API_VERSIONS}"
    schema_file = SCHEMAS / f"{version.split('/')[1]}.json"
    if not schema_file.is_file():
        unavailable(f"{schema_file} is missing (the shared/ directory lies beside the repo)")
    schema = json.loads(schema_file.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert config["kind"] == "Config"


def test_build_artifact() -> None:
    [artifact] = _config()["build"]["artifacts"]
    assert artifact["image"] == "catalog"
    context = ROOT / artifact.get("context", ".")
    dockerfile = context / artifact.get("docker", {}).get("dockerfile", "Dockerfile")
    assert dockerfile.resolve() == (ROOT / "Dockerfile").resolve()
    assert dockerfile.is_file(), f"{dockerfile} does not exist"


def test_default_deploys_the_chart_with_the_built_image() -> None:
    config = _config()
    assert set(config["deploy"]) == {"helm"}, "the default pipeline deploys with Helm only"
    [release] = config["deploy"]["helm"]["releases"]
    assert release["name"] == "catalog"
    chart = ROOT / release["chartPath"]
    assert (chart / "Chart.yaml").is_file(), f"{chart} is not a chart"
    image = re.sub(r"[^A-Za-z0-9]", "_", config["build"]["artifacts"][0]["image"])
    templates = release["setValueTemplates"]
    assert templates["image.repository"] == f"{{{{.IMAGE_REPO_{image}}}}}"
    assert templates["image.tag"] == f"{{{{.IMAGE_TAG_{image}}}}}"
    # the keys exist in the chart's values
    values = yaml.safe_load((chart / "values.yaml").read_text())
    for key in templates:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict), f"{key} is not a value of the chart"
            assert part in node, f"{key} is not a value of the chart"
            node = node[part]
    assert config["portForward"] == [APP_PORT_FORWARD]


def test_kustomize_profile() -> None:
    config = _apply_profile(_config(), _profile("kustomize"))
    assert set(config["deploy"]) == {"kubectl"}, config["deploy"]
    paths = config["manifests"]["kustomize"]["paths"]
    assert paths == ["k8s/overlays/dev"]
    for path in paths:
        assert (ROOT / path / "kustomization.yaml").is_file(), f"{path} is not a kustomization"
    assert config["portForward"] == [{**APP_PORT_FORWARD, "namespace": "catalog-dev"}]


def _forwarded_service(docs: list[dict[str, Any]], forward: dict[str, Any]) -> None:
    svc = find(docs, "Service", forward["resourceName"])
    if "namespace" in forward:
        assert svc["metadata"].get("namespace") == forward["namespace"]
    ports = {p["port"]: p for p in svc["spec"]["ports"]}
    assert ports[forward["port"]]["name"] == "http"
    hard.assert_app_service([svc, hard.app_deployment(docs)])


def test_port_forward_targets_the_kustomize_service() -> None:
    [forward] = _apply_profile(_config(), _profile("kustomize"))["portForward"]
    _forwarded_service(overlay_docs("dev"), forward)
    # Skaffold swaps this image name for the one it builds.
    assert hard.app_container(overlay_docs("dev"))["image"].split(":")[0] == "catalog"


def test_port_forward_targets_the_chart_service() -> None:
    [forward] = _config()["portForward"]
    _forwarded_service(chart_default_docs("catalog"), forward)


def test_readme_mentions_skaffold() -> None:
    text = (ROOT / "k8s" / "README.md").read_text()
    for snippet in ("skaffold dev", "skaffold dev -p kustomize", "kubectl apply -k k8s/overlays/dev"):
        assert snippet in text, snippet


def test_paths_are_relative() -> None:
    """No absolute path of a build machine in skaffold.yaml."""
    assert not re.search(r"(^|\s)/(home|root|tmp|work|Users)/", SKAFFOLD.read_text())
    assert Path("chart") == Path(_config()["deploy"]["helm"]["releases"][0]["chartPath"])
