"""Redis failing in every way it does in production (killed, paused, restarted empty, wrong password, full,
over TLS) while the service keeps answering correctly, fast, and returns to HITs on its own."""

import dataclasses
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from tests.conftest import RedisServer, SecretDir, ThreadLoop, auth, close_app, free_port, product_body
from tests.test_cache import create_product, metric, server_env
from tests.tools import require_tool

from catalog.config import Settings


def get(url: str, timeout: float = 5) -> requests.Response:
    """One GET on a fresh connection, so the two workers share the requests."""
    return requests.get(url, headers={**auth(), "Connection": "close"}, timeout=timeout)


def poll(check: Callable[[], bool], seconds: float, step: float = 0.05) -> float:
    """Call `check` until it is true; the seconds that took (fails after `seconds`)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(step)
    return time.monotonic() - start


def mkdir(path: Path) -> Path:
    """`path`, created."""
    path.mkdir()
    return path


def gauge(base_url: str, name: str) -> float:
    """A metric's value as /metrics shows it (all workers merged)."""
    return metric(requests.get(f"{base_url}/metrics", timeout=5).text, name)


def cache_results(base_url: str) -> dict[str, float]:
    """catalog_cache_requests_total by result (all workers merged)."""
    text = requests.get(f"{base_url}/metrics", timeout=5).text
    return {
        result: metric(text, "catalog_cache_requests_total", result=result)
        for result in ("hit", "miss", "bypass", "error")
    }


class ReadLoop(ThreadLoop):
    """Threads that GET some paths over and over on fresh connections and keep every answer."""

    def __init__(self, urls: list[str], threads: int = 4) -> None:
        super().__init__(threads)
        self.urls = urls
        self.answers: list[tuple[str, int, str, float, bytes]] = []  # url, status, X-Cache, seconds, body

    def _run(self, offset: int) -> None:
        index = offset
        while not self._stop.is_set():
            url = self.urls[index % len(self.urls)]
            index += 1
            started = time.monotonic()
            try:
                answer = get(url)
                self.answers.append(
                    (
                        url,
                        answer.status_code,
                        answer.headers.get("X-Cache", ""),
                        answer.elapsed.total_seconds(),
                        answer.content,
                    )
                )
            except requests.RequestException as error:
                self.answers.append((url, 0, type(error).__name__, time.monotonic() - started, b""))


@pytest.fixture
def products_server(gunicorn: Any, database_url: str, keys_dir: SecretDir, redis_server: RedisServer) -> Any:
    """Real gunicorn (2 workers x 4 threads) on the test's own Redis."""
    return gunicorn(server_env(database_url, keys_dir, CATALOG_REDIS_URL=redis_server.url))


def test_redis_killed_during_reads_then_restarted_empty(
    products_server: Any, redis_server: RedisServer
) -> None:
    """No non-2xx while Redis dies under load; /readyz stays 200 'degraded' and the circuit gauge is 1; after
    a restart (empty) HITs come back without restarting the service and the gauge returns to 0."""
    base = products_server.url
    products = [create_product(base) for _ in range(3)]
    urls = [f"{base}/api/v1/products/{product['id']}" for product in products] + [f"{base}/api/v1/products"]
    expected = {url: get(url).content for url in urls}
    poll(lambda: all(get(url).headers["X-Cache"] == "HIT" for url in urls), 5)

    with ReadLoop(urls) as loop:
        time.sleep(1)
        redis_server.kill()
        poll(lambda: gauge(base, "catalog_cache_circuit_open") == 1, 10)
        ready = requests.get(f"{base}/readyz", timeout=5)
        assert (ready.status_code, ready.json()["status"], ready.json()["checks"]["cache"]) == (
            200,
            "degraded",
            "degraded",
        )
        time.sleep(1)
    assert loop.answers
    assert [answer[:3] for answer in loop.answers if answer[1] != 200] == []
    assert all(body == expected[url] for url, _, _, _, body in loop.answers), "a wrong body"
    assert {"HIT", "BYPASS"} <= {cache for _, _, cache, _, _ in loop.answers}

    redis_server.start()
    recovered = poll(lambda: all(get(url).headers["X-Cache"] == "HIT" for url in urls), 10, step=0.2)
    assert all(get(url).content == expected[url] for url in urls)
    ready = requests.get(f"{base}/readyz", timeout=5).json()
    assert (ready["status"], ready["checks"]["cache"]) == ("ok", "ok")
    poll(lambda: get(urls[0]).status_code == 200 and gauge(base, "catalog_cache_circuit_open") == 0, 10)
    print(f"HITs back {recovered:.1f} s after the restart")


def latencies(urls: list[str], count: int) -> list[tuple[float, str, bytes]]:
    """`count` sequential GETs over `urls`: (seconds, X-Cache, body) each."""
    results = []
    for index in range(count):
        started = time.monotonic()
        answer = get(urls[index % len(urls)])
        assert answer.status_code == 200, answer.text
        results.append((time.monotonic() - started, answer.headers["X-Cache"], answer.content))
    return results


def test_redis_paused_costs_under_a_second_then_the_database_path_then_hits_again(
    gunicorn: Any, database_url: str, keys_dir: SecretDir, redis_server: RedisServer, products_server: Any
) -> None:
    """SIGSTOP: every request answers within 1 s; once the circuit is open, latency is that of the database
    path (a server with the cache off is the baseline); SIGCONT: HITs within 10 s, no restart."""
    base = products_server.url
    products = [create_product(base) for _ in range(4)]
    urls = [f"{base}/api/v1/products/{product['id']}" for product in products]
    expected = {url: get(url).content for url in urls}
    uncached = gunicorn(server_env(database_url, keys_dir, CATALOG_CACHE_TTL_SECONDS="0"))
    baseline = latencies([url.replace(base, uncached.url) for url in urls], 40)
    assert {cache for _, cache, _ in baseline} == {"BYPASS"}
    uncached.stop()
    hits = latencies(urls, 40)
    assert {cache for _, cache, _ in hits} == {"HIT"}

    redis_server.pause()
    with ReadLoop(urls) as loop:
        poll(lambda: gauge(base, "catalog_cache_circuit_open") == 1, 10)
        # Each worker opens its own circuit: wait until a run of answers is all BYPASS.
        poll(lambda: len(loop.answers) > 20 and {a[2] for a in loop.answers[-20:]} == {"BYPASS"}, 10)
        ready = requests.get(f"{base}/readyz", timeout=5)
        assert (ready.status_code, ready.json()["checks"]["cache"]) == (200, "degraded")
        assert ready.elapsed.total_seconds() < 1.0
    slowest = max(seconds for _, _, _, seconds, _ in loop.answers)
    assert [answer[:4] for answer in loop.answers if answer[1] != 200 or answer[3] >= 1.0] == []
    assert all(body == expected[url] for url, _, _, _, body in loop.answers)
    counted_before = cache_results(base)
    open_circuit = latencies(urls, 40)
    counted = {result: count - counted_before[result] for result, count in cache_results(base).items()}
    assert all(body == expected[url] for url, (_, _, body) in zip(urls * 10, open_circuit, strict=True))
    open_median = statistics.median(seconds for seconds, _, _ in open_circuit)
    baseline_median = statistics.median(seconds for seconds, _, _ in baseline)
    assert max(seconds for seconds, _, _ in open_circuit) < 1.0
    assert open_median <= max(3 * baseline_median, baseline_median + 0.05), (open_median, baseline_median)
    assert sum(cache == "BYPASS" for _, cache, _ in open_circuit) >= 36
    # A read the open circuit kept from Redis counts as `bypass`; only a failed half-open probe as `error`.
    assert counted["hit"] + counted["miss"] + counted["bypass"] + counted["error"] == 40, counted
    assert counted["bypass"] >= 36, counted

    redis_server.resume()
    recovered = poll(lambda: all(get(url).headers["X-Cache"] == "HIT" for url in urls), 10, step=0.2)
    poll(lambda: get(urls[0]).status_code == 200 and gauge(base, "catalog_cache_circuit_open") == 0, 10)
    hits_median = statistics.median(seconds for seconds, _, _ in hits)
    print(
        f"median ms: uncached {baseline_median * 1000:.1f}, cached {hits_median * 1000:.1f}, paused with the "
        f"circuit open {open_median * 1000:.1f}; slowest while opening {slowest * 1000:.0f} ms of "
        f"{len(loop.answers)} answers; HITs back {recovered:.1f} s after SIGCONT"
    )


def test_a_write_while_redis_is_paused_is_never_read_old_from_any_worker(
    gunicorn: Any, database_url: str, keys_dir: SecretDir, redis_server: RedisServer
) -> None:
    """The write's invalidation cannot reach Redis, so Redis keeps the old entry until the outbox sweeper
    delivers it; meanwhile no worker of the pod trusts Redis (also not the one that did not take the write):
    every read sees the new version; once it is delivered, HITs return within seconds, not a TTL."""
    server = gunicorn(
        server_env(database_url, keys_dir, CATALOG_REDIS_URL=redis_server.url, CATALOG_CACHE_TTL_SECONDS="60")
    )
    product = create_product(server.url)
    url = f"{server.url}/api/v1/products/{product['id']}"
    poll(lambda: get(url).headers["X-Cache"] == "HIT", 5)

    redis_server.pause()
    body = product_body(sku=product["sku"], name="written while Redis was paused")
    answer = requests.put(url, json=body, headers=auth(), timeout=5)
    assert (answer.status_code, answer.json()["version"]) == (200, 2)
    assert answer.elapsed.total_seconds() < 1.0
    redis_server.resume()
    resumed = time.monotonic()

    seen = []  # (seconds after the resume, version, X-Cache)
    while not seen or seen[-1][2] != "HIT":
        assert time.monotonic() - resumed < 5, "no HIT within 5 s of the resume"
        reply = get(url)
        seen.append((time.monotonic() - resumed, reply.json()["version"], reply.headers["X-Cache"]))
    assert {version for _, version, _ in seen} == {2}, seen
    assert get(url).json()["version"] == 2
    print(f"HITs back {seen[-1][0]:.2f} s after Redis resumed (the cache TTL is 60 s), {len(seen)} reads")


def test_wrong_or_missing_password_file_bypasses_and_a_fixed_file_needs_no_restart(
    settings: Settings, tmp_path: Path, make_client: Callable[[Settings], Any]
) -> None:
    """A Redis with a password; the password file missing, then wrong: BYPASS with correct answers and
    /readyz 'degraded'; the file fixed: HITs resume (the file is read again for each new connection)."""
    server = RedisServer(mkdir(tmp_path / "redis"), password="the-right-password-42")
    try:
        password_file = tmp_path / "redis-password"
        client = make_client(
            dataclasses.replace(settings, redis_url=server.url, redis_password_file=str(password_file))
        )
        # Written by a server without Redis: a write this app cannot invalidate in Redis would (rightly) keep
        # it off Redis until the invalidation is delivered, which is not what this test is about.
        writer = make_client(settings)
        created = writer.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
        path = f"/api/v1/products/{created['id']}"

        for content in (None, "a-wrong-password"):
            if content is not None:
                password_file.write_text(content)
            for _ in range(5):
                answer = client.get(path, headers=auth())
                assert (answer.status_code, answer.headers["X-Cache"], answer.get_json()) == (
                    200,
                    "BYPASS",
                    created,
                )
                assert client.get("/api/v1/products", headers=auth()).get_json()["items"] == [created]
            ready = client.get("/readyz")
            assert (ready.status_code, ready.get_json()["checks"]["cache"]) == (200, "degraded")

        password_file.write_text("the-right-password-42\n")
        poll(lambda: client.get(path, headers=auth()).headers["X-Cache"] == "HIT", 10, step=0.2)
        assert client.get(path, headers=auth()).get_json() == created
        assert client.get("/readyz").get_json()["checks"]["cache"] == "ok"
    finally:
        server.stop()


def test_eviction_under_maxmemory_never_gives_a_wrong_answer(
    settings: Settings, tmp_path: Path, make_client: Callable[[Settings], Any]
) -> None:
    """Redis with 2 MB and allkeys-lru evicts entries and tickets alike; every read stays correct."""
    server = RedisServer(
        mkdir(tmp_path / "redis"), extra=("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    )
    try:
        client = make_client(dataclasses.replace(settings, redis_url=server.url))
        products = {}
        for index in range(150):
            body = product_body(description=f"{index} " + "x" * 1990)
            created = client.post("/api/v1/products", json=body, headers=auth()).get_json()
            products[created["id"]] = created
        for round_number in range(3):
            for product_id, product in list(products.items()):
                answer = client.get(f"/api/v1/products/{product_id}", headers=auth())
                assert answer.get_json() == product
                if round_number == 1 and product_id[-1] in "02468ACEGJ":
                    body = product_body(
                        sku=product["sku"], name=f"round {round_number}", description="y" * 2000
                    )
                    products[product_id] = client.put(
                        f"/api/v1/products/{product_id}", json=body, headers=auth()
                    ).get_json()
            cursor = None
            listed = []
            while True:
                page = client.get(
                    f"/api/v1/products?limit=100{f'&cursor={cursor}' if cursor else ''}", headers=auth()
                )
                listed += page.get_json()["items"]
                cursor = page.get_json()["next_cursor"]
                if cursor is None:
                    break
            assert {item["id"]: item for item in listed} == products
        with server.client() as direct:
            stats = direct.info("stats")
        assert stats["evicted_keys"] > 0, "nothing was evicted: the test did not fill Redis"
        assert sum(
            client.get(f"/api/v1/products/{product_id}", headers=auth()).headers["X-Cache"] == "HIT"
            for product_id in products
        )
    finally:
        server.stop()


def test_rediss_with_a_self_signed_certificate(
    settings: Settings, tmp_path: Path, make_client: Callable[[Settings], Any]
) -> None:
    """redis-server with TLS (Debian's build has it) and a CA of the test's own: rediss:// gives HITs."""
    openssl = require_tool("openssl")
    certs = tmp_path / "tls"
    certs.mkdir()
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(certs / "key.pem"),
            "-out",
            str(certs / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    tls_port = free_port()
    server = RedisServer(
        mkdir(tmp_path / "redis"),
        extra=(
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(certs / "cert.pem"),
            "--tls-key-file",
            str(certs / "key.pem"),
            "--tls-ca-cert-file",
            str(certs / "cert.pem"),
            "--tls-auth-clients",
            "no",
        ),
    )
    client = None
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={certs / 'cert.pem'}"
        client = make_client(dataclasses.replace(settings, redis_url=url))
        created = client.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
        path = f"/api/v1/products/{created['id']}"
        assert client.get(path, headers=auth()).headers["X-Cache"] == "MISS"
        hit = client.get(path, headers=auth())
        assert (hit.headers["X-Cache"], hit.get_json()) == ("HIT", created)
        with server.client() as direct:
            assert direct.exists(f"catalog:v1:product:{created['id']}")
            clients = direct.client_list()
        assert any(
            entry.get("name") == "catalog" and entry.get("laddr", "").endswith(f":{tls_port}")
            for entry in clients
        )
    finally:
        # The app goes before its Redis: a TLS connection the server cuts under the invalidation listener is
        # sometimes left for the garbage collector to close (a ResourceWarning, about 1 run in 8).
        if client is not None:
            close_app(client.application)
        server.stop()
