"""The per-worker near-cache on its own: bounded in bytes (also under 100,000 distinct keys, measured with
tracemalloc), never outliving an entry's expiry, never storing a fill that raced an invalidation, unused
while its listener is not subscribed; and the JSON entry's version read off its end."""

import gc
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from tests.conftest import RedisServer, poll

from catalog.cache import CircuitBreaker, GuardedRedis, InvalidationBoard, NearCache, make_redis
from catalog.cache.keys import INVALIDATION_CHANNEL
from catalog.cache.near import RECHECK_SECONDS, InvalidationListener
from catalog.products import encode_entry, entry_version


@pytest.fixture
def listening() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of sockets: the listener's end, and Redis' end of it."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield ours, theirs


@pytest.fixture
def near(tmp_path: Path, listening: tuple[socket.socket, socket.socket]) -> NearCache:
    """A live near-cache of 1 MiB on a board of its own."""
    cache = NearCache(InvalidationBoard(str(tmp_path / "board")), max_bytes=1024 * 1024)
    cache.enable(listening[0])
    return cache


def fill(near: NearCache, count: int, value: bytes) -> None:
    """`count` distinct products, each stored under a fresh token, valid for a minute."""
    expires_at = time.monotonic() + 60
    for index in range(count):
        product_id = f"01ARZ3NDEKTSV4RRFF{index:08d}"
        near.put_product(product_id, value, expires_at, near.product_token(product_id))


def test_memory_stays_within_the_bound_under_100000_distinct_keys(
    tmp_path: Path, listening: tuple[socket.socket, socket.socket]
) -> None:
    """Whatever is asked for, the entries never hold more than the bound: counted by the cache itself and
    measured by tracemalloc (what the filled cache holds beyond the empty one)."""
    bound = 4 * 1024 * 1024
    gc.collect()
    tracemalloc.start()
    try:
        near = NearCache(InvalidationBoard(str(tmp_path / "board")), max_bytes=bound)
        near.enable(listening[0])
        empty, _peak = tracemalloc.get_traced_memory()
        fill(near, 100_000, b"x" * 200)
        gc.collect()
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < near.bytes_used <= bound
    assert 1000 < len(near) < 100_000, "the bound was not reached, or nothing stayed"
    measured = held - empty
    print(f"{len(near)} entries kept of 100,000: counted {near.bytes_used} B, measured {measured} B")
    assert measured <= bound, f"{measured} bytes held for a bound of {bound}"


def test_an_entry_never_outlives_its_expiry(near: NearCache) -> None:
    """The near-cache keeps an entry no longer than Redis keeps the one it copies."""
    product_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    near.put_product(product_id, b"v1", time.monotonic() + 0.2, near.product_token(product_id))
    assert near.product(product_id) == b"v1"
    time.sleep(0.25)
    assert near.product(product_id) is None
    near.put_page("20::", b"page", time.monotonic() - 1, near.page_token())
    assert near.page("20::") is None


def test_a_fill_that_raced_an_invalidation_is_refused(near: NearCache) -> None:
    """A reader takes its token, a write's invalidation arrives (from this master or another pod), then the
    reader's value (read before it) must not be stored; for products and pages alike."""
    product_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    expires_at = time.monotonic() + 60
    for invalidate in (
        lambda: near.drop(product_id),  # a message from another pod, or this worker's own write
        lambda: near.board.bump(near.board.slot(product_id), InvalidationBoard.LISTS),  # this master's
    ):
        product_token, page_token = near.product_token(product_id), near.page_token()
        invalidate()
        near.put_product(product_id, b"old", expires_at, product_token)
        near.put_page("20::", b"old page", expires_at, page_token)
        assert near.product(product_id) is None
        assert near.page("20::") is None

    near.put_product(product_id, b"new", expires_at, near.product_token(product_id))
    near.put_page("20::", b"new page", expires_at, near.page_token())
    assert (near.product(product_id), near.page("20::")) == (b"new", b"new page")
    near.board.bump(near.board.slot(product_id), InvalidationBoard.LISTS)  # a write in another worker
    assert (near.product(product_id), near.page("20::")) == (None, None)


def test_not_usable_while_an_invalidation_waits_in_the_listeners_socket_or_is_being_applied(
    near: NearCache, listening: tuple[socket.socket, socket.socket]
) -> None:
    """A message another pod's write published is in this worker's socket before that write answers; until
    the listener has taken it out and applied it, no read may use the near-cache (however long the listener
    thread waits for the CPU), once the last check that found the socket empty has lapsed."""
    ours, redis_end = listening
    assert near.usable()
    redis_end.sendall(b"*3\r\n$7\r\nmessage\r\n")  # the start of a message: enough to be waiting
    time.sleep(RECHECK_SECONDS)
    assert not near.usable()
    ours.recv(100)  # the listener takes it out of the socket ...
    near.reading = True  # ... having said so first
    assert not near.usable()
    near.reading = False  # applied
    assert near.usable()
    near.disable()
    assert not near.usable()


def test_a_published_invalidation_stops_near_cache_hits_before_any_thread_reads_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """On a real subscription: once another pod's write has published (before it answers), this worker's
    near-cache is not used (after RECHECK_SECONDS at most), even though no listener thread has run since."""
    near = NearCache(InvalidationBoard(str(tmp_path / "board")))
    with redis_server.client() as subscriber, redis_server.client() as other_pod:
        pubsub = subscriber.pubsub()
        pubsub.subscribe(INVALIDATION_CHANNEL)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        near.enable(pubsub.connection._get_socket())
        assert near.usable()
        assert other_pod.publish(INVALIDATION_CHANNEL, "01ARZ3NDEKTSV4RRFFQ69G5FAV") == 1
        deadline = time.monotonic() + 1
        while near.usable():  # the message crosses the loopback interface (microseconds)
            assert time.monotonic() < deadline, "the published invalidation never reached the socket"
        assert not near.usable()
        pubsub.close()


def test_each_new_subscription_loads_the_lua_scripts_a_restarted_redis_lost(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A Redis restarted empty has lost the scripts: the listener's next subscription loads them before the
    near-cache is used again, so a request's first EVALSHA is not a NOSCRIPT error (an ERROR span)."""
    guarded = GuardedRedis(make_redis(redis_server.url, None, 4), CircuitBreaker())
    script = guarded.register_script("return redis.call('GET', KEYS[1])")
    listener = InvalidationListener(
        lambda: make_redis(redis_server.url, None, 1, retries=0, health_check_seconds=0),
        NearCache(InvalidationBoard(str(tmp_path / "board"))),
        guarded.load_scripts,
    )
    stop = threading.Event()
    thread = threading.Thread(target=listener.run, args=(stop,))
    thread.start()
    try:
        poll(lambda: listener.subscriptions == 1, 10, "the listener did not subscribe")
        with redis_server.client() as direct:
            assert direct.script_exists(script.sha) == [True]
        redis_server.kill()
        redis_server.start()
        with redis_server.client() as direct:
            assert direct.script_exists(script.sha) == [False], "the restart kept the script"
        poll(lambda: listener.subscriptions == 2, 10, "the listener did not subscribe again")
        with redis_server.client() as direct:
            assert direct.script_exists(script.sha) == [True]
    finally:
        stop.set()
        thread.join(10)
        guarded.client.connection_pool.disconnect()


def test_unused_and_empty_while_the_listener_is_not_subscribed(
    near: NearCache, listening: tuple[socket.socket, socket.socket]
) -> None:
    """Disabled: everything goes and nothing is stored; enabled again: it starts from nothing."""
    product_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    expires_at = time.monotonic() + 60
    token = near.product_token(product_id)
    near.put_product(product_id, b"v1", expires_at, token)
    near.disable()
    assert not near.live and len(near) == 0
    near.put_product(product_id, b"v1", expires_at, near.product_token(product_id))
    assert len(near) == 0
    near.enable(listening[0])
    near.put_product(product_id, b"v2", expires_at, token)  # taken before the outage: refused
    assert near.product(product_id) is None


def test_the_version_is_read_off_the_entry_without_parsing_it() -> None:
    """`encode_entry` puts the version last, so the ETag needs no JSON parse."""
    row = {
        "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "sku": "A-1",
        "name": 'a "quoted": name',
        "description": "x:1}",
        "price_cents": 1,
        "currency": "EUR",
        "tags": ["a:b"],
        "created_at": datetime(2026, 1, 1),
        "updated_at": datetime(2026, 1, 1),
        "version": 1234,
    }
    assert entry_version(encode_entry(row)) == "1234"
