"""Reads that bypass Redis (its circuit open, Redis failing, or this pod distrusting it) share one database
load per key in a worker, counted in catalog_db_queries_total; a read that starts after a write never gets
a load that started before it."""

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from tests.conftest import RedisServer, auth, poll, product_body
from tests.test_cache import db_reads, metric

from catalog.cache import CircuitBreaker, GuardedRedis, InvalidationBoard, RedisCache, make_redis
from catalog.config import Settings

READERS = 20
PRODUCT_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("why", ["redis-down", "distrusted"])
def test_concurrent_reads_of_one_key_while_bypassing_read_the_database_once(
    settings: Settings,
    redis_server: RedisServer,
    make_client: Callable[[Settings], Any],
    database_url: str,
    why: str,
) -> None:
    """Redis killed (every read fails over to the database: result="error", or "bypass" once the circuit is
    open), or, besides, a write whose invalidation could not reach Redis (the pod distrusts Redis: "bypass");
    the products table locked
    in PostgreSQL so that 20 concurrent reads of one product all wait on the database: once it is released
    they all answer with the product, BYPASS, after one database read."""
    client = make_client(dataclasses.replace(settings, redis_url=redis_server.url))
    product = client.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
    path = f"/api/v1/products/{product['id']}"
    redis_server.kill()
    if why == "distrusted":
        body = product_body(sku=product["sku"], name="written while Redis was down")
        product = client.put(path, json=body, headers=auth()).get_json()
    assert client.get(path, headers=auth()).get_json() == product

    def counts() -> tuple[float, float]:
        text_ = client.get("/metrics").text
        served_around_redis = sum(
            metric(text_, "catalog_cache_requests_total", result=result) for result in ("bypass", "error")
        )
        return db_reads(text_), served_around_redis

    reads_before, bypassed_before = counts()
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as locker, ThreadPoolExecutor(READERS) as pool:
            locker.execute(text("LOCK TABLE products IN ACCESS EXCLUSIVE MODE"))
            answers = [pool.submit(client.get, path, headers=auth()) for _ in range(READERS)]
            poll(lambda: counts()[1] - bypassed_before == READERS, 10, "the reads did not all start")
            time.sleep(0.2)  # each is now waiting on the database, or on the one read that does
            locker.rollback()
            replies = [answer.result(timeout=10) for answer in answers]
    finally:
        engine.dispose()
    assert [(reply.status_code, reply.headers["X-Cache"]) for reply in replies] == [(200, "BYPASS")] * READERS
    assert all(reply.get_json() == product for reply in replies)
    reads = counts()[0] - reads_before
    print(f"{READERS} concurrent reads of one product while bypassing ({why}): {reads:.0f} database read(s)")
    assert reads == 1


@pytest.mark.parametrize("kind", ["product", "page"])
def test_a_read_that_starts_after_a_write_never_shares_a_load_that_started_before_it(
    redis_server: RedisServer, kind: str
) -> None:
    """The pod distrusts Redis; a slow load of the old value is under way and a second read has joined it; a
    write answers; a read starting now loads the new value itself, while the first two get the old one."""
    cache = RedisCache(
        GuardedRedis(make_redis(redis_server.url, None, 4), CircuitBreaker()), 60, InvalidationBoard(None)
    )
    cache.board.distrust_redis(1)

    def read(load: Callable[[], bytes]) -> tuple[bytes | None, str]:
        return cache.product(PRODUCT_ID, load) if kind == "product" else cache.page("20::", load)

    loads: list[str] = []
    release = threading.Event()

    def slow_old() -> bytes:
        loads.append("old")
        release.wait(5)
        return b"old"

    def must_not_run() -> bytes:
        loads.append("joined")
        return b"joined"

    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(read, slow_old)
            poll(lambda: loads == ["old"], 5, "the first load did not start")
            joined = pool.submit(read, must_not_run)
            time.sleep(0.1)
            assert cache.invalidate(PRODUCT_ID)
            started = time.monotonic()
            assert read(lambda: b"new") == (b"new", "BYPASS")
            assert time.monotonic() - started < 1, "the read after the write waited for the old load"
            release.set()
            assert first.result(timeout=5) == joined.result(timeout=5) == (b"old", "BYPASS")
        assert loads == ["old"]
    finally:
        release.set()
        cache.guarded.client.connection_pool.disconnect()
