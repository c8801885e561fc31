"""Rate limits (issue 9): per client and shared by all workers in Redis, per IP for failed authentication,
headers on every /api/ answer, and in memory per worker while Redis is away."""

import dataclasses
import itertools
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import DEFAULT_KEYS, READER_KEY, RedisServer, SecretDir, auth, poll, product_body

from catalog.config import Settings
from catalog.limits import KEY_PREFIX, SYNC_SECONDS

RATE_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
OPERATIONAL_PATHS = ("/livez", "/healthz", "/readyz", "/metrics", "/version", "/openapi.json", "/docs")
WRONG_KEY = "wrong-key-0123456789abcdef"


def get(url: str, **kwargs: Any) -> requests.Response:
    """One request over a new connection (so gunicorn hands it to any worker)."""
    kwargs.setdefault("timeout", 10)
    with requests.Session() as session:
        return session.get(url, **kwargs)


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    """A problem body of this status (works for the Flask test client and requests alike)."""
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = json.loads(response.data if hasattr(response, "data") else response.content)
    assert body["status"] == status
    assert {"type", "title", "detail", "request_id"} <= body.keys()
    assert body["request_id"] == response.headers["X-Request-ID"]
    if status == 429:
        assert body["type"] == "/problems/rate-limited"
    return dict(body)


def assert_rate_headers(response: Any, limit: int) -> int:
    """RateLimit-* present and sane; the remaining quota."""
    assert response.headers["RateLimit-Limit"] == str(limit)
    remaining = int(response.headers["RateLimit-Remaining"])
    assert 0 <= remaining <= limit
    assert 0 <= int(response.headers["RateLimit-Reset"]) <= 60
    return remaining


def assert_too_many(response: Any, limit: int) -> None:
    """A 429 problem body with Retry-After and an exhausted quota."""
    assert_problem(response, 429)
    assert assert_rate_headers(response, limit) == 0
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def metric(base_url: str, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when it is absent)."""
    text = get(f"{base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def counters(redis_server: RedisServer) -> dict[str, int]:
    """Every rate-limit counter in Redis."""
    client = redis_server.client()
    return {key.decode(): int(client.get(key) or 0) for key in client.scan_iter(f"{KEY_PREFIX}*")}


def settled_count(redis_server: RedisServer, key: str) -> int:
    """A counter once the workers' batches have reached Redis (unchanged over a few sync intervals)."""
    last = counters(redis_server).get(key, 0)
    for _ in range(50):
        time.sleep(3 * SYNC_SECONDS)
        now = counters(redis_server).get(key, 0)
        if now == last:
            return now
        last = now
    raise AssertionError(f"{key} kept changing")


@pytest.fixture
def serve(gunicorn: Any, sqlite_url: str, keys_dir: SecretDir, redis_server: RedisServer) -> Any:
    """Start gunicorn (2 workers) on the test Redis with extra environment."""

    def start(**env: str) -> Any:
        server = gunicorn(
            {
                "CATALOG_DATABASE_URL": sqlite_url,
                "CATALOG_API_KEYS_DIR": str(keys_dir.path),
                "CATALOG_REDIS_URL": redis_server.url,
                "WEB_CONCURRENCY": "2",
                "CATALOG_THREADS": "4",
                **env,
            }
        )
        poll(lambda: len(booted_workers(server)) == 2, 30, "both workers did not boot")
        return server

    return start


def booted_workers(server: Any) -> list[dict[str, Any]]:
    """The line each worker logs once it has built the app and loaded the keys."""
    return [line for line in server.log_lines() if line.get("message") == "api keys loaded"]


def api_requests_per_worker(server: Any) -> dict[str, float]:
    """Requests each worker counted in its own metrics file (flask_http_request_total: probes excluded)."""
    directory = Path(server.env["PROMETHEUS_MULTIPROC_DIR"])
    served: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(str(path)):
            _metric, name, _labels, _help = json.loads(key)
            if name == "flask_http_request_total":
                served[path.stem] = served.get(path.stem, 0) + value
    return served


# --- one budget per client, shared by the workers ----------------------------------------------------------


def test_a_client_over_its_limit_gets_429_while_another_is_unaffected_and_workers_share_the_count(
    serve: Any, redis_server: RedisServer
) -> None:
    server = serve(CATALOG_RATE_LIMIT="20/minute")
    url = f"{server.url}/api/v1/products?limit=1"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: get(url, headers=auth()), range(30)))

    assert sorted(a.status_code for a in answers) == [200] * 20 + [429] * 10
    for answer in answers:
        assert_rate_headers(answer, 20)
        assert ("Retry-After" in answer.headers) == (answer.status_code == 429)
        if answer.status_code == 429:
            assert_too_many(answer, 20)
    assert sorted(int(a.headers["RateLimit-Remaining"]) for a in answers if a.status_code == 200) == list(
        range(20)
    )
    # Both workers answered, yet 20 passed in all: the count is the sum, kept in Redis (the answers once the
    # budget was known used up were counted in the worker and reach Redis in its next batch).
    assert len(api_requests_per_worker(server)) == 2, api_requests_per_worker(server)
    key = f"{KEY_PREFIX}LIMITER/writer/api/20/1/minute"
    poll(
        lambda: counters(redis_server).get(key) == 30,
        5,
        f"not every request counted in Redis: {counters(redis_server)}",
    )

    other = get(url, headers=auth(READER_KEY))
    assert other.status_code == 200
    assert assert_rate_headers(other, 20) == 19
    assert "Retry-After" not in other.headers
    for path in OPERATIONAL_PATHS:
        answer = get(f"{server.url}{path}", headers=auth())
        assert answer.status_code == 200, path
        assert not {*RATE_HEADERS, "Retry-After"} & set(answer.headers.keys()), path
    assert metric(server.url, "catalog_rate_limited_total", client="writer") == 10
    assert metric(server.url, "catalog_rate_limited_total", client="reader") == 0


def test_a_per_client_limit_from_the_secret_applies_after_rotation_without_restart(
    serve: Any, keys_dir: SecretDir
) -> None:
    server = serve(CATALOG_RATE_LIMIT="1000/minute")
    url = f"{server.url}/api/v1/products?limit=1"
    assert_rate_headers(get(url, headers=auth(READER_KEY)), 1000)

    keys_dir.write(
        {
            **DEFAULT_KEYS,
            "reader": json.dumps({"key": READER_KEY, "scopes": ["read"], "rate_limit": "5/minute"}),
        }
    )
    answers: list[requests.Response] = []

    def limited() -> bool:
        answers.append(get(url, headers=auth(READER_KEY)))
        return answers[-1].status_code == 429

    poll(limited, 20, "the reader's own limit of 5/minute never took effect")
    # Workers pick the rotation up independently; every answer under the new limit counts towards one budget.
    under_new_limit = [a for a in answers if a.headers["RateLimit-Limit"] == "5"]
    assert [a.status_code for a in under_new_limit] == [200] * 5 + [429]
    assert_too_many(under_new_limit[-1], 5)
    assert server.process.poll() is None
    writer = get(url, headers=auth())
    assert writer.status_code == 200 and writer.headers["RateLimit-Limit"] == "1000"


# --- failed authentication, per client IP ------------------------------------------------------------------


def test_key_guessing_from_one_ip_gets_429_while_a_client_behind_the_same_proxy_is_unaffected(
    serve: Any,
) -> None:
    server = serve(CATALOG_AUTH_FAILURE_LIMIT="30/minute", CATALOG_TRUSTED_PROXY_HOPS="1")
    url = f"{server.url}/api/v1/products?limit=1"
    guesser = {"X-Api-Key": WRONG_KEY, "X-Forwarded-For": "203.0.113.7"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: get(url, headers=guesser), range(40)))

    assert sorted(a.status_code for a in answers) == [401] * 30 + [429] * 10
    for answer in answers:
        assert_rate_headers(answer, 30)
        if answer.status_code == 429:
            assert_too_many(answer, 30)
        else:
            assert_problem(answer, 401)
            assert "Retry-After" not in answer.headers
    assert sorted(int(a.headers["RateLimit-Remaining"]) for a in answers if a.status_code == 401) == list(
        range(30)
    )

    neighbour = {**auth(), "X-Forwarded-For": "198.51.100.9"}
    assert get(url, headers=neighbour).status_code == 200
    assert get(url, headers={"X-Api-Key": WRONG_KEY, "X-Forwarded-For": "198.51.100.9"}).status_code == 401
    assert get(url, headers={**auth(), "X-Forwarded-For": "203.0.113.7"}).status_code == 200
    assert metric(server.url, "catalog_rate_limited_total", client="anonymous") == 10


def test_without_trusted_proxy_hops_x_forwarded_for_cannot_dodge_the_failure_limit(
    settings: Settings, make_client: Callable[[Settings], Any]
) -> None:
    client = make_client(dataclasses.replace(settings, auth_failure_limit="3/minute", trusted_proxy_hops=0))
    statuses = [
        client.get(
            "/api/v1/products",
            headers={"X-Api-Key": WRONG_KEY, "X-Forwarded-For": f"192.0.2.{n}"},
            environ_base={"REMOTE_ADDR": "10.1.1.1"},
        ).status_code
        for n in range(5)
    ]
    assert statuses == [401, 401, 401, 429, 429]
    other_peer = client.get("/api/v1/products", headers=auth(), environ_base={"REMOTE_ADDR": "10.2.2.2"})
    assert other_peer.status_code == 200


# --- headers on every /api/ answer -------------------------------------------------------------------------


def test_every_api_answer_carries_rate_limit_headers_and_only_429_carries_retry_after(
    settings: Settings, redis_server: RedisServer, make_client: Callable[[Settings], Any]
) -> None:
    client = make_client(
        dataclasses.replace(
            settings, redis_url=redis_server.url, rate_limit="8/minute", auth_failure_limit="4/minute"
        )
    )
    answers = {
        201: client.post("/api/v1/products", json=product_body(), headers=auth()),
        404: client.get("/api/v1/products/no-such-id", headers=auth()),
        405: client.delete("/api/v1/products", headers=auth()),
        422: client.get("/api/v1/products?limit=1000", headers=auth()),
        400: client.post(
            "/api/v1/products", data="{", headers={**auth(), "Content-Type": "application/json"}
        ),
    }
    for status, answer in answers.items():
        assert answer.status_code == status
        assert "Retry-After" not in answer.headers
    assert [assert_rate_headers(a, 8) for a in answers.values()] == [7, 6, 5, 4, 3]
    no_route = client.get("/api/v2/nothing", headers=auth())
    assert no_route.status_code == 404 and assert_rate_headers(no_route, 8) == 2

    # 401 comes from auth, before the client is known: it reports the caller IP's failure quota.
    unauthorized = client.get("/api/v1/products", headers={"X-Api-Key": WRONG_KEY})
    assert_problem(unauthorized, 401)
    assert assert_rate_headers(unauthorized, 4) == 3
    assert "Retry-After" not in unauthorized.headers
    missing = client.get("/api/v1/products")
    assert assert_rate_headers(missing, 4) == 2

    # 403 comes from auth too, but the client is known: it counts against that client's own budget.
    forbidden = [
        client.post("/api/v1/products", json=product_body(), headers=auth(READER_KEY)) for _ in range(9)
    ]
    assert [a.status_code for a in forbidden] == [403] * 8 + [429]
    assert [assert_rate_headers(a, 8) for a in forbidden[:8]] == list(range(7, -1, -1))
    assert "Retry-After" not in forbidden[0].headers
    assert_too_many(forbidden[8], 8)

    for path in OPERATIONAL_PATHS:
        answer = client.get(path)
        assert not {*RATE_HEADERS, "Retry-After"} & set(answer.headers.keys()), path


def test_a_cached_get_costs_no_redis_round_trip(serve: Any, redis_server: RedisServer) -> None:
    """With the budget far from used up, a cached GET is answered from the worker's near-cache and counted
    in the worker: Redis sees the limiter's batches (one script call per worker per SYNC_SECONDS at most)
    and the invalidation listeners' pings. The only reads are of GETs that came while a listener had its
    ping's answer waiting in its socket or was reading it (the near-cache cannot tell that answer from an
    invalidation before it is read, so it asks Redis): at most two per ping, and far fewer than the GETs."""
    server = serve()
    created = requests.post(f"{server.url}/api/v1/products", json=product_body(), headers=auth(), timeout=10)
    url = f"{server.url}/api/v1/products/{created.json()['id']}"
    for _ in range(6):  # both workers fill their near-caches
        poll(lambda: get(url, headers=auth()).headers["X-Cache"] == "HIT", 10, "the product never got cached")

    seen: list[dict[str, Any]] = []
    requests_sent = 100
    # A bare connection, opened before MONITOR starts, marks the end of the requests with one ECHO.
    with (
        requests.Session() as session,
        socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as marker,
        redis_server.client() as watcher,
    ):
        for _ in range(3):  # the worker that holds the session's connection has the product in its near-cache
            assert session.get(url, headers=auth(), timeout=10).headers["X-Cache"] == "HIT"
        with watcher.monitor() as monitor:
            started = time.monotonic()
            for _ in range(requests_sent):
                answer = session.get(url, headers=auth(), timeout=10)
                assert answer.headers["X-Cache"] == "HIT" and answer.headers["RateLimit-Limit"] == "1000"
            elapsed = time.monotonic() - started
            marker.sendall(b"ECHO end-of-test-requests\r\n")
            for command in monitor.listen():
                if "end-of-test-requests" in command["command"]:
                    break
                seen.append(command)
    sent = [c["command"].split()[0].upper() for c in seen if c["client_type"] != "lua"]
    assert set(sent) <= {"EVALSHA", "PING", "GET", "PTTL"}, [c["command"][:60] for c in seen]
    batches, pings, reads = sent.count("EVALSHA"), sent.count("PING"), sent.count("GET")
    assert batches <= 2 * (elapsed / SYNC_SECONDS + 2), (batches, elapsed)
    assert batches < requests_sent / 2, batches
    assert sent.count("PTTL") == reads, sent  # a read is the entry's GET and PTTL
    assert reads <= 2 * pings and reads < requests_sent / 10, (reads, pings)
    print(f"{requests_sent} cached GETs in {elapsed:.2f} s: {batches} batches, {pings} pings, {reads} reads")


# --- Redis away: per worker in memory, then shared again -------------------------------------------------


def timed_get(url: str, **kwargs: Any) -> tuple[float, requests.Response]:
    """Seconds a request took, and its answer."""
    started = time.monotonic()
    answer = get(url, **kwargs)
    return time.monotonic() - started, answer


@pytest.mark.parametrize("outage", ["pause", "kill"])
def test_redis_away_keeps_the_api_answering_fast_then_shared_counting_resumes(
    serve: Any, redis_server: RedisServer, outage: str
) -> None:
    server = serve(CATALOG_RATE_LIMIT="1000/minute")
    url = f"{server.url}/api/v1/products?limit=1"
    for _ in range(4):
        assert get(url, headers=auth()).status_code == 200
    key = f"{KEY_PREFIX}LIMITER/writer/api/1000/1/minute"
    assert settled_count(redis_server, key) == 4

    redis_server.pause() if outage == "pause" else redis_server.kill()
    during = [timed_get(url, headers=auth()) for _ in range(20)]
    assert [a.status_code for _, a in during] == [200] * 20
    assert max(seconds for seconds, _ in during) < 1.0, [round(s, 3) for s, _ in during]
    for _, answer in during:
        # A HIT only from a near-cache whose listener has not noticed the outage yet (within a second).
        assert answer.headers["X-Cache"] in ("BYPASS", "HIT")
        assert_rate_headers(answer, 1000)
    poll(
        lambda: get(url, headers=auth()).headers["X-Cache"] == "BYPASS",
        5,
        "the near-cache was still used long after Redis went away",
    )

    redis_server.resume() if outage == "pause" else redis_server.start()
    before = counters(redis_server).get(key, 0)

    def counted_in_redis() -> bool:
        # Each worker returns to Redis on its own; done when a batch is counted there in full.
        start = settled_count(redis_server, key)
        for _ in range(6):
            assert get(url, headers=auth()).status_code == 200
        return settled_count(redis_server, key) - start == 6

    poll(counted_in_redis, 15, "shared counting did not resume in Redis")
    assert counters(redis_server)[key] > before


def test_while_redis_is_down_each_worker_enforces_the_limit_in_memory(
    serve: Any, redis_server: RedisServer
) -> None:
    server = serve(CATALOG_RATE_LIMIT="5/minute")
    url = f"{server.url}/api/v1/products?limit=1"
    assert get(url, headers=auth()).status_code == 200
    redis_server.kill()
    # Concurrent requests meet the failure together: none may get a 500 for it.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: get(url, headers=auth()), range(30)))
    passed = [a for a in answers if a.status_code == 200]
    # At most 5 per worker (2 workers); the one request counted in Redis before it died is forgotten.
    assert 5 <= len(passed) <= 10
    for answer in answers:
        assert_rate_headers(answer, 5)
        if answer.status_code != 200:
            assert_too_many(answer, 5)


# --- two pods counting one budget -----------------------------------------------------------------------


class WindowWatch:
    """Watches a counter's remaining time in Redis and notes when each of its windows started (a window
    begins with its first count and lasts its expiry). Each reading dates the start no earlier than it was
    (the clock is read after the answer, perhaps much later when this thread waits for the GIL): the
    earliest of a window's readings is its start."""

    def __init__(self, redis_server: RedisServer, key: str, expiry: float) -> None:
        self.client = redis_server.client()
        self.key = key
        self.expiry = expiry
        self.starts: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> "WindowWatch":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            remaining = self.client.pttl(self.key)
            now = time.monotonic()
            if remaining > 0:
                started = now - (self.expiry * 1000 - remaining) / 1000
                if not self.starts or started - self.starts[-1] > self.expiry / 2:
                    self.starts.append(started)
                else:
                    self.starts[-1] = min(self.starts[-1], started)
            time.sleep(0.005)


def test_two_pods_at_200_per_second_for_10_s_overshoot_at_most_10_percent(
    gunicorn: Any, sqlite_url: str, keys_dir: SecretDir, redis_server: RedisServer
) -> None:
    """Two masters of two workers each, one client limited to 200/second, hammered through both for 10 s:
    in every window at most 1.1 x 200 requests pass, and the budget is used (at least 90 % in the full
    windows). The client sees when a request began and was answered, not when it was decided: a request lies
    in the window that holds the middle of that span (those that straddle an edge, up to the 8 in flight,
    split about evenly; counting them on both sides, as a first version of this test did, adds up to 16 that
    the limiter never let through twice)."""
    limit, seconds, threads_per_pod = 200, 10.0, 4
    env = {
        "CATALOG_DATABASE_URL": sqlite_url,
        "CATALOG_API_KEYS_DIR": str(keys_dir.path),
        "CATALOG_REDIS_URL": redis_server.url,
        "CATALOG_RATE_LIMIT": f"{limit}/second",
        "WEB_CONCURRENCY": "2",
        "CATALOG_THREADS": "4",
    }
    pods = [gunicorn(env), gunicorn(env)]
    passed: list[tuple[float, float]] = []  # (started, answered) of every 200
    limited: list[tuple[float, float]] = []  # and of every 429
    statuses: list[int] = []
    stop = threading.Event()

    def hammer(url: str) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                started = time.monotonic()
                status = session.get(url, headers=auth(), timeout=10).status_code
                statuses.append(status)
                (passed if status == 200 else limited).append((started, time.monotonic()))

    created = requests.post(f"{pods[0].url}/api/v1/products", json=product_body(), headers=auth(), timeout=10)
    path = f"/api/v1/products/{created.json()['id']}"
    time.sleep(1.5)  # a fresh window for the measurement
    key = f"{KEY_PREFIX}LIMITER/writer/api/{limit}/1/second"
    workers = [
        threading.Thread(target=hammer, args=(pod.url + path,))
        for pod in pods
        for _ in range(threads_per_pod)
    ]
    with WindowWatch(redis_server, key, 1.0) as watch:
        for worker in workers:
            worker.start()
        time.sleep(seconds)
        stop.set()
        for worker in workers:
            worker.join()
    assert set(statuses) == {200, 429}, set(statuses)
    windows = watch.starts
    assert len(windows) >= seconds - 1, windows
    per_window, contested = [], []
    for start, end in itertools.pairwise(windows):
        per_window.append(sum(1 for began, answered in passed if start <= (began + answered) / 2 < end))
        contested.append(sum(1 for began, answered in limited if began >= start and answered < end) > 0)
    worst = max(per_window)
    print(
        f"limit {limit}/s, 2 pods x 2 workers, {len(statuses)} requests in {seconds:.0f} s, {len(passed)} "
        f"passed; per full window: {per_window} (max {worst}, {worst / limit:.2f} x the limit)"
    )
    assert worst <= 1.1 * limit, per_window
    # Where some requests were turned away, the budget was used (a loaded machine may not offer it all, and
    # a worker starved of CPU syncs late and may turn a few away early: the median window is judged).
    assert contested.count(True) >= 3, contested
    used = [count for count, turned_away in zip(per_window, contested, strict=True) if turned_away]
    assert statistics.median(used) >= 0.9 * limit, per_window
