"""API keys with the real server: a kubelet-style rotation reaches both gunicorn workers within 10 s while
a request loop sees no failure, nothing the server writes holds a key, and `catalog dev-keys` makes a key
that the curl line it prints uses successfully."""

import hashlib
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import READER_KEY, WRITER_KEY, SecretDir, free_port
from tests.tools import require_tool

pytestmark = pytest.mark.slow

PRODUCTS = "/api/v1/products"
KEY_HEADER = "X-Catalog-Key"
WORKERS = 2
ROTATION_BOUND_SECONDS = 10.0  # the contract's bound: in effect in every worker within 10 s
CONSECUTIVE_CONFIRMATIONS = 20


def new_key() -> str:
    """A random key nobody else uses."""
    return secrets.token_urlsafe(24)


def sha256_hex(key: str) -> str:
    """What `printf %s "$KEY" | sha256sum` prints."""
    return hashlib.sha256(key.encode()).hexdigest()


def status_with(url: str, key: str) -> int:
    """One GET of the product list over a new connection (so gunicorn may hand it to any worker)."""
    return requests.get(f"{url}{PRODUCTS}?limit=1", headers={KEY_HEADER: key}, timeout=10).status_code


def keys_loaded(url: str) -> float:
    """catalog_api_keys_loaded: the most any live worker has loaded (multiprocess mode livemax)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "catalog_api_keys_loaded":
                return float(sample.value)
    raise AssertionError("catalog_api_keys_loaded is missing from /metrics")


def worker_pids(server: Any) -> set[int]:
    """The pids of the workers gunicorn booted (from its own log lines)."""
    prefix = "Booting worker with pid: "
    return {
        int(line["message"].removeprefix(prefix))
        for line in server.log_lines()
        if line["message"].startswith(prefix)
    }


def clients_by_worker(server: Any) -> dict[int, set[str]]:
    """The clients each worker loaded last, from its 'api keys loaded' lines."""
    latest: dict[int, set[str]] = {}
    for line in server.log_lines():
        if line["message"] == "api keys loaded":
            latest[line["pid"]] = set(line["clients"])
    return latest


class Traffic:
    """Threads sending GETs with keys present on both sides of a rotation, each over a new connection."""

    def __init__(self, url: str, keys: Iterable[str], threads: int = 4) -> None:
        self.url = url
        self.keys = list(keys)
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.stamps: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            turn += 1
            try:
                status = status_with(self.url, self.keys[turn % len(self.keys)])
            except requests.RequestException as error:
                with self._lock:
                    self.errors.append(type(error).__name__)
                continue
            with self._lock:
                self.statuses[status] += 1
                self.stamps.append(time.monotonic())

    def requests_between(self, start: float, end: float) -> int:
        """How many answers arrived in [start, end]."""
        with self._lock:
            return sum(1 for stamp in self.stamps if start <= stamp <= end)

    def stop(self) -> None:
        """Stop and wait for the threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def seen_by_every_worker(
    server: Any,
    pids: set[int],
    clients: set[str],
    accepted: list[str],
    rejected: list[str],
    deadline: float,
) -> float:
    """Seconds from now until every worker has loaded exactly `clients` (its own log line says so, and the
    livemax gauge agrees) and CONSECUTIVE_CONFIRMATIONS rounds of new connections find every `accepted`
    key answered 200 and every `rejected` one 401."""
    started = time.monotonic()
    confirmed = 0
    while True:
        assert time.monotonic() - started < deadline, (
            f"not seen by every worker within {deadline} s: {clients_by_worker(server)}"
        )
        answers = [status_with(server.url, key) for key in accepted] + [
            status_with(server.url, key) for key in rejected
        ]
        confirmed = confirmed + 1 if answers == [200] * len(accepted) + [401] * len(rejected) else 0
        if (
            confirmed >= CONSECUTIVE_CONFIRMATIONS
            and all(clients_by_worker(server).get(pid) == clients for pid in pids)
            and keys_loaded(server.url) == len(clients)
        ):
            return time.monotonic() - started


@pytest.fixture
def serve(gunicorn: Callable[..., Any], keys_dir: SecretDir, sqlite_url: str) -> Callable[[], Any]:
    """Start gunicorn with 2 workers on the keys directory, keys in X-Catalog-Key, no limit in the way."""

    def start() -> Any:
        server = gunicorn(
            {
                "WEB_CONCURRENCY": str(WORKERS),
                "CATALOG_THREADS": "4",
                "CATALOG_DATABASE_URL": sqlite_url,
                "CATALOG_API_KEYS_DIR": str(keys_dir.path),
                "CATALOG_API_KEY_HEADER": KEY_HEADER,
                "CATALOG_RATE_LIMIT": "100000/second",
                "CATALOG_AUTH_FAILURE_LIMIT": "100000/minute",
            }
        )
        deadline = time.monotonic() + 30
        while len(worker_pids(server)) < WORKERS or len(clients_by_worker(server)) < WORKERS:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        return server

    return start


def test_rotation_reaches_both_workers_within_10_s_and_no_request_fails(
    keys_dir: SecretDir, serve: Callable[[], Any]
) -> None:
    old, new, spare, broken = new_key(), new_key(), new_key(), new_key()
    reader = json.dumps({"key": READER_KEY, "scopes": ["read"]})
    unparsable = json.dumps({"key": broken, "scopes": "read"})
    # 4 valid keys at first, 5 while old and new overlap, 3 at the end: the livemax gauge reads 3 only
    # once every live worker has loaded the final Secret.
    keys_dir.write({"writer": WRITER_KEY, "reader": reader, "old": old, "spare": spare, "broken": unparsable})
    server = serve()
    pids = worker_pids(server)
    assert len(pids) == WORKERS
    assert keys_loaded(server.url) == 4
    traffic = Traffic(server.url, [WRITER_KEY, READER_KEY], threads=2)
    try:
        # Add the new key next to the old one: both work everywhere.
        added_at = time.monotonic()
        keys_dir.write(
            {
                "writer": WRITER_KEY,
                "reader": reader,
                "old": old,
                "spare": spare,
                "new": new,
                "broken": unparsable,
            }
        )
        add_took = seen_by_every_worker(
            server,
            pids,
            {"writer", "reader", "old", "spare", "new"},
            accepted=[old, new],
            rejected=[],
            deadline=ROTATION_BOUND_SECONDS,
        )
        # Remove the old key (and the spare): the new one works, the old one is refused, everywhere.
        removed_at = time.monotonic()
        keys_dir.write({"writer": WRITER_KEY, "reader": reader, "new": new, "broken": unparsable})
        remove_took = seen_by_every_worker(
            server,
            pids,
            {"writer", "reader", "new"},
            accepted=[new],
            rejected=[old, spare],
            deadline=ROTATION_BOUND_SECONDS,
        )
        finished_at = time.monotonic()
    finally:
        traffic.stop()
    print(f"rotation seen by every worker: add {add_took:.2f} s, remove {remove_took:.2f} s")
    print(f"request loop: {dict(traffic.statuses)}, errors {traffic.errors}")
    assert add_took < ROTATION_BOUND_SECONDS and remove_took < ROTATION_BOUND_SECONDS
    # The loop ran through both swaps, and every request of it was answered 200.
    assert traffic.requests_between(added_at, removed_at) >= 10
    assert traffic.requests_between(removed_at, finished_at) >= 10
    assert traffic.errors == []
    assert set(traffic.statuses) == {200}
    # No worker was restarted on the way (so both pids were the ones that had to re-read).
    assert worker_pids(server) == pids
    # The unparsable file: one warning per worker, however many polls happened since.
    warnings = [line for line in server.log_lines() if line["message"] == "api key file skipped"]
    assert sorted(line["file"] for line in warnings) == ["broken"] * WORKERS

    # Nothing the server wrote or answered holds key material.
    answers = [
        requests.get(f"{server.url}{PRODUCTS}", headers={KEY_HEADER: old}, timeout=10),
        requests.get(f"{server.url}{PRODUCTS}", headers={"Authorization": f"Bearer {broken}"}, timeout=10),
        requests.post(f"{server.url}{PRODUCTS}", json={}, headers={KEY_HEADER: READER_KEY}, timeout=10),
        requests.get(f"{server.url}{PRODUCTS}/nope", headers={KEY_HEADER: new}, timeout=10),
        requests.get(f"{server.url}/metrics", timeout=10),
    ]
    assert [a.status_code for a in answers] == [401, 401, 403, 404, 200]
    exposed = "\n".join(
        [server.output()]
        + [a.text for a in answers]
        + [f"{name}: {value}" for a in answers for name, value in a.headers.items()]
    )
    for key in (old, new, spare, broken, WRITER_KEY, READER_KEY):
        assert key not in exposed
        assert sha256_hex(key) not in exposed


def test_dev_keys_makes_one_key_and_prints_a_curl_line_that_works(
    tmp_path: Path, gunicorn: Callable[..., Any], sqlite_url: str
) -> None:
    curl = require_tool("curl")
    catalog = Path(sys.executable).with_name("catalog")
    assert catalog.exists(), "the catalog console script is not installed next to this Python"
    port = free_port()
    # As `make run` does: a relative directory under the working directory.
    env = {"PATH": os.environ["PATH"], "PORT": str(port), "CATALOG_API_KEYS_DIR": "var/api-keys"}
    (tmp_path / "var").mkdir()

    def dev_keys() -> str:
        result = subprocess.run(
            [str(catalog), "dev-keys"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    first_output = dev_keys()
    key_file = tmp_path / "var" / "api-keys" / "dev"
    key = key_file.read_text().strip()
    assert len(key) >= 16
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert str(key_file) in first_output
    assert key not in first_output
    # Kept between runs.
    assert dev_keys() == first_output
    assert key_file.read_text().strip() == key

    [curl_line] = [line.split(": ", 1)[1] for line in first_output.splitlines() if line.startswith("Try: ")]
    assert curl_line.startswith("curl ")
    server = gunicorn(
        {
            "WEB_CONCURRENCY": "1",
            "PORT": str(port),
            "CATALOG_DATABASE_URL": sqlite_url,
            "CATALOG_API_KEYS_DIR": "var/api-keys",
        }
    )
    shell = require_tool("sh")
    result = subprocess.run(
        [shell, "-c", curl_line],
        cwd=tmp_path,
        env={"PATH": f"{Path(curl).parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "items" in json.loads(result.stdout)
    access = [
        line
        for line in server.log_lines()
        if line["logger"] == "catalog.access" and line["path"].startswith("/api/")
    ]
    assert [(line["status"], line["client"]) for line in access] == [(200, "dev")]
    assert key not in server.output()
