"""Prometheus' own tools on the real service: `promtool check metrics` on a scrape, and a real Prometheus
server scraping gunicorn and answering queries about it."""

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from tests.conftest import READER_KEY, auth, free_port, product_body
from tests.tools import require_tool

pytestmark = pytest.mark.slow

BAD_KEY = "not-a-key-of-anyone-0123456789"


def server_env(sqlite_url: str, keys_dir: Any) -> dict[str, str]:
    """Two workers on the test database and keys, no auth-failure limit."""
    return {
        "CATALOG_DATABASE_URL": sqlite_url,
        "CATALOG_API_KEYS_DIR": str(keys_dir.path),
        "CATALOG_AUTH_FAILURE_LIMIT": "100000/minute",
        "WEB_CONCURRENCY": "2",
    }


def poll(condition: Callable[[], bool], timeout: float, what: str, details: Callable[[], str]) -> None:
    """Wait until `condition()` holds; fail naming `what` (and `details()`) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{details()}")
        time.sleep(0.2)


class Prometheus:
    """A real Prometheus server (Debian's `prometheus`) scraping one target every second."""

    def __init__(self, directory: Path, target: str) -> None:
        binary = require_tool("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: catalog\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.log_path = directory / "prometheus.log"
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        """What the server logged so far."""
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector of a PromQL query (empty while the server is not up yet)."""
        try:
            response = requests.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=5)
        except requests.ConnectionError:
            return []
        if response.status_code != 200:
            return []
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def value(self, expression: str) -> float | None:
        """The value of a query that yields one series, else None."""
        result = self.query(expression)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def stop(self) -> None:
        """Stop the server."""
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Start a Prometheus scraping `host:port`; stopped after the test."""
    servers: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        directory = tmp_path / f"prometheus-{len(servers)}"
        directory.mkdir()
        servers.append(Prometheus(directory, target))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_promtool_finds_no_problem_in_a_scrape(gunicorn: Any, sqlite_url: str, keys_dir: Any) -> None:
    """After traffic that touches every kind of metric, `promtool check metrics` accepts the scrape."""
    promtool = require_tool("promtool")
    server = gunicorn(server_env(sqlite_url, keys_dir))
    created = requests.post(f"{server.url}/api/v1/products", json=product_body(), headers=auth(), timeout=15)
    assert created.status_code == 201, created.text
    product = f"{server.url}/api/v1/products/{created.json()['id']}"
    for _ in range(3):
        assert requests.get(product, headers=auth(READER_KEY), timeout=15).status_code == 200
        assert requests.get(product, headers=auth(BAD_KEY), timeout=15).status_code == 401
        assert requests.get(f"{server.url}/{uuid.uuid4().hex}", timeout=15).status_code == 404
        assert requests.request("PURGE", product, headers=auth(), timeout=15).status_code == 405
    scrape = requests.get(f"{server.url}/metrics", timeout=15)
    assert scrape.status_code == 200
    for name in (
        "flask_http_request_total",
        "flask_http_request_duration_seconds_bucket",
        "catalog_app_info",
    ):
        assert f"\n{name}{{" in scrape.text
    for name in ("catalog_cache_requests_total", "catalog_auth_failures_total", "catalog_db_queries_total"):
        assert f"\n{name}{{" in scrape.text

    check = subprocess.run(
        [promtool, "check", "metrics"], input=scrape.text, capture_output=True, text=True, timeout=60
    )
    assert (check.returncode, check.stdout + check.stderr) == (0, "")


def test_prometheus_scrapes_the_service(
    gunicorn: Any, sqlite_url: str, keys_dir: Any, prometheus: Any
) -> None:
    """A real Prometheus scraping gunicorn every second: `up` is 1 and it sees exactly the requests sent."""
    server = gunicorn(server_env(sqlite_url, keys_dir))
    scraper = prometheus(f"127.0.0.1:{server.port}")
    up = 'up{job="catalog"}'
    poll(lambda: scraper.value(up) == 1, 25, f"{up} == 1", scraper.output)

    sent = 25
    for _ in range(sent):
        assert requests.get(f"{server.url}/version", timeout=15).status_code == 200
    answered = 'sum(flask_http_request_total{job="catalog", method="GET", status="200"})'
    poll(
        lambda: scraper.value(answered) == sent,
        25,
        f"{answered} == {sent}",
        lambda: f"last value: {scraper.value(answered)}\n{scraper.output()}",
    )
    assert scraper.value(up) == 1
    assert scraper.value('sum(catalog_app_info{job="catalog"})') == 1
