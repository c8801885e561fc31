"""/docs in a real headless Chromium, served by `make run`: the operations render, "Try it out" answers with
the API key, the Content-Security-Policy holds without a violation, and no request leaves 127.0.0.1.

Kept in test-artifacts/ (git-ignored) for a person to look at: docs.html (the DOM as rendered), docs.png
(the page) and docs-try-it-out.png (an answer to "Try it out")."""

import html
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from tests.conftest import ROOT, free_port, poll
from tests.devtools import Browser
from tests.tools import require_tool

ARTIFACTS = ROOT / "test-artifacts"


class MakeRun:
    """`make run` itself (its recipe, not a copy), on a free port with its files in a temporary directory;
    `-o install` because the test environment is installed already (a sync would drop the test tools)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys_dir = directory / "api-keys"
        env = {
            **os.environ,
            "CATALOG_DATABASE_URL": f"sqlite:///{directory / 'catalog.db'}",
            "CATALOG_API_KEYS_DIR": str(self.keys_dir),
            "PROMETHEUS_MULTIPROC_DIR": str(directory / "metrics"),
        }
        self.log = (directory / "make-run.log").open("wb")
        self.process = subprocess.Popen(
            [require_tool("make"), "-o", "install", "run", f"PORT={self.port}"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        poll(self.ready, 90, f"make run did not serve /livez:\n{self.output()}")

    def ready(self) -> bool:
        assert self.process.poll() is None, self.output()
        try:
            return requests.get(f"{self.url}/livez", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def api_key(self) -> str:
        """The key `catalog dev-keys` made for the client `dev`."""
        return (self.keys_dir / "dev").read_text().strip()

    def stop(self) -> None:
        """SIGTERM to make and gunicorn (their own process group), as Ctrl-C would stop them."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[MakeRun]:
    server = MakeRun(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chromium = Browser(require_tool("chromium"), tmp_path / "chromium-profile")
    yield chromium
    chromium.close()


def rendered_operations(dom: str) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation block Swagger UI rendered into the DOM."""
    blocks = re.findall(r'class="opblock-summary-method">(\w+)<.*?data-path="([^"]+)"', dom, re.S)
    return {(method, html.unescape(path)) for method, path in blocks}


def test_docs_renders_every_operation_and_try_it_out_works_offline(
    make_run: MakeRun, browser: Browser
) -> None:
    spec = requests.get(f"{make_run.url}/openapi.json", timeout=10).json()
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert len(documented) >= 6

    browser.navigate(f"{make_run.url}/docs")
    browser.wait_for(f"document.querySelectorAll('.opblock').length >= {len(documented)}")
    ARTIFACTS.mkdir(exist_ok=True)
    dom = browser.dom()
    (ARTIFACTS / "docs.html").write_text(dom)
    assert rendered_operations(dom) == documented
    browser.screenshot(ARTIFACTS / "docs.png")
    assert "catalog" in dom and 'class="btn authorize' in dom

    # Authorize with the dev key, then try the list operation, as a person would.
    browser.click(".btn.authorize")
    browser.type_into(".auth-container input[type=text]", make_run.api_key())
    browser.click(".auth-container .modal-btn.authorize")
    browser.click(".btn-done")
    operation = spec["paths"]["/api/v1/products"]["get"]["operationId"]
    browser.click(f"#operations-products-{operation} .opblock-summary-control")
    browser.click(".try-out__btn")
    browser.click(".btn.execute")
    status = browser.wait_for(
        "document.querySelector('.live-responses-table tbody .response-col_status')?.textContent.trim()"
    )
    assert status == "200", browser.dom()
    body = json.loads(
        browser.evaluate("document.querySelector('.live-responses-table tbody .microlight').textContent")
    )
    assert body["items"], "make run seeds the database"
    browser.evaluate("document.querySelector('.live-responses-table').scrollIntoView()")
    browser.screenshot(ARTIFACTS / "docs-try-it-out.png")

    origin = f"{make_run.url}/"
    assert browser.requests and all(
        url.startswith(origin) or url.startswith("data:") for url in browser.requests
    ), browser.requests
    assert f"{origin}api/v1/products?limit=20" in browser.requests
    assert browser.errors == [], "console errors or Content-Security-Policy violations"
