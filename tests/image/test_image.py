"""The container image, proven by building and running it (podman), not by reading it.

- The Dockerfile passes hadolint, and `trivy config` / checkov find nothing HIGH or CRITICAL in it.
- No registry is reachable, so a local Debian bookworm base (debootstrap --variant=minbase with python3,
  python3-venv, ca-certificates and the host's CA bundle) is built once and cached (the image by a hash of
  its recipe, the .debs under CACHE_DIR); the project image is built on it with `--build-arg BASE_IMAGE`.
- The image runs with a read-only root filesystem, only /tmp writable, no capabilities, the API-keys
  directory mounted read-only and a real Redis: /readyz 200, a product GET is a MISS then a HIT, stdout
  is JSON lines, every process runs as UID 10001 with gunicorn as PID 1.
- `podman stop` (SIGTERM) while a request is in flight: the request completes and the container exits 0.
"""

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import resource
import shutil
import socket
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from tests.tools import require_tool

# A first run debootstraps the base and installs the lock (a few minutes); later runs reuse both.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
# debootstrap's .deb cache and the base image's build lock live outside the repo, kept between runs.
CACHE_DIR = Path(os.environ.get("CATALOG_TEST_CACHE_DIR", "/var/cache/catalog-test"))

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_REPO = "localhost/catalog-test-base"
IMAGE = "localhost/catalog-test:dev"
BUILD_STAGE_IMAGE = "localhost/catalog-test-build:dev"
CA_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"
# The local base: the debootstrapped root filesystem as one layer. pip inside the project build is
# pointed at the (host's) CA bundle, since pip's own bundle would not know this network's CA.
BASE_CONTAINERFILE = f"""\
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8 SSL_CERT_FILE={CA_IN_IMAGE} PIP_CERT={CA_IN_IMAGE}
CMD ["/bin/bash"]
"""
BASE_RECIPE_VERSION = "1"  # bump to force a rebuild of the cached base image

TEST_SOURCE = "https://example.invalid/catalog-image-test"
# Every image this test builds (each stage) carries this label, and only they do: old ones are pruned.
TEST_MARKER_LABEL = "catalog-image-test=1"

API_KEY = "image-test-" + "9f3c2a7d41b86e05" * 2
UID = "10001"
GRACE_SECONDS = 40  # podman stop's SIGKILL deadline: longer than gunicorn's graceful_timeout (30 s)
# The server's command line after the image's entrypoint: none, the image's own CMD (gunicorn, which gives
# the embedded SQLite database of the image's default its schema before the workers start).
SERVER_COMMAND: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- helpers


def host_ulimits() -> list[str]:
    """`--ulimit` options this host allows, for every build and run. Without them podman asks the runtime for
    its own defaults (or a containers.conf's), which runc may not set above the hard limits the podman
    process has (`error setting rlimit type 7: operation not permitted`)."""
    options = []
    for name, limit, wanted in (
        ("nofile", resource.RLIMIT_NOFILE, 65536),
        ("nproc", resource.RLIMIT_NPROC, 32768),
    ):
        _soft, hard = resource.getrlimit(limit)
        value = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        options.append(f"--ulimit={name}={value}:{value}")
    return options


HOST_ULIMITS = host_ulimits()


def run(
    *cmd: str, timeout: float = 120, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def host_ca_bundle() -> Path:
    """The CA bundle the host's Python trusts: $SSL_CERT_FILE, else what ssl's defaults name."""
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    pytest.fail("no CA bundle found on the host (SSL_CERT_FILE / ssl.get_default_verify_paths())")


def debian_mirror(suite: str = SUITE) -> str:
    """The Debian archive the host's apt uses (never hard-coded): its `suite` main entry, else the
    archive of any other Debian suite it uses (a mirror carries every suite)."""
    apt = Path("/etc/apt")
    entries: list[tuple[str, list[str], list[str]]] = []  # (uri, suites, components)
    one_line = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for raw in path.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()  # drop [options]
            if len(words) >= 4 and words[0] == "deb":
                entries.append((words[1], [words[2]], words[3:]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for raw in stanza.splitlines():
                if raw.startswith("#") or ":" not in raw or raw[:1].isspace():
                    continue
                key, value = raw.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                entries.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
    usable = [e for e in entries if e[0].startswith(("http://", "https://")) and "main" in e[2]]
    for uri, suites, _ in usable:
        if suite in suites:
            return uri
    for uri, suites, _ in usable:
        if any(not s.endswith(("-security", "/updates")) for s in suites) and "debian" in uri:
            return uri
    pytest.fail(f"no apt source for Debian {suite} main found under /etc/apt (needed by debootstrap)")


def pip_index_url() -> str | None:
    """The host's pip index, if it has one other than PyPI that a container can reach (http/https)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        pip = shutil.which("pip") or shutil.which("pip3")
        if pip:
            proc = subprocess.run(
                [pip, "config", "get", "global.index-url"], capture_output=True, text=True, timeout=30
            )
            url = proc.stdout.strip() if proc.returncode == 0 else None
    return url if url and url.startswith(("http://", "https://")) else None


def unmount_below(path: Path) -> None:
    """Unmount whatever an interrupted debootstrap left mounted inside `path` (deepest first)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def image_exists(podman: str, ref: str) -> bool:
    return subprocess.run([podman, "image", "exists", ref], check=False).returncode == 0


# ---------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def podman() -> str:
    return require_tool("podman")


@pytest.fixture(scope="module")
def base_image(podman: str) -> str:
    """The local Debian bookworm base, built by debootstrap once per recipe and kept between runs."""
    debootstrap = require_tool("debootstrap")
    ca_bundle = host_ca_bundle()
    recipe = hashlib.sha256()
    for part in (BASE_RECIPE_VERSION, SUITE, ",".join(BASE_PACKAGES), BASE_CONTAINERFILE):
        recipe.update(part.encode() + b"\0")
    recipe.update(ca_bundle.read_bytes())
    tag = f"{BASE_REPO}:{SUITE}-{recipe.hexdigest()[:16]}"

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "base-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find the image
        if image_exists(podman, tag):
            return tag
        started = time.monotonic()
        debs = CACHE_DIR / "debootstrap-debs"
        debs.mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="base-", dir=CACHE_DIR))
        rootfs = work / "rootfs"
        try:
            run(
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                f"--cache-dir={debs}",
                SUITE,
                str(rootfs),
                debian_mirror(),
                timeout=1200,
            )
            # Trust what the host trusts (this network's TLS is verified with the host's bundle).
            shutil.copyfile(ca_bundle, rootfs / CA_IN_IMAGE.lstrip("/"))
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (rootfs / junk).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            run(
                "tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(work / "rootfs.tar"), ".", timeout=300
            )
            (work / "Containerfile").write_text(BASE_CONTAINERFILE)
            unmount_below(rootfs)
            shutil.rmtree(rootfs)
            run(
                podman,
                "build",
                *HOST_ULIMITS,
                "--network=none",
                "--pull=never",
                "-t",
                tag,
                str(work),
                timeout=600,
            )
        finally:
            unmount_below(rootfs)
            shutil.rmtree(work, ignore_errors=True)
        # Older recipes' bases are of no use any more.
        listed = run(podman, "images", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPO, check=False)
        for old in listed.stdout.split():
            if old != tag:
                subprocess.run([podman, "rmi", old], check=False, capture_output=True)
        print(f"\nbase image {tag} built in {time.monotonic() - started:.0f} s")
    return tag


@pytest.fixture(scope="module")
def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


@pytest.fixture(scope="module")
def revision() -> str:
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return git.stdout.strip() if git.returncode == 0 else "unknown"


@pytest.fixture(scope="module")
def image(podman: str, base_image: str, project_version: str, revision: str) -> str:
    """The project image, built from the repo's Dockerfile on the local base (layers cached by podman)."""
    for needed in ("src/catalog/__init__.py", "gunicorn.conf.py", "README.md"):
        if not (ROOT / needed).is_file():
            pytest.fail(f"{needed} is missing: the image cannot be built")
    args = [
        podman,
        "build",
        *HOST_ULIMITS,
        "--network=host",  # pip reaches the package index through the host's network
        "--pull=never",
        "--format=docker",  # keeps the HEALTHCHECK (the OCI format has none), as `docker build` does
        f"--label={TEST_MARKER_LABEL}",
        "--build-arg",
        f"BASE_IMAGE={base_image}",
        "--build-arg",
        f"VERSION={project_version}",
        "--build-arg",
        f"REVISION={revision}",
        "--build-arg",
        f"SOURCE={TEST_SOURCE}",
    ]
    index = pip_index_url()
    if index:
        args += ["--build-arg", f"PIP_INDEX_URL={index}"]
    started = time.monotonic()
    # The build stage gets a tag of its own, so its layers (the installed lock above all) stay cached
    # when the pruning below removes what earlier runs left untagged.
    run(*args, "--target=build", "-t", BUILD_STAGE_IMAGE, "-f", str(DOCKERFILE), str(ROOT), timeout=900)
    run(*args, "-t", IMAGE, "-f", str(DOCKERFILE), str(ROOT), timeout=900)
    print(f"\nproject image built in {time.monotonic() - started:.0f} s")
    run(podman, "image", "prune", "--force", "--filter", f"label={TEST_MARKER_LABEL}", check=False)
    return IMAGE


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A real Redis on a free loopback port, without persistence."""
    server = require_tool("redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def api_keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The API-keys Secret as the kubelet lays it out (one file per client), readable by UID 10001."""
    keys = tmp_path_factory.mktemp("api-keys")
    (keys / "image-test").write_text(API_KEY + "\n")
    keys.chmod(0o755)
    (keys / "image-test").chmod(0o644)
    return keys


class Container:
    def __init__(self, podman: str, name: str, port: int) -> None:
        self.podman, self.name, self.port = podman, name, port
        self.base = f"http://127.0.0.1:{port}"

    def logs(self) -> tuple[str, str]:
        proc = run(self.podman, "logs", self.name, check=False)
        return proc.stdout, proc.stderr

    def state(self) -> dict[str, Any]:
        out = run(self.podman, "inspect", "--format", "{{json .State}}", self.name).stdout
        return dict(json.loads(out))

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.state().get("Running"):
                break
            try:
                resp = requests.get(self.base + "/readyz", timeout=2)
                if resp.status_code == 200:
                    return
                last = f"{resp.status_code} {resp.text[:500]}"
            except requests.RequestException as exc:
                last = repr(exc)
            time.sleep(0.25)
        out, err = self.logs()
        pytest.fail(
            f"/readyz not 200 ({last}); state {self.state()}"
            f"\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
        )


@pytest.fixture
def start_container(podman: str, image: str, redis_url: str, api_keys_dir: Path) -> Iterator[Any]:
    """Start the image as Kubernetes would: read-only root, only /tmp writable, no capabilities."""
    names: list[str] = []

    def start(*command: str) -> Container:
        """Run the image with `command` after its entrypoint (none: the image's own CMD, gunicorn)."""
        name = f"catalog-image-test-{uuid.uuid4().hex[:8]}"
        port = free_port()
        names.append(name)
        run(
            podman,
            "run",
            *HOST_ULIMITS,
            "--detach",
            "--name",
            name,
            "--network=host",  # Redis and the test client stay on the loopback interface
            "--read-only",
            "--read-only-tmpfs=false",  # no implicit writable /run, /var/tmp: only what we mount
            "--tmpfs=/tmp:rw,nosuid,nodev,noexec,mode=1777,size=64m",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--pull=never",
            f"--stop-timeout={GRACE_SECONDS}",
            "--volume",
            f"{api_keys_dir}:/var/run/secrets/catalog/api-keys:ro",
            "--env",
            f"PORT={port}",
            "--env",
            f"CATALOG_REDIS_URL={redis_url}",
            "--env",
            "WEB_CONCURRENCY=2",
            image,
            *command,
            timeout=60,
        )
        return Container(podman, name, port)

    yield start
    for name in names:
        subprocess.run([podman, "rm", "--force", "--time", "0", name], check=False, capture_output=True)


# ---------------------------------------------------------------------------------------------- lint


def test_hadolint_clean() -> None:
    hadolint = require_tool("hadolint")
    proc = run(hadolint, "--no-color", str(DOCKERFILE), check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.strip(), proc.stdout


def test_trivy_config_no_high_or_critical(tmp_path: Path) -> None:
    trivy = require_tool("trivy")
    proc = run(
        trivy,
        "config",
        "--skip-check-update",
        "--quiet",
        "--cache-dir",
        str(tmp_path / "trivy-cache"),
        "--format",
        "json",
        str(DOCKERFILE),
        timeout=300,
    )
    report = json.loads(proc.stdout)
    results = report.get("Results") or []
    assert any(r.get("Type") == "dockerfile" for r in results), (
        f"trivy scanned no Dockerfile: {proc.stdout[:2000]}"
    )
    bad = [
        f"{m.get('ID')} {m.get('Severity')}: {m.get('Title')}"
        for r in results
        for m in r.get("Misconfigurations") or []
        if m.get("Status") == "FAIL" and m.get("Severity") in {"HIGH", "CRITICAL"}
    ]
    assert not bad, bad


def test_checkov_clean() -> None:
    """checkov gives no severities offline, so every failed check counts; every skip carries a reason."""
    checkov = require_tool("checkov")
    proc = run(
        checkov,
        "--file",
        str(DOCKERFILE),
        "--framework",
        "dockerfile",
        "--skip-download",
        "--compact",
        "--output",
        "json",
        check=False,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(proc.stdout)
    summary = report["summary"]
    assert summary["passed"] > 0, summary
    assert summary["parsing_errors"] == 0, summary
    failed = [f"{c['check_id']}: {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert not failed, failed
    for skipped in report["results"]["skipped_checks"]:
        reason = (skipped.get("check_result") or {}).get("suppress_comment") or ""
        assert reason.strip(), f"{skipped['check_id']} is skipped without a reason"


# ---------------------------------------------------------------------------------------------- image


def test_dockerignore_keeps_the_context_small(podman: str, base_image: str, tmp_path: Path) -> None:
    """The build context holds what the Dockerfile copies, and no tests, chart, k8s, caches or secrets."""
    (tmp_path / "Containerfile").write_text(f"FROM {base_image}\nCOPY . /context\n")
    tag = f"localhost/catalog-test-context:{uuid.uuid4().hex[:8]}"
    run(
        podman,
        "build",
        *HOST_ULIMITS,
        "--network=none",
        "--pull=never",
        "-q",
        "-t",
        tag,
        "-f",
        str(tmp_path / "Containerfile"),
        str(ROOT),
    )
    try:
        listing = run(
            podman, "run", *HOST_ULIMITS, "--rm", "--network=none", tag, "find", "/context", "-mindepth", "1"
        ).stdout
    finally:
        subprocess.run([podman, "rmi", "--force", tag], check=False, capture_output=True)
    paths = {line.removeprefix("/context/") for line in listing.split()}
    top = {path.split("/", 1)[0] for path in paths}
    assert top <= {"pyproject.toml", "README.md", "requirements", "src", "gunicorn.conf.py", "docker"}, top
    assert "requirements/main.txt" in paths
    assert "docker/entrypoint.sh" in paths
    leaked = [
        p
        for p in paths
        if "__pycache__" in p or p.endswith((".pyc", ".env", ".pem", ".key")) or ".egg-info" in p
    ]
    assert not leaked, leaked


def test_image_metadata_and_contents(
    podman: str, base_image: str, image: str, project_version: str, revision: str
) -> None:
    """Labels, user, port, workdir, env; no pip/uv/setuptools/build tools; bytecode compiled."""
    base_env = json.loads(run(podman, "image", "inspect", base_image).stdout)[0]["Config"].get("Env") or []
    info = json.loads(run(podman, "image", "inspect", image).stdout)[0]
    config = info["Config"]
    labels = config.get("Labels") or {}
    assert labels.get("org.opencontainers.image.version") == project_version
    assert labels.get("org.opencontainers.image.revision") == revision
    assert labels.get("org.opencontainers.image.source") == TEST_SOURCE
    assert config.get("User") == f"{UID}:{UID}"
    assert "8080/tcp" in (config.get("ExposedPorts") or {})
    assert config.get("WorkingDir") == "/app"
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    assert env.get("PROMETHEUS_MULTIPROC_DIR") == "/tmp/metrics"
    assert env.get("CATALOG_DATABASE_URL") == "sqlite:////tmp/catalog.db"
    assert env.get("CATALOG_COMMIT") == revision
    added = {k for k in env if not any(item.startswith(k + "=") for item in base_env)}
    assert not {k for k in added if k.startswith("PIP_")}, env  # build-stage settings stay there
    size_mb = int(info["Size"]) / 1e6
    print(f"\nimage {image}: {size_mb:.0f} MB")

    script = r"""
set -eu
test -f /app/gunicorn.conf.py
test -x /opt/venv/bin/gunicorn && test -x /opt/venv/bin/catalog
for tool in pip pip3 uv gcc cc make; do
  if command -v "$tool" >/dev/null 2>&1; then echo "build tool present: $tool"; exit 1; fi
done
python3 - <<'EOF'
import importlib.util, pathlib, sys
for mod in ("pip", "setuptools", "wheel", "uv"):
    if importlib.util.find_spec(mod) is not None:
        sys.exit(f"module present: {mod}")
import catalog  # noqa: F401  importable from the venv
src = pathlib.Path(catalog.__file__).parent
missing = [str(p) for p in src.rglob("*.py") if not list((p.parent / "__pycache__").glob(p.stem + ".*.pyc"))]
if missing:
    sys.exit(f"not byte-compiled: {missing[:5]}")
EOF
# Nothing of the build stage: no tools venv, sources, wheels or caches (the base's own files aside).
for path in /opt/build-tools /src /tmp/wheels /root/.cache; do
  if [ -e "$path" ]; then echo "left from the build: $path"; exit 1; fi
done
if find /opt /app /root /home -xdev \( -name '.cache' -o -name '*.whl' -o -name '*.egg-info' \) \
     -print 2>/dev/null | grep . ; then
  echo "caches or wheels left in the image"; exit 1
fi
touch /opt/x 2>/dev/null && { echo "root filesystem writable"; exit 1; }
touch /tmp/x
id -u
"""
    proc = run(
        podman,
        "run",
        *HOST_ULIMITS,
        "--rm",
        "--network=none",
        "--read-only",
        "--read-only-tmpfs=false",
        "--tmpfs=/tmp:rw,mode=1777",
        "--pull=never",
        image,
        "/bin/sh",
        "-c",
        script,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split()[-1] == UID


def test_init_container_then_default_command(
    podman: str, image: str, start_container: Any, api_keys_dir: Path
) -> None:
    """`catalog db upgrade` runs as the image's command on a fresh read-only container (the init
    container's job); the default command serves with gunicorn as PID 1."""
    proc = run(
        podman,
        "run",
        *HOST_ULIMITS,
        "--rm",
        "--network=none",
        "--read-only",
        "--read-only-tmpfs=false",
        "--tmpfs=/tmp:rw,nosuid,nodev,noexec,mode=1777",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--pull=never",
        image,
        "catalog",
        "db",
        "upgrade",
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    ctr: Container = start_container()
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(ctr.base + "/livez", timeout=2).status_code == 200:
                break
        out, err = ctr.logs()
        assert time.monotonic() < deadline, f"/livez never answered\n{out[-3000:]}\n{err[-3000:]}"
        time.sleep(0.25)
    top = run(podman, "top", ctr.name, "pid", "args").stdout.splitlines()[1:]
    pid1 = [line.split(None, 1) for line in top if line.split(None, 1)[:1] == ["1"]]
    assert pid1, top
    assert "gunicorn" in pid1[0][1], top


def _product(sku: str) -> dict[str, Any]:
    return {
        "sku": sku,
        "name": "Image test widget",
        "price_cents": 1250,
        "currency": "EUR",
        "tags": ["image"],
    }


def test_serves_read_only_as_10001_with_redis(
    start_container: Any, project_version: str, revision: str
) -> None:
    ctr: Container = start_container(*SERVER_COMMAND)
    ctr.wait_ready()
    # The image's HEALTHCHECK (for plain docker/podman runs) passes.
    run(ctr.podman, "healthcheck", "run", ctr.name, timeout=30)

    ready = requests.get(ctr.base + "/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ok", ready.text  # Redis reachable: not "degraded"

    version = requests.get(ctr.base + "/version", timeout=5)
    assert version.status_code == 200, version.text
    assert version.json() == {"version": project_version, "commit": revision}

    headers = {"X-Api-Key": API_KEY}
    created = requests.post(
        ctr.base + "/api/v1/products",
        json=_product(f"IMG-{uuid.uuid4().hex[:8].upper()}"),
        headers=headers,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    url = ctr.base + "/api/v1/products/" + created.json()["id"]
    first = requests.get(url, headers=headers, timeout=10)
    second = requests.get(url, headers=headers, timeout=10)
    assert (first.status_code, second.status_code) == (200, 200), first.text + second.text
    assert (first.headers.get("X-Cache"), second.headers.get("X-Cache")) == ("MISS", "HIT")
    assert requests.get(url, timeout=10).status_code == 401  # no key, no product
    # The workers' metric files live in PROMETHEUS_MULTIPROC_DIR on /tmp; /metrics merges them.
    scraped = requests.get(ctr.base + "/metrics", timeout=10)
    assert scraped.status_code == 200, scraped.text[:500]
    assert "catalog_cache_requests_total" in scraped.text, scraped.text[:2000]

    # Every process in the container runs as 10001; PID 1 is gunicorn itself (exec form, no shell left).
    top = run(ctr.podman, "top", ctr.name, "pid", "huser", "args").stdout.splitlines()[1:]
    procs = [line.split(None, 2) for line in top if line.strip()]
    assert procs, top
    assert all(p[1] == UID for p in procs), top
    pid1 = [p for p in procs if p[0] == "1"]
    assert pid1, top
    assert "gunicorn" in pid1[0][2], top
    host_pid = ctr.state()["Pid"]
    status = Path(f"/proc/{host_pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [UID] * 4, uid_line

    # stdout: one JSON object per line (gunicorn's and the app's), with an access line for our GETs.
    time.sleep(0.5)
    out, err = ctr.logs()
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"nothing on stdout; stderr:\n{err[-3000:]}"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line on stdout: {line!r}")
    for record in records:
        assert {"timestamp", "level", "logger", "message"} <= record.keys(), record
    assert any(
        r.get("method") == "GET"
        and r.get("status") == 200
        and str(r.get("path", "")).startswith("/api/v1/products/")
        for r in records
    ), records[-10:]
    assert API_KEY not in out + err
    stray = [line for line in err.splitlines() if line.strip() and not line.lstrip().startswith("{")]
    assert not stray, f"non-JSON lines on stderr: {stray[:10]}"


def test_sigterm_drains_in_flight_request(start_container: Any) -> None:
    """SIGTERM mid-request: gunicorn stops accepting, the in-flight request completes, exit code 0."""
    ctr: Container = start_container(*SERVER_COMMAND)
    ctr.wait_ready()

    body = json.dumps(_product(f"DRAIN-{uuid.uuid4().hex[:8].upper()}")).encode()
    conn = http.client.HTTPConnection("127.0.0.1", ctr.port, timeout=60)
    conn.putrequest("POST", "/api/v1/products")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.putheader("X-Api-Key", API_KEY)
    conn.endheaders()
    conn.send(body[:10])  # the request is now in a worker thread, blocked reading the body
    time.sleep(0.5)

    stopped: dict[str, Any] = {}

    def stop() -> None:
        started = time.monotonic()
        proc = subprocess.run(
            [ctr.podman, "stop", "--time", str(GRACE_SECONDS), ctr.name],
            capture_output=True,
            text=True,
            timeout=GRACE_SECONDS + 30,
            check=False,
        )
        stopped.update(rc=proc.returncode, seconds=time.monotonic() - started, stderr=proc.stderr)

    stopper = threading.Thread(target=stop)
    stopper.start()
    try:
        # Wait until gunicorn has the signal, then finish the body slowly (~1.5 s).
        deadline = time.monotonic() + 15
        while "Handling signal" not in "".join(ctr.logs()):
            assert time.monotonic() < deadline, "gunicorn never logged the SIGTERM"
            time.sleep(0.1)
        rest = body[10:]
        step = max(1, len(rest) // 10)
        for i in range(0, len(rest), step):
            conn.send(rest[i : i + step])
            time.sleep(0.15)
        response = conn.getresponse()
        payload = response.read()
    finally:
        conn.close()  # a kept-alive connection would hold the worker for gunicorn's linger time
        stopper.join(timeout=GRACE_SECONDS + 40)

    assert response.status == 201, payload[:1000]
    assert json.loads(payload)["sku"].startswith("DRAIN-")
    assert stopped.get("rc") == 0, stopped
    state = ctr.state()
    out, err = ctr.logs()
    assert state["Status"] == "exited", f"{state}\n{out[-3000:]}\n{err[-3000:]}"
    assert state["ExitCode"] == 0, f"{state}\n{out[-3000:]}\n{err[-3000:]}"
    assert not state.get("OOMKilled")
    assert stopped["seconds"] < GRACE_SECONDS - 5, f"took {stopped['seconds']:.1f} s: not a clean drain"
    print(f"\ncontainer drained and exited 0 in {stopped['seconds']:.1f} s after SIGTERM")


def test_podman_names_a_short_tag_localhost_which_the_archive_for_kind_keeps(
    podman: str, image: str, tmp_path: Path
) -> None:
    """Why the README has podman users load an archive and install with image.repository=localhost/catalog:
    `podman build -t catalog:<tag>` names the image localhost/catalog:<tag>, and that is the name a node gets
    from `kind load image-archive` (the archive's RepoTags)."""
    short = "catalog-readme-check:0.1.0"
    run(podman, "tag", image, short)
    try:
        tags = json.loads(run(podman, "image", "inspect", short).stdout)[0]["RepoTags"]
        assert f"localhost/{short}" in tags, tags
        archive = tmp_path / "catalog.tar"
        saved = ("save", "--format", "docker-archive", "-o", str(archive), f"localhost/{short}")
        run(podman, *saved, timeout=300)
        with tarfile.open(archive) as tar:
            manifest_file = tar.extractfile("manifest.json")
            assert manifest_file is not None
            manifest = json.loads(manifest_file.read())
        assert manifest[0]["RepoTags"] == [f"localhost/{short}"]
    finally:
        run(podman, "rmi", f"localhost/{short}", check=False)
