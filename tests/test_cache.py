"""The read cache seen from outside: MISS then HIT, ETags from the cache, JSON values under a schema-versioned
prefix with a jittered TTL, no stale read after a write answers (Redis and the in-process cache, real gunicorn
with two workers), and at most two database reads for a stampede on a cold key."""

import dataclasses
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from tests.conftest import REDIS_SERVER_ENV, WRITER_KEY, RedisServer, SecretDir, auth, product_body

from catalog.cache import (
    PREFIX,
    CircuitBreaker,
    GuardedRedis,
    InvalidationBoard,
    MemoryCache,
    RedisCache,
    make_redis,
)
from catalog.cache.bounded import ENTRY_OVERHEAD_BYTES
from catalog.config import Settings

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$", re.M)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, in Prometheus text."""
    total = 0.0
    for sample in SAMPLE.finditer(text):
        if sample["name"] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', sample["labels"] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(sample["value"])
    return total


def db_reads(metrics_text: str) -> float:
    """Database reads of one product so far."""
    return metric(metrics_text, "catalog_db_queries_total", operation="get_product")


def server_env(database_url: str, keys_dir: SecretDir, **extra: str) -> dict[str, str]:
    """Environment of a real gunicorn with two workers of four threads and no rate limit in the way."""
    return {
        "CATALOG_DATABASE_URL": database_url,
        "CATALOG_API_KEYS_DIR": str(keys_dir.path),
        "CATALOG_RATE_LIMIT": "1000000/second",
        "WEB_CONCURRENCY": "2",
        "CATALOG_THREADS": "4",
        **extra,
    }


def create_product(base_url: str, **fields: Any) -> dict[str, Any]:
    """POST a product to a running server and return it."""
    answer = requests.post(
        f"{base_url}/api/v1/products", json=product_body(**fields), headers=auth(), timeout=10
    )
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


@pytest.fixture(params=["redis", "memory"])
def cache_kind(request: pytest.FixtureRequest) -> str:
    """Which cache a test runs against: a real redis-server, or the in-process cache."""
    return str(request.param)


@pytest.fixture
def cached_settings(settings: Settings, cache_kind: str, request: pytest.FixtureRequest) -> Settings:
    """The test settings with Redis (a server of the test's own) or with the in-process cache."""
    if cache_kind == "memory":
        return settings
    server: RedisServer = request.getfixturevalue("redis_server")
    return dataclasses.replace(settings, redis_url=server.url, cache_ttl_seconds=100)


@pytest.fixture
def cached_client(cached_settings: Settings, make_client: Callable[[Settings], Any]) -> Any:
    """A test client of an app with the chosen cache."""
    return make_client(cached_settings)


def test_the_tests_own_redis_is_the_server_chosen_for_the_run(redis_server: RedisServer) -> None:
    """`make test-compat` runs these tests on Redis 6.2 and on Valkey: the server a test starts is the binary
    CATALOG_TEST_REDIS_SERVER names, else redis-server on PATH."""
    chosen = shutil.which(os.environ.get(REDIS_SERVER_ENV, "redis-server"))
    assert chosen
    info = redis_server.client().info("server")
    assert os.path.realpath(info["executable"]) == os.path.realpath(chosen), info
    version = info.get("valkey_version", info["redis_version"])  # Valkey also reports a Redis version
    print(f"{info.get('server_name', 'redis')} {version} at {info['executable']}")


def test_get_by_id_is_a_miss_then_a_hit_and_304_comes_from_the_cache(cached_client: Any) -> None:
    """The second read is a HIT with the same body; If-None-Match is answered without a database read."""
    created = cached_client.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
    path = f"/api/v1/products/{created['id']}"

    first = cached_client.get(path, headers=auth())
    assert (first.status_code, first.headers["X-Cache"]) == (200, "MISS")
    reads_after_miss = db_reads(cached_client.get("/metrics").text)
    second = cached_client.get(path, headers=auth())
    assert (second.status_code, second.headers["X-Cache"]) == (200, "HIT")
    assert second.get_json() == first.get_json() == created
    assert second.headers["ETag"] == first.headers["ETag"] == '"1"'

    not_modified = cached_client.get(path, headers={**auth(), "If-None-Match": '"1"'})
    assert (not_modified.status_code, not_modified.headers["X-Cache"]) == (304, "HIT")
    assert not_modified.headers["ETag"] == '"1"'
    assert db_reads(cached_client.get("/metrics").text) == reads_after_miss

    changed = cached_client.put(path, json=product_body(sku=created["sku"], name="Renamed"), headers=auth())
    assert changed.status_code == 200
    stale_etag = cached_client.get(path, headers={**auth(), "If-None-Match": '"1"'})
    assert (stale_etag.status_code, stale_etag.get_json()["name"], stale_etag.headers["ETag"]) == (
        200,
        "Renamed",
        '"2"',
    )


def test_list_pages_are_a_miss_then_a_hit_and_every_write_retires_them(cached_client: Any) -> None:
    """A page is cached; a create, an update and a delete each make the next read of it fresh."""
    first = cached_client.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
    page_path = "/api/v1/products?limit=10"
    assert cached_client.get(page_path, headers=auth()).headers["X-Cache"] == "MISS"
    hit = cached_client.get(page_path, headers=auth())
    assert hit.headers["X-Cache"] == "HIT"
    assert [item["id"] for item in hit.get_json()["items"]] == [first["id"]]

    second = cached_client.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
    after_create = cached_client.get(page_path, headers=auth())
    assert [item["id"] for item in after_create.get_json()["items"]] == [first["id"], second["id"]]

    body = product_body(sku=first["sku"], name="New name")
    assert cached_client.put(f"/api/v1/products/{first['id']}", json=body, headers=auth()).status_code == 200
    after_update = cached_client.get(page_path, headers=auth()).get_json()["items"]
    assert (after_update[0]["name"], after_update[0]["version"]) == ("New name", 2)

    assert cached_client.delete(f"/api/v1/products/{second['id']}", headers=auth()).status_code == 204
    after_delete = cached_client.get(page_path, headers=auth()).get_json()["items"]
    assert [item["id"] for item in after_delete] == [first["id"]]
    assert cached_client.get(f"/api/v1/products/{second['id']}", headers=auth()).status_code == 404


def test_redis_holds_json_under_the_schema_prefix_with_a_jittered_ttl(
    settings: Settings, redis_server: RedisServer, make_client: Callable[[Settings], Any], request: Any
) -> None:
    """Seen in Redis itself: JSON values (not pickle), keys under catalog:v<schema>:, TTL within ±10 %."""
    ttl_seconds = 100
    client = make_client(
        dataclasses.replace(settings, redis_url=redis_server.url, cache_ttl_seconds=ttl_seconds)
    )
    products = [
        client.post("/api/v1/products", json=product_body(), headers=auth()).get_json() for _ in range(12)
    ]
    for product in products:
        assert client.get(f"/api/v1/products/{product['id']}", headers=auth()).headers["X-Cache"] == "MISS"
    page = client.get("/api/v1/products?limit=5", headers=auth())
    assert page.headers["X-Cache"] == "MISS"

    direct = redis_server.client()
    request.addfinalizer(direct.close)
    assert PREFIX == "catalog:v1:"
    cache_keys = [key for key in direct.scan_iter("*") if not key.startswith(b"catalog:ratelimit:")]
    assert len(cache_keys) > len(products)
    assert all(key.startswith(PREFIX.encode()) for key in cache_keys), cache_keys
    ttls = []
    for product in products:
        stored = direct.get(f"{PREFIX}product:{product['id']}")
        assert stored is not None
        assert not stored.startswith(b"\x80"), "a pickle, not JSON"
        assert json.loads(stored) == product
        ttls.append(direct.pttl(f"{PREFIX}product:{product['id']}") / 1000)
    assert all(0.9 * ttl_seconds - 5 <= ttl <= 1.1 * ttl_seconds for ttl in ttls), ttls
    assert len({round(ttl) for ttl in ttls}) > 1, f"no jitter: {ttls}"

    page_keys = list(direct.scan_iter(f"{PREFIX}list:*"))
    assert len(page_keys) == 1
    assert json.loads(direct.get(page_keys[0]) or b"") == page.get_json()
    assert 0.9 * ttl_seconds - 5 <= direct.pttl(page_keys[0]) / 1000 <= 1.1 * ttl_seconds


def test_ttl_zero_turns_the_cache_off(settings: Settings, make_client: Callable[[Settings], Any]) -> None:
    """CATALOG_CACHE_TTL_SECONDS=0: every read comes from the database and says BYPASS."""
    client = make_client(dataclasses.replace(settings, cache_ttl_seconds=0))
    created = client.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
    for _ in range(2):
        answer = client.get(f"/api/v1/products/{created['id']}", headers=auth())
        assert (answer.headers["X-Cache"], answer.get_json()) == ("BYPASS", created)
    assert client.get("/api/v1/products", headers=auth()).headers["X-Cache"] == "BYPASS"


@pytest.fixture
def cached_server(
    gunicorn: Any, database_url: str, keys_dir: SecretDir, cache_kind: str, request: pytest.FixtureRequest
) -> Any:
    """Real gunicorn, two workers of four threads, with Redis or with the in-process cache."""
    extra = {}
    if cache_kind == "redis":
        extra["CATALOG_REDIS_URL"] = request.getfixturevalue("redis_server").url
    return gunicorn(server_env(database_url, keys_dir, **extra))


def test_fifty_concurrent_reads_of_a_cold_key_read_the_database_at_most_twice(cached_server: Any) -> None:
    """Stampede: one request per cache fills the key, the others wait for it (or read the database after
    a bounded wait); counted with catalog_db_queries_total{operation="get_product"}."""
    warm_up = create_product(cached_server.url)
    for _ in range(10):  # a cold key, not a cold server: every worker has served a read already
        requests.get(
            f"{cached_server.url}/api/v1/products/{warm_up['id']}",
            headers={**auth(), "Connection": "close"},
            timeout=10,
        )
    product = create_product(cached_server.url)
    before = db_reads(requests.get(f"{cached_server.url}/metrics", timeout=10).text)
    start = threading.Barrier(50)

    def read(_: int) -> tuple[int, dict[str, Any], str]:
        start.wait()
        answer = requests.get(
            f"{cached_server.url}/api/v1/products/{product['id']}", headers=auth(), timeout=10
        )
        return answer.status_code, answer.json(), answer.headers["X-Cache"]

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(read, range(50)))
    after = db_reads(requests.get(f"{cached_server.url}/metrics", timeout=10).text)
    assert all(status == 200 and body == product for status, body, _ in answers)
    assert 1 <= after - before <= 2, f"{after - before} database reads for 50 concurrent GETs"
    assert sum(cache == "HIT" for _, _, cache in answers) >= 48


def test_a_write_is_never_followed_by_an_old_read(cached_server: Any) -> None:
    """A writer PUTs versions 2..N while readers on fresh connections (so both workers) hammer GET of the
    product and of a list page holding it; no read that started after a PUT answered may return an older
    version, and most reads are cache HITs."""
    base = cached_server.url
    product = create_product(base)
    path = f"{base}/api/v1/products/{product['id']}"
    answered: dict[int, float] = {1: time.monotonic()}  # version -> when its PUT answered
    reads: list[tuple[float, int, str]] = []  # (started, version seen, X-Cache)
    done = threading.Event()
    failures: list[str] = []

    def reader(url: str, version_of: Callable[[Any], int]) -> None:
        while not done.is_set():
            started = time.monotonic()
            answer = requests.get(url, headers={**auth(), "Connection": "close"}, timeout=10)
            if answer.status_code != 200:
                failures.append(f"{answer.status_code} {answer.text}")
                return
            reads.append((started, version_of(answer.json()), answer.headers["X-Cache"]))

    threads = [threading.Thread(target=reader, args=(path, lambda body: body["version"])) for _ in range(3)]
    threads.append(
        threading.Thread(
            target=reader, args=(f"{base}/api/v1/products?limit=10", lambda page: page["items"][0]["version"])
        )
    )
    for thread in threads:
        thread.start()
    try:
        with requests.Session() as writer:
            for version in range(2, 102):
                time.sleep(0.02)  # let the readers fill the cache with the current version
                body = product_body(sku=product["sku"], name=f"version {version}")
                answer = writer.put(path, json=body, headers={"X-Api-Key": WRITER_KEY}, timeout=10)
                assert (answer.status_code, answer.json()["version"]) == (200, version), answer.text
                answered[version] = time.monotonic()
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    stale = [
        (seen, newest)
        for started, seen, _ in reads
        for newest in [max(version for version, at in answered.items() if at <= started)]
        if seen < newest
    ]
    assert not stale, f"{len(stale)} stale reads (seen, expected at least): {stale[:5]}"
    hits = sum(cache == "HIT" for _, _, cache in reads)
    assert len(reads) >= 200 and hits >= len(reads) // 4, f"{hits} HITs of {len(reads)} reads"


@pytest.fixture
def two_workers_caches(cache_kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[list[Any]]:
    """The caches of two workers of one server: sharing one Redis, or one invalidation board file."""
    board_path = str(tmp_path / "board")
    if cache_kind == "memory":
        yield [MemoryCache(60, InvalidationBoard(board_path)) for _ in range(2)]
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    caches = [
        RedisCache(
            GuardedRedis(make_redis(server.url, None, 4), CircuitBreaker()), 60, InvalidationBoard(board_path)
        )
        for _ in range(2)
    ]
    yield caches
    for cache in caches:
        cache.guarded.client.connection_pool.disconnect()


def test_a_fill_that_raced_a_write_is_never_stored(two_workers_caches: list[Any]) -> None:
    """The interleaving the HTTP test can only hope to hit, made certain: worker 1 misses and reads the old
    row; worker 2's write commits and invalidates; worker 1's fill must then be dropped, for a product and
    for a list page alike."""
    reader, writer = two_workers_caches
    product_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    database = {"value": b'{"version":1}'}

    def load_while_a_write_lands() -> bytes:
        old = database["value"]
        database["value"] = b'{"version":2}'
        writer.invalidate(product_id)
        return old

    assert reader.product(product_id, load_while_a_write_lands) == (b'{"version":1}', "MISS")
    assert reader.product(product_id, lambda: database["value"]) == (b'{"version":2}', "MISS")
    assert reader.product(product_id, lambda: b"not read") == (b'{"version":2}', "HIT")

    database["value"] = b'{"version":2,"page":true}'
    assert reader.page("20::", load_while_a_write_lands) == (b'{"version":2,"page":true}', "MISS")
    assert reader.page("20::", lambda: database["value"]) == (b'{"version":2}', "MISS")
    assert reader.page("20::", lambda: b"not read") == (b'{"version":2}', "HIT")

    writer.invalidate(product_id)
    assert reader.product(product_id, lambda: b'{"version":3}') == (b'{"version":3}', "MISS")
    assert reader.page("20::", lambda: b"[3]") == (b"[3]", "MISS")


def test_the_in_process_cache_is_bounded_in_bytes_and_in_time(tmp_path: Any) -> None:
    """Past its byte budget the least recently used entries go; past the TTL (+10 % jitter) all entries go."""
    value_bytes = 1000
    entry_bytes = value_bytes + ENTRY_OVERHEAD_BYTES + 60  # the key's object, too
    cache = MemoryCache(1, InvalidationBoard(str(tmp_path / "board")), max_bytes=5 * entry_bytes)
    for index in range(20):
        value = b"%03d" % index * (value_bytes // 3) + b"x"
        assert cache.page(str(index), lambda value=value: value)[1] == "MISS"
    assert cache.page("0", lambda: b"reloaded")[1] == "MISS"
    assert cache.page("19", lambda: b"not read") == (b"019" * (value_bytes // 3) + b"x", "HIT")
    time.sleep(1.15)
    assert cache.page("19", lambda: b"reloaded") == (b"reloaded", "MISS")


def test_an_evicted_ticket_never_lets_an_old_fill_in(redis_server: RedisServer, tmp_path: Any) -> None:
    """Under maxmemory Redis may evict a ticket right after a write replaced it; the reader that read the
    database before the write must still not fill (a counter restarting from nothing would match again)."""
    cache = RedisCache(
        GuardedRedis(make_redis(redis_server.url, None, 4), CircuitBreaker()), 60, InvalidationBoard(None)
    )
    product_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    try:
        with redis_server.client() as direct:

            def load_while_a_write_lands_and_its_ticket_is_evicted() -> bytes:
                cache.invalidate(product_id)
                direct.delete(f"{PREFIX}ticket:{product_id}", f"{PREFIX}lists")
                return b"old"

            assert cache.product(product_id, load_while_a_write_lands_and_its_ticket_is_evicted)[1] == "MISS"
            assert cache.product(product_id, lambda: b"new") == (b"new", "MISS")
            assert cache.page("20::", load_while_a_write_lands_and_its_ticket_is_evicted)[1] == "MISS"
            assert cache.page("20::", lambda: b"new page") == (b"new page", "MISS")
    finally:
        cache.guarded.client.connection_pool.disconnect()
