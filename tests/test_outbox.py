"""Durable cache invalidations: a write records its invalidation in its own transaction and delivers it
after the commit; one its writer could not deliver (cut off from Redis, or killed after its commit) is
delivered by another pod's sweeper, so pods that can reach Redis stop serving the old value within 5 s of
the commit (the contract), and the writer's pod trusts Redis again once it is delivered. Measured with two
gunicorn masters on one Redis and one database, the writer's path to Redis through a TCP proxy."""

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from tests.conftest import RedisServer, SecretDir, auth, poll, product_body
from tests.tcp_proxy import TcpProxy
from tests.test_cache import create_product, metric, server_env
from tests.test_cache_pods import Readers, near_cache_in_use, wait_for_subscribers

from catalog import logs
from catalog.cache import CircuitBreaker, GuardedRedis, InvalidationBoard, RedisCache, make_redis
from catalog.cache.keys import INVALIDATION_CHANNEL, OUTBOX_SWEEPER
from catalog.config import Settings
from catalog.db import Database, make_engine
from catalog.outbox import GRACE, Outbox

# The contract: a write's invalidation reaches every pod that can reach Redis within 5 s of its commit.
DELIVERED_WITHIN_SECONDS = 5.0
TTL = "60"  # the old value would otherwise stay in Redis and the near-caches this long


@pytest.fixture
def database(database_url: str) -> Iterator[Engine]:
    """A plain engine on the test database, to look at the outbox and the products from outside."""
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    yield engine
    engine.dispose()


def outbox_rows(database: Engine) -> list[tuple[int, str]]:
    """The rows left in the outbox."""
    with database.connect() as connection:
        return [tuple(row) for row in connection.execute(text("SELECT id, product_id FROM cache_outbox"))]


def invalidation_messages(redis_server: RedisServer) -> Any:
    """A subscription to the invalidation channel, confirmed."""
    pubsub = redis_server.client().pubsub()
    pubsub.subscribe(INVALIDATION_CHANNEL)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    return pubsub


def messages(pubsub: Any, seconds: float = 0.3) -> list[bytes]:
    """The ids published within `seconds`."""
    received = []
    deadline = time.monotonic() + seconds
    while (message := pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))) is not None:
        received.append(message["data"])
    return received


def recorded(client: Any) -> float:
    """Invalidations recorded in the outbox so far."""
    text_ = client.get("/metrics").text
    return metric(text_, "catalog_db_queries_total", operation="record_invalidation")


def assert_delivered_once(pubsub: Any, product_id: str, database: Engine) -> None:
    """The write's invalidation was published once, and its row removed before its grace ran out (so no
    sweeper delivers it again)."""
    assert messages(pubsub) == [product_id.encode()]
    poll(lambda: outbox_rows(database) == [], GRACE.total_seconds() - 0.3, "the delivered row was left")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_write_records_and_delivers_its_invalidation_and_leaves_no_row(
    settings: Settings,
    redis_server: RedisServer,
    make_client: Callable[[Settings], Any],
    database: Engine,
) -> None:
    """Create, replace, patch and delete with Redis: each records a row in its transaction (counted in
    catalog_db_queries_total{operation="record_invalidation"}) and publishes the product's id once; the
    worker's sweeper removes the row within its grace, so no sweeper delivers it again."""
    client = make_client(dataclasses.replace(settings, redis_url=redis_server.url))
    before = recorded(client)
    pubsub = invalidation_messages(redis_server)
    try:
        product = client.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
        path = f"/api/v1/products/{product['id']}"
        assert_delivered_once(pubsub, product["id"], database)
        body = product_body(sku=product["sku"], name="replaced")
        assert client.put(path, json=body, headers=auth()).status_code == 200
        assert_delivered_once(pubsub, product["id"], database)
        patch = client.patch(
            path, json={"name": "patched"}, headers={**auth(), "Content-Type": "application/merge-patch+json"}
        )
        assert patch.status_code == 200, patch.get_data()
        assert_delivered_once(pubsub, product["id"], database)
        assert client.delete(path, headers=auth()).status_code == 204
        assert_delivered_once(pubsub, product["id"], database)
        assert messages(pubsub, GRACE.total_seconds() + 0.5) == [], "delivered again by a sweeper"
    finally:
        pubsub.close()
    assert recorded(client) - before == 4


def test_without_redis_nothing_is_recorded(
    settings: Settings, make_client: Callable[[Settings], Any], database: Engine
) -> None:
    """The in-process cache (one pod, invalidated at once): writes leave the outbox alone."""
    client = make_client(settings)
    before = recorded(client)
    product = client.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
    body = product_body(sku=product["sku"], name="replaced")
    assert client.put(f"/api/v1/products/{product['id']}", json=body, headers=auth()).status_code == 200
    assert recorded(client) == before
    assert outbox_rows(database) == []


@pytest.fixture
def outbox_parts(
    database_url: str, redis_server: RedisServer
) -> Iterator[Callable[[str], tuple[Database, RedisCache, Outbox]]]:
    """Build a pod's database, Redis cache and outbox (no sweeper thread: the test sweeps): `parts(url)`."""
    built: list[tuple[Database, RedisCache]] = []

    def build(redis_url: str) -> tuple[Database, RedisCache, Outbox]:
        db = Database(make_engine(Settings(database_url=database_url)))
        cache = RedisCache(
            GuardedRedis(make_redis(redis_url, None, 4), CircuitBreaker()), 60, InvalidationBoard(None)
        )
        built.append((db, cache))
        return db, cache, Outbox(db, cache)

    yield build
    for db, cache in built:
        db.engine.dispose()
        cache.guarded.client.connection_pool.disconnect()


def record(db: Database, product_id: str) -> int:
    """A committed outbox row nobody delivered (its writer died right after the commit)."""
    with db.transaction() as connection:
        return db.record_invalidation(connection, product_id)


def test_one_sweeper_at_a_time_delivers_rows_past_their_grace_and_removes_them(
    outbox_parts: Callable[[str], tuple[Database, RedisCache, Outbox]],
    redis_server: RedisServer,
    database: Engine,
) -> None:
    """While another sweeper holds the lock nothing is delivered; then rows older than the grace (the
    writer's own time to deliver) are delivered in one go and removed; a fresh row is left to its writer."""
    db, _cache, outbox = outbox_parts(redis_server.url)
    old = [record(db, f"01ARZ3NDEKTSV4RRFFQ69G5F{index:02d}") for index in range(3)]
    time.sleep(GRACE.total_seconds() + 0.1)
    fresh = record(db, "01ARZ3NDEKTSV4RRFFQ69G5FZZ")
    pubsub = invalidation_messages(redis_server)
    try:
        with redis_server.client() as direct:
            direct.set(OUTBOX_SWEEPER, b"another pod", px=10_000)
            outbox.sweep()
            assert messages(pubsub) == [] and len(outbox_rows(database)) == 4
            direct.delete(OUTBOX_SWEEPER)
            outbox.sweep()
            assert direct.get(OUTBOX_SWEEPER) is None, "the sweeper kept its lock"
        assert messages(pubsub) == [f"01ARZ3NDEKTSV4RRFFQ69G5F{index:02d}".encode() for index in range(3)]
        assert [row for row, _ in outbox_rows(database)] == [fresh]
        assert fresh > max(old)
    finally:
        pubsub.close()


def test_sweep_failures_are_one_warning_per_episode(
    outbox_parts: Callable[[str], tuple[Database, RedisCache, Outbox]],
    redis_server: RedisServer,
    database: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis down: sweeps keep failing, one WARNING says so; Redis back: an INFO, and the row is delivered."""
    logs.configure("INFO")
    db, _cache, outbox = outbox_parts(redis_server.url)
    record(db, "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    time.sleep(GRACE.total_seconds() + 0.1)
    redis_server.kill()
    caplog.clear()
    for _ in range(5):
        outbox.sweep()
    failing = [r for r in caplog.records if r.name == "catalog.outbox" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in failing] == ["cache invalidation sweep failing: retrying every second"]
    assert len(outbox_rows(database)) == 1
    redis_server.start()
    poll(lambda: outbox.sweep() or outbox_rows(database) == [], 10, "never delivered")
    outbox_lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "catalog.outbox"]
    assert ("INFO", "cache invalidation sweep recovered") in outbox_lines
    assert sum(level == "WARNING" for level, _ in outbox_lines) == 1


def test_the_pod_trusts_redis_again_once_what_it_waits_for_is_delivered(
    outbox_parts: Callable[[str], tuple[Database, RedisCache, Outbox]], redis_server: RedisServer
) -> None:
    """A write cut off from Redis leaves its row and its pod distrusting Redis; another pod's sweep delivers
    it; the writer's next sweep (still cut off) trusts Redis again. A distrust that comes while a sweep
    checks the outbox is never lost."""
    with TcpProxy(redis_server.port) as proxy:
        writer_db, writer_cache, writer_outbox = outbox_parts(proxy.url())
        _db, _cache, other_outbox = outbox_parts(redis_server.url)
        proxy.cut()
        product_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
        with writer_db.transaction() as connection:
            row = writer_outbox.record(connection, product_id)
        writer_outbox.deliver(product_id, row)
        assert not writer_cache.board.redis_trusted()
        writer_outbox.sweep()
        assert not writer_cache.board.redis_trusted(), "trusted before the row was delivered"
        time.sleep(GRACE.total_seconds() + 0.1)
        other_outbox.sweep()
        writer_outbox.sweep()
        assert writer_cache.board.redis_trusted()

    board = InvalidationBoard(None)
    board.distrust_redis(7)
    checked = board.distrust()
    board.distrust_redis(5)  # a write that failed meanwhile, with an older row the check may not have seen
    assert not board.trust_redis(checked)
    assert not board.redis_trusted()
    assert board.trust_redis(board.distrust()) and board.redis_trusted()


# --- two pods ----------------------------------------------------------------------------------------------


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    """A TCP proxy to the test's Redis (the writer pod's path to it)."""
    with TcpProxy(redis_server.port) as tcp_proxy:
        yield tcp_proxy


@pytest.fixture
def writer_and_reader(
    gunicorn: Any, database_url: str, keys_dir: SecretDir, redis_server: RedisServer, proxy: TcpProxy
) -> tuple[Any, Any]:
    """Two masters of two workers on one database and one Redis: the writer reaches Redis through the
    proxy, the reader directly; the cache TTL is 60 s."""
    writer = gunicorn(
        server_env(database_url, keys_dir, CATALOG_REDIS_URL=proxy.url(), CATALOG_CACHE_TTL_SECONDS=TTL)
    )
    reader = gunicorn(
        server_env(database_url, keys_dir, CATALOG_REDIS_URL=redis_server.url, CATALOG_CACHE_TTL_SECONDS=TTL)
    )
    wait_for_subscribers(redis_server, 4)
    return writer, reader


def last_old_read(readers: Readers, since: float, version: int) -> float:
    """How long after `since` a read could still start and see a version older than `version` (0 if none)."""
    return max(
        [started - since for started, seen, _ in readers.reads if seen < version and started >= since] + [0]
    )


def logged_at(server: Any, message: str) -> float:
    """When (epoch seconds) the server first logged `message`."""
    for line in server.log_lines():
        if line["message"] == message:
            return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"never logged: {message}")


def delivered_elsewhere(readers: Readers, sent: float, database: Engine) -> float:
    """How long after the write (version 2) was sent the other pod still served the old value: within the
    promise, with no failed read and no row left in the outbox."""
    assert not readers.failures, readers.failures[:3]
    window = last_old_read(readers, sent, 2)
    assert window < DELIVERED_WITHIN_SECONDS, (
        f"the other pod served the old value {window:.2f} s after the write"
    )
    poll(lambda: outbox_rows(database) == [], 5, "a row was left in the outbox")
    return window


def test_a_writer_cut_off_from_redis_is_delivered_by_another_pod_within_5_s(
    writer_and_reader: tuple[Any, Any], proxy: TcpProxy, database: Engine
) -> None:
    """The writer's path to Redis is cut (its connections reset) while readers hammer a product on the other
    pod, which serves it from its near-cache: the write answers, the writer's pod reads it from the
    database (BYPASS), the other pod stops serving the old value within 5 s of the commit, the writer's
    pod trusts Redis again as soon as its row was delivered, no row is left, and once the path is back the
    writer's pod serves HITs again (no wait for a TTL)."""
    writer, reader = writer_and_reader
    product = create_product(writer.url)
    path = f"/api/v1/products/{product['id']}"
    poll(lambda: near_cache_in_use(reader.url + path, proxy_server(proxy)), 10, "near-cache never used")
    with Readers(reader.url + path) as readers:
        time.sleep(0.3)
        proxy.cut()
        sent = time.monotonic()
        body = product_body(sku=product["sku"], name="written while cut off from Redis")
        answer = requests.put(writer.url + path, json=body, headers=auth(), timeout=10)
        assert (answer.status_code, answer.json()["version"]) == (200, 2), answer.text
        answered = time.monotonic()
        on_writer = [
            requests.get(writer.url + path, headers={**auth(), "Connection": "close"}, timeout=5)
            for _ in range(10)
        ]
        assert {(r.json()["version"], r.headers["X-Cache"]) for r in on_writer} == {(2, "BYPASS")}
        poll(lambda: readers.reads and readers.reads[-1][1] == 2, DELIVERED_WITHIN_SECONDS, "never delivered")
        time.sleep(0.5)
    window = delivered_elsewhere(readers, sent, database)
    delivered = logged_at(reader, "pending cache invalidations delivered")
    trusted = logged_at(writer, "redis trusted again: the pending cache invalidations are delivered")
    assert 0 <= trusted - delivered < 1.0, trusted - delivered

    proxy.restore()
    healed = time.monotonic()
    poll(lambda: get(writer.url + path).headers["X-Cache"] == "HIT", 10, "no HIT on the writer's pod")
    print(
        f"write answered in {(answered - sent) * 1000:.0f} ms; the other pod served the old value up to "
        f"{window:.2f} s after it was sent; the writer's pod trusted Redis again "
        f"{(trusted - delivered) * 1000:.0f} ms after the other pod delivered; HITs on the writer's pod "
        f"{time.monotonic() - healed:.1f} s after the path to Redis came back"
    )


def proxy_server(proxy: TcpProxy) -> Any:
    """What near_cache_in_use asks for GET counts: the Redis behind the proxy."""
    return type(
        "Server", (), {"client": lambda self: redis.Redis(port=proxy.target_port, socket_timeout=2)}
    )()


def get(url: str) -> requests.Response:
    """One GET on a fresh connection."""
    return requests.get(url, headers={**auth(), "Connection": "close"}, timeout=5)


def kill_now(server: Any) -> None:
    """SIGKILL the master and its workers (no graceful anything)."""
    pid = server.process.pid
    workers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    os.kill(pid, signal.SIGKILL)
    for worker in workers:
        os.kill(int(worker), signal.SIGKILL)
    server.process.wait()


def test_a_writer_killed_right_after_its_commit_is_delivered_by_another_pod_within_5_s(
    writer_and_reader: tuple[Any, Any], proxy: TcpProxy, database: Engine
) -> None:
    """The writer's path to Redis holds (nothing answers, so its invalidation waits for the timeout); the
    moment its commit is visible in the database the writer's master and workers are SIGKILLed: the other
    pod stops serving the old value within 5 s of the commit and no row is left."""
    writer, reader = writer_and_reader
    product = create_product(writer.url)
    path = f"/api/v1/products/{product['id']}"
    poll(lambda: near_cache_in_use(reader.url + path, proxy_server(proxy)), 10, "near-cache never used")
    outcome: list[str] = []

    def write() -> None:
        body = product_body(sku=product["sku"], name="its writer died")
        try:
            answer = requests.put(writer.url + path, json=body, headers=auth(), timeout=10)
            outcome.append(f"answered {answer.status_code}")
        except requests.RequestException as error:
            outcome.append(type(error).__name__)

    def committed() -> bool:
        with database.connect() as connection:
            query = text("SELECT version FROM products WHERE id = :id")
            return connection.execute(query, {"id": product["id"]}).scalar_one() == 2

    with Readers(reader.url + path) as readers:
        time.sleep(0.3)
        proxy.hold()
        sent = time.monotonic()
        writing = threading.Thread(target=write)
        writing.start()
        while not committed():
            assert time.monotonic() - sent < 10, "the write never committed"
        seen_committed = time.monotonic()
        kill_now(writer)
        killed = time.monotonic()
        writing.join()
        poll(lambda: readers.reads and readers.reads[-1][1] == 2, DELIVERED_WITHIN_SECONDS, "never delivered")
        time.sleep(0.5)
    window = delivered_elsewhere(readers, sent, database)
    print(
        f"writer killed {(killed - seen_committed) * 1000:.0f} ms after its commit was seen ({outcome[0]}); "
        f"the other pod served the old value up to {window:.2f} s after the write was sent "
        f"({last_old_read(readers, seen_committed, 2):.2f} s after the commit was seen)"
    )
