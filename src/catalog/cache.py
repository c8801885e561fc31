"""Read-through cache: Redis behind a circuit breaker, or a bounded in-process cache; never an outage."""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import random
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import redis
from flask import Flask, g, has_request_context
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.credentials import CredentialProvider
from redis.retry import Retry

from catalog.config import Settings, read_secret_file
from catalog.metrics import CACHE_CIRCUIT_OPEN, CACHE_REQUESTS

log = logging.getLogger(__name__)

# Bump when the cached shape of a product or page changes: a deploy then never reads old entries.
CACHE_SCHEMA = 1
PREFIX = f"catalog:v{CACHE_SCHEMA}:"
# A dead or paused Redis must cost a request at most about 2 x the timeout (connect, then read).
SOCKET_TIMEOUT_SECONDS = 0.2
RETRIES = 1
HEALTH_CHECK_SECONDS = 10
FAILURES_TO_OPEN = 3
OPEN_SECONDS = 3.0
# A miss that loses the fill race waits this long for the winner, then reads the database itself.
LOCK_MILLISECONDS = 2000
WAIT_FOR_FILL_SECONDS = 0.5
WAIT_STEP_SECONDS = 0.02
# A fill that checked the board just before a write's invalidation failed lands within this margin.
DISTRUST_MARGIN_SECONDS = 5.0
# The in-process cache holds at most this many bytes of values per worker.
MEMORY_CACHE_BYTES = 64 * 1024 * 1024

Status = Literal["HIT", "MISS", "BYPASS"]
Loader = Callable[[], bytes | None]


class CircuitBreaker:
    """Closed until FAILURES_TO_OPEN consecutive failures; open for OPEN_SECONDS; then one probe at a time."""

    def __init__(self, failures_to_open: int = FAILURES_TO_OPEN, open_seconds: float = OPEN_SECONDS) -> None:
        self.failures_to_open = failures_to_open
        self.open_seconds = open_seconds
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        """True while calls are refused (open, or half-open with a probe under way)."""
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a call go to Redis now?"""
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probing or time.monotonic() - self._opened_at < self.open_seconds:
                return False
            self._probing = True
            return True

    def succeeded(self) -> None:
        """A call answered: close the circuit."""
        if self._failures or self._opened_at is not None:
            with self._lock:
                was_open = self._opened_at is not None
                self._failures, self._opened_at, self._probing = 0, None, False
            if was_open:
                CACHE_CIRCUIT_OPEN.set(0)
                log.info("redis circuit closed")

    def failed(self) -> None:
        """A call failed: count it, and open (again) at the threshold."""
        with self._lock:
            self._failures += 1
            self._probing = False
            newly_open = self._opened_at is None and self._failures >= self.failures_to_open
            if self._opened_at is not None or newly_open:
                self._opened_at = time.monotonic()
        if newly_open:
            CACHE_CIRCUIT_OPEN.set(1)
            log.warning("redis circuit opened", extra={"failures": self._failures})


class PasswordFileProvider(CredentialProvider):
    """Reads the Redis password from its mounted Secret on each new connection: rotation needs no restart."""

    def __init__(self, path: str, username: str | None) -> None:
        self.path = path
        self.username = username

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        # redis-py drops a half-made connection on a RedisError; an OSError would leave it unauthenticated.
        try:
            password = read_secret_file(self.path)
        except OSError as error:
            raise redis.AuthenticationError(
                f"the Redis password file cannot be read: {error.strerror}"
            ) from None
        return (self.username, password) if self.username else (password,)


def make_redis(url: str, password_file: str | None, pool_size: int) -> redis.Redis:
    """A client that fails fast: short timeouts, one immediate retry, connection health checks.

    Options in the URL's query (e.g. `ssl_ca_certs` for `rediss://`) override these defaults."""
    options: dict[str, Any] = {
        "max_connections": pool_size,
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_keepalive": True,
        # A dropped connection is worth one immediate retry; a timeout is not: a Redis that did not answer
        # in time will not answer the retry either, and retrying (health-check PING, then command, each
        # with its own retry) made one call to a paused Redis cost 4 x the timeout instead of 1-2 x.
        "retry": Retry(NoBackoff(), RETRIES, supported_errors=(redis.ConnectionError,)),
        "retry_on_error": [redis.ConnectionError],
        "health_check_interval": HEALTH_CHECK_SECONDS,
        "client_name": "catalog",
        **parse_url(url),  # type: ignore[no-untyped-call]
    }
    if password_file:
        options["credential_provider"] = PasswordFileProvider(password_file, options.pop("username", None))
        options.pop("password", None)
    return redis.Redis(connection_pool=redis.ConnectionPool(**options))


class RedisUnavailable(Exception):
    """Redis was not consulted: circuit open, or it already failed during this request."""


class GuardedRedis:
    """Every Redis call of the process goes through here: breaker, one failure per request, error logging."""

    def __init__(self, client: redis.Redis, breaker: CircuitBreaker) -> None:
        self.client = client
        self.breaker = breaker
        self._after_recovery: dict[str, Callable[[redis.Redis], None]] = {}
        self._lock = threading.Lock()

    def call(self, operation: Callable[[redis.Redis], Any]) -> Any:
        """Run `operation(client)`; raise RedisUnavailable instead of waiting on a Redis that is failing."""
        if has_request_context() and g.get("redis_failed"):
            raise RedisUnavailable
        if not self.breaker.allow():
            raise RedisUnavailable
        try:
            if self._after_recovery:
                self._replay_pending()
            result = operation(self.client)
        # Whatever goes wrong talking to Redis (also a bug in a script) is a miss, never a failed request.
        except Exception as error:
            self.breaker.failed()
            if has_request_context():
                g.redis_failed = True
            log.warning("redis call failed", extra={"error_type": type(error).__name__})
            raise RedisUnavailable from error
        self.breaker.succeeded()
        return result

    @staticmethod
    def remember(values: dict[str, bytes | None]) -> None:
        """Keep values read ahead in another call of this request (the rate limiter's round trip)."""
        g.redis_prefetched = values

    @staticmethod
    def prefetched(key: str) -> tuple[bool, bytes | None]:
        """(True, value) if this request already read `key`, else (False, None); each read is used once."""
        values: dict[str, bytes | None] | None = g.get("redis_prefetched") if has_request_context() else None
        if values is None or key not in values:
            return False, None
        return True, values.pop(key)

    def defer(self, key: str, operation: Callable[[redis.Redis], None]) -> None:
        """Run `operation` before the next call that reaches Redis (an invalidation that could not be sent);
        a later one with the same key replaces it, so a long outage holds one per key."""
        with self._lock:
            self._after_recovery.pop(key, None)
            self._after_recovery[key] = operation

    def _replay_pending(self) -> None:
        with self._lock:
            pending, self._after_recovery = self._after_recovery, {}
        try:
            while pending:
                key = next(iter(pending))
                pending[key](self.client)
                del pending[key]
        except Exception:
            with self._lock:
                self._after_recovery = {**pending, **self._after_recovery}
            raise


class InvalidationBoard:
    """Counters shared by the workers of one gunicorn master (an mmap'ed file), bumped by every write.

    An in-process entry is valid only while its counter is unchanged, so a write in one worker retires the
    entries of every worker at once. One more slot holds until when Redis must not be trusted by any worker
    because a write could not invalidate it.
    """

    SLOTS = 4096
    LISTS = SLOTS  # the list generation
    DISTRUST = SLOTS + 1  # CLOCK_MONOTONIC nanoseconds (one clock for every process of the host)

    def __init__(self, path: str | None) -> None:
        size = (self.SLOTS + 2) * 8
        if path:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
        else:
            self._fd = None
            self._map = mmap.mmap(-1, size)
        self._lock = threading.Lock()

    @classmethod
    def slot(cls, product_id: str) -> int:
        """The counter a product's entries depend on."""
        return zlib.crc32(product_id.encode()) % cls.SLOTS

    def read(self, slot: int) -> int:
        """The counter's current value."""
        return struct.unpack_from("<Q", self._map, slot * 8)[0]  # type: ignore[no-any-return]

    def bump(self, *slots: int) -> None:
        """Increment counters, serialised across threads and processes."""

        def increment() -> None:
            for slot in slots:
                self._write(slot, self.read(slot) + 1)

        self._update(increment)

    def distrust_redis(self, seconds: float) -> None:
        """No worker reads or fills Redis entries for the next `seconds`."""
        until = time.monotonic_ns() + int(seconds * 1e9)
        self._update(lambda: self._write(self.DISTRUST, max(until, self.read(self.DISTRUST))))

    def redis_trusted(self) -> bool:
        """False while a write's invalidation may be missing from Redis."""
        return time.monotonic_ns() >= self.read(self.DISTRUST)

    def _write(self, slot: int, value: int) -> None:
        struct.pack_into("<Q", self._map, slot * 8, value)

    def _update(self, change: Callable[[], object]) -> None:
        with self._lock:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                change()
            finally:
                if self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)


# Fill only if nobody invalidated since the reader took its ticket; drop the fill lock either way.
FILL_SCRIPT = """
local current = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[3])
if current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


def new_ticket() -> bytes:
    """A value never seen before: a ticket key that was evicted or lost in a restart cannot match again."""
    return os.urandom(12).hex().encode()


@dataclass
class RedisCache:
    """Cache-aside in Redis with tickets (exact invalidation) and a fill lock (stampede protection).

    A ticket is a random token per product (and one for all list pages) that every write replaces. A reader
    takes the current ticket (creating one if there is none) before it reads the database and fills only if
    the ticket is still the same, so a fill can never store what a write made old.
    """

    guarded: GuardedRedis
    ttl_seconds: int
    board: InvalidationBoard
    _fill: Any = field(init=False)

    def __post_init__(self) -> None:
        self._fill = self.guarded.client.register_script(FILL_SCRIPT)

    @property
    def ticket_ttl_ms(self) -> int:
        """Tickets outlive every entry filled under them."""
        return max(self.ttl_seconds * 10, 3600) * 1000

    @staticmethod
    def product_key(product_id: str) -> str:
        """Where a product's entry lives (the rate limiter's round trip reads it ahead)."""
        return f"{PREFIX}product:{product_id}"

    def read_ahead(self, product_id: str) -> list[str]:
        """The keys a read of this product starts with, while Redis is trusted."""
        return [self.product_key(product_id)] if self.board.redis_trusted() else []

    def product(self, product_id: str, load: Loader) -> tuple[bytes | None, Status]:
        """The cached product entry, or `load()` stored under the product's ticket."""
        if not self.board.redis_trusted():
            return self._bypass(load, "bypass")
        return self._read_through(self.product_key(product_id), f"{PREFIX}ticket:{product_id}", load)

    def page(self, params: str, load: Loader) -> tuple[bytes | None, Status]:
        """A cached list page, keyed by the list ticket that every write replaces."""
        if not self.board.redis_trusted():
            return self._bypass(load, "bypass")
        ticket_key = f"{PREFIX}lists"
        try:
            generation = self.guarded.call(lambda r: self._take_ticket(r, ticket_key))
        except RedisUnavailable:
            return self._bypass(load, "error")
        return self._read_through(
            f"{PREFIX}list:{generation.decode()}:{params}", ticket_key, load, generation
        )

    def invalidate(self, product_id: str) -> None:
        """Drop the product's entry and retire every cached page; deferred if Redis cannot take it now."""

        def send(client: redis.Redis) -> None:
            with client.pipeline(transaction=True) as pipe:
                pipe.delete(self.product_key(product_id))
                pipe.set(f"{PREFIX}ticket:{product_id}", new_ticket(), px=self.ticket_ttl_ms)
                pipe.set(f"{PREFIX}lists", new_ticket(), px=self.ticket_ttl_ms)
                pipe.execute()

        try:
            self.guarded.call(send)
        except RedisUnavailable:
            # Redis may still hold the old entry; no worker of this pod may read it until it has expired.
            self.board.distrust_redis(self.ttl_seconds * 1.1 + DISTRUST_MARGIN_SECONDS)
            self.guarded.defer(product_id, send)
            log.warning("cache invalidation deferred: redis unavailable", extra={"product_id": product_id})

    def check(self) -> str:
        """'ok' when Redis answers PING, else 'degraded' (a half-open circuit lets this probe)."""
        try:
            self.guarded.call(lambda r: r.ping())
        except RedisUnavailable:
            return "degraded"
        return "ok"

    def _take_ticket(self, client: redis.Redis, ticket_key: str) -> bytes:
        with client.pipeline(transaction=False) as pipe:
            pipe.set(ticket_key, new_ticket(), nx=True, px=self.ticket_ttl_ms)
            pipe.get(ticket_key)
            return pipe.execute()[1]  # type: ignore[no-any-return]

    def _read_through(
        self, key: str, ticket_key: str, load: Loader, ticket: bytes | None = None
    ) -> tuple[bytes | None, Status]:
        lock_key = f"{PREFIX}lock:{key}"

        def claim(client: redis.Redis) -> list[Any]:
            with client.pipeline(transaction=False) as pipe:
                pipe.set(lock_key, b"1", nx=True, px=LOCK_MILLISECONDS)
                pipe.set(ticket_key, new_ticket(), nx=True, px=self.ticket_ttl_ms)
                pipe.get(ticket_key)
                return pipe.execute()

        try:
            found, cached = self.guarded.prefetched(key)
            if not found:
                cached = self.guarded.call(lambda r: r.get(key))
            if cached is not None:
                CACHE_REQUESTS.labels(result="hit").inc()
                return cached, "HIT"
            won, _created, current_ticket = self.guarded.call(claim)
        except RedisUnavailable:
            return self._bypass(load, "error")
        if not won:
            waited = self._wait_for_fill(key)
            if waited is not None:
                CACHE_REQUESTS.labels(result="hit").inc()
                return waited, "HIT"
            CACHE_REQUESTS.labels(result="miss").inc()
            return load(), "MISS"
        CACHE_REQUESTS.labels(result="miss").inc()
        value = load()
        ttl_ms = int(self.ttl_seconds * 1000 * random.uniform(0.9, 1.1))  # noqa: S311 - jitter, not security
        # A page key already names its ticket; the product's is the one taken before the database read.
        expected = ticket if ticket is not None else current_ticket
        try:
            if value is None or not self.board.redis_trusted():
                self.guarded.call(lambda r: r.delete(lock_key))
            else:
                self.guarded.call(
                    lambda r: self._fill(
                        keys=[key, ticket_key, lock_key], args=[expected, value, ttl_ms], client=r
                    )
                )
        except RedisUnavailable:
            pass
        return value, "MISS"

    def _wait_for_fill(self, key: str) -> bytes | None:
        deadline = time.monotonic() + WAIT_FOR_FILL_SECONDS
        while time.monotonic() < deadline:
            time.sleep(WAIT_STEP_SECONDS)
            try:
                value = self.guarded.call(lambda r: r.get(key))
            except RedisUnavailable:
                return None
            if value is not None:
                return value  # type: ignore[no-any-return]
        return None

    @staticmethod
    def _bypass(load: Loader, result: str) -> tuple[bytes | None, Status]:
        CACHE_REQUESTS.labels(result=result).inc()
        return load(), "BYPASS"


class MemoryCache:
    """A per-worker LRU bounded in bytes, with TTL, kept exact across workers by the invalidation board."""

    FILL_LOCKS = 64

    def __init__(
        self, ttl_seconds: int, board: InvalidationBoard, max_bytes: int = MEMORY_CACHE_BYTES
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.board = board
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[float, int, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # Striped, so the locks stay few whatever keys (e.g. unknown ids) are asked for.
        self._fill_locks = [threading.Lock() for _ in range(self.FILL_LOCKS)]

    def read_ahead(self, product_id: str) -> list[str]:
        """Nothing in Redis to read ahead."""
        return []

    def product(self, product_id: str, load: Loader) -> tuple[bytes | None, Status]:
        """The cached product entry, or `load()` remembered until a write bumps its counter."""
        return self._read_through(f"product:{product_id}", self.board.slot(product_id), load)

    def page(self, params: str, load: Loader) -> tuple[bytes | None, Status]:
        """A cached list page, retired by any write."""
        return self._read_through(f"list:{params}", InvalidationBoard.LISTS, load)

    def invalidate(self, product_id: str) -> None:
        """Retire the product's entries and every page, in all workers."""
        self.board.bump(self.board.slot(product_id), InvalidationBoard.LISTS)

    def check(self) -> str:
        """The in-process cache is always available."""
        return "ok"

    def _lookup(self, key: str, slot: int) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires_at, stamp, value = entry
            if expires_at < time.monotonic() or stamp != self.board.read(slot):
                return None
            self._entries.move_to_end(key)
            return value

    def _store(self, key: str, stamp: int, value: bytes) -> None:
        ttl = self.ttl_seconds * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not security
        with self._lock:
            replaced = self._entries.pop(key, None)
            if replaced is not None:
                self._bytes -= len(replaced[2])
            self._entries[key] = (time.monotonic() + ttl, stamp, value)
            self._bytes += len(value)
            while self._bytes > self.max_bytes and self._entries:
                _evicted, (_expires, _stamp, old) = self._entries.popitem(last=False)
                self._bytes -= len(old)

    def _read_through(self, key: str, slot: int, load: Loader) -> tuple[bytes | None, Status]:
        value = self._lookup(key, slot)
        if value is not None:
            CACHE_REQUESTS.labels(result="hit").inc()
            return value, "HIT"
        with self._fill_locks[zlib.crc32(key.encode()) % self.FILL_LOCKS]:
            value = self._lookup(key, slot)
            if value is not None:
                CACHE_REQUESTS.labels(result="hit").inc()
                return value, "HIT"
            CACHE_REQUESTS.labels(result="miss").inc()
            # Read before the database: a write that lands meanwhile bumps it past this stamp.
            stamp = self.board.read(slot)
            value = load()
            if value is not None:
                self._store(key, stamp, value)
        return value, "MISS"


class NoCache:
    """Caching switched off (TTL 0): every read goes to the database and says BYPASS."""

    def read_ahead(self, product_id: str) -> list[str]:
        """Nothing in Redis to read ahead."""
        return []

    def product(self, product_id: str, load: Loader) -> tuple[bytes | None, Status]:
        """Read from the database."""
        CACHE_REQUESTS.labels(result="bypass").inc()
        return load(), "BYPASS"

    def page(self, params: str, load: Loader) -> tuple[bytes | None, Status]:
        """Read from the database."""
        CACHE_REQUESTS.labels(result="bypass").inc()
        return load(), "BYPASS"

    def invalidate(self, product_id: str) -> None:
        """Nothing is cached."""

    def check(self) -> str:
        """Caching is off by configuration."""
        return "disabled"


Cache = RedisCache | MemoryCache | NoCache
BOARD_ENV = "CATALOG_CACHE_BOARD"


def make_cache(settings: Settings, guarded: GuardedRedis | None) -> Cache:
    """Redis when configured, else in-process; off when the TTL is 0."""
    if settings.cache_ttl_seconds == 0:
        return NoCache()
    board = InvalidationBoard(os.environ.get(BOARD_ENV))
    if guarded is not None:
        return RedisCache(guarded, settings.cache_ttl_seconds, board)
    return MemoryCache(settings.cache_ttl_seconds, board)


def init_app(app: Flask) -> None:
    """Build this process's Redis client (shared with the rate limiter) and the cache."""
    settings: Settings = app.config["SETTINGS"]
    guarded = None
    if settings.redis_url:
        client = make_redis(
            settings.redis_url, settings.redis_password_file, pool_size=settings.threads * 2 + 4
        )
        guarded = GuardedRedis(client, CircuitBreaker())
        CACHE_CIRCUIT_OPEN.set(0)
    app.extensions["catalog.redis"] = guarded
    app.extensions["catalog.cache"] = make_cache(settings, guarded)
