"""Two gunicorn masters (two pods) on one Redis and one database: a write through one is gone from the
other's near-caches within 100 ms (the contract), measured; the invalidation listener killed or Redis
restarted never lets an old value through, and the near-cache is used again once the listener is back."""

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from tests.conftest import WRITER_KEY, RedisServer, SecretDir, ThreadLoop, auth, product_body
from tests.test_cache import create_product, server_env

from catalog.cache.keys import INVALIDATION_CHANNEL

# The contract: other pods that can reach Redis drop the old value within 100 ms.
OTHER_POD_SECONDS = 0.1
WRITES = 200


class Readers(ThreadLoop):
    """Threads reading a product through one server as fast as they can, each on its own keep-alive
    connection (so both workers answer), recording (started, version, X-Cache) for every read."""

    def __init__(self, url: str, threads: int = 4) -> None:
        super().__init__(threads)
        self.url = url
        self.reads: list[tuple[float, int, str]] = []
        self.failures: list[str] = []

    def _run(self, _index: int) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    answer = session.get(self.url, headers=auth(), timeout=10)
                except requests.RequestException as error:
                    self.failures.append(type(error).__name__)
                    continue
                if answer.status_code != 200:
                    self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                    continue
                self.reads.append((started, answer.json()["version"], answer.headers["X-Cache"]))


def stale_windows(answered: dict[int, float], reads: list[tuple[float, int, str]]) -> dict[int, float]:
    """For each write: how long after it answered a read could still start and see an older version
    (0 when none did)."""
    windows = dict.fromkeys(answered, 0.0)
    for started, seen, _cache in reads:
        for version, at in answered.items():
            if version > seen and at <= started:
                windows[version] = max(windows[version], started - at)
    return windows


@pytest.fixture
def pods(gunicorn: Any, database_url: str, keys_dir: SecretDir, redis_server: RedisServer) -> list[Any]:
    """Two masters of two workers each, one Redis, one database."""
    env = server_env(database_url, keys_dir, CATALOG_REDIS_URL=redis_server.url)
    return [gunicorn(env), gunicorn(env)]


def wait_for_subscribers(redis_server: RedisServer, count: int, seconds: float = 15) -> None:
    """Until `count` invalidation listeners are subscribed."""
    deadline = time.monotonic() + seconds
    with redis_server.client() as direct:
        while time.monotonic() < deadline:
            if (
                dict(direct.pubsub_numsub(INVALIDATION_CHANNEL)).get(INVALIDATION_CHANNEL.encode(), 0)
                >= count
            ):
                return
            time.sleep(0.05)
    raise AssertionError(f"fewer than {count} invalidation listeners subscribed")


def write_versions(url: str, sku: str, versions: range, pause: float = 0.03) -> dict[int, float]:
    """PUT each version through one server; when each answered (monotonic)."""
    answered: dict[int, float] = {}
    with requests.Session() as writer:
        for version in versions:
            time.sleep(pause)  # the readers fill the near-caches with the current version
            body = product_body(sku=sku, name=f"version {version}")
            answer = writer.put(url, json=body, headers={"X-Api-Key": WRITER_KEY}, timeout=10)
            assert (answer.status_code, answer.json()["version"]) == (200, version), answer.text
            answered[version] = time.monotonic()
    return answered


def test_a_write_through_one_pod_is_gone_from_the_other_within_100_ms(
    pods: list[Any], redis_server: RedisServer
) -> None:
    """200 writes through pod A while 4 readers hammer pod B: no read starting 100 ms or more after a write
    answered sees an older version; most reads are HITs (B's near-cache), so the window is B's."""
    writer_pod, reader_pod = pods
    wait_for_subscribers(redis_server, 4)
    product = create_product(writer_pod.url)
    path = f"/api/v1/products/{product['id']}"
    with Readers(reader_pod.url + path) as readers:
        time.sleep(0.3)
        answered = write_versions(writer_pod.url + path, product["sku"], range(2, 2 + WRITES))
        time.sleep(0.3)
    assert not readers.failures, readers.failures[:3]
    windows = stale_windows(answered, readers.reads)
    late = {version: window for version, window in windows.items() if window >= OTHER_POD_SECONDS}
    assert not late, f"old values read this long after the write answered: {late}"
    hits = sum(cache == "HIT" for _, _, cache in readers.reads)
    assert len(readers.reads) >= 4 * WRITES and hits >= len(readers.reads) // 2, (hits, len(readers.reads))
    ordered = sorted(windows.values())
    print(
        f"{len(readers.reads)} reads on pod B ({hits} HITs) over {WRITES} writes on pod A; window in which "
        f"B could still serve the old value: p50 {statistics.median(ordered) * 1000:.1f} ms, "
        f"p99 {ordered[int(len(ordered) * 0.99) - 1] * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )


def get_calls(redis_server: RedisServer) -> int:
    """GET commands Redis has run so far (a near-cache hit runs none)."""
    with redis_server.client() as direct:
        return int(direct.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def near_cache_in_use(url: str, redis_server: RedisServer) -> bool:
    """40 reads of a cached product cost Redis (almost) no GET."""
    before = get_calls(redis_server)
    with requests.Session() as session:
        for _ in range(40):
            assert session.get(url, headers=auth(), timeout=10).status_code == 200
    return get_calls(redis_server) - before < 10


def poll(check: Callable[[], bool], seconds: float, message: str) -> None:
    """Until `check()` holds."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


@pytest.fixture
def outage_kinds(redis_server: RedisServer) -> Iterator[dict[str, Callable[[], None]]]:
    """The two ways a listener loses its subscription."""
    with redis_server.client() as direct:

        def kill_listeners() -> None:
            assert direct.client_kill_filter(_type="pubsub") >= 1

        def restart() -> None:
            redis_server.kill()
            time.sleep(0.3)
            redis_server.start()

        yield {"client-kill": kill_listeners, "restart": restart}


@pytest.mark.parametrize("outage", ["client-kill", "restart"])
def test_listener_cut_off_never_lets_an_old_value_through_and_the_near_cache_comes_back(
    pods: list[Any], redis_server: RedisServer, outage_kinds: dict[str, Callable[[], None]], outage: str
) -> None:
    """Writes through pod A keep going while pod B's listeners lose their subscription (CLIENT KILL TYPE
    pubsub, or Redis killed and restarted empty): no read on B that starts 100 ms after a write answered
    sees an older version, at any time; once the listeners have subscribed again, B's reads are near-cache
    hits again (no GET reaches Redis)."""
    writer_pod, reader_pod = pods
    wait_for_subscribers(redis_server, 4)
    product = create_product(writer_pod.url)
    path = f"/api/v1/products/{product['id']}"
    poll(lambda: near_cache_in_use(reader_pod.url + path, redis_server), 10, "near-cache never used")
    answered: dict[int, float] = {}
    with Readers(reader_pod.url + path, threads=3) as readers:
        answered.update(write_versions(writer_pod.url + path, product["sku"], range(2, 12)))
        outage_kinds[outage]()
        answered.update(write_versions(writer_pod.url + path, product["sku"], range(12, 42), pause=0.05))
        wait_for_subscribers(redis_server, 4)
        answered.update(write_versions(writer_pod.url + path, product["sku"], range(42, 52)))
        time.sleep(0.3)
    assert not readers.failures, readers.failures[:3]
    windows = stale_windows(answered, readers.reads)
    late = {version: window for version, window in windows.items() if window >= OTHER_POD_SECONDS}
    assert not late, f"old values read this long after the write answered: {late}"
    assert len(readers.reads) > 100
    poll(lambda: near_cache_in_use(reader_pod.url + path, redis_server), 15, "near-cache not used again")
