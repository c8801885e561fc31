"""Read-through caching in Redis (L2) behind the per-worker near-cache (L1), with exact invalidation."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Collection, Hashable
from typing import Any

import redis

from catalog.cache.board import InvalidationBoard
from catalog.cache.client import CircuitOpen, GuardedRedis, RedisUnavailable
from catalog.cache.flight import SingleFlight
from catalog.cache.keys import (
    INVALIDATION_CHANNEL,
    LIST_TICKET,
    fill_lock,
    page_key,
    product_key,
    product_ticket,
)
from catalog.cache.memory import Loader, Status, new_ticket
from catalog.cache.near import NearCache
from catalog.metrics import CACHE_BYPASS, CACHE_ERROR, CACHE_HIT, CACHE_MISS

log = logging.getLogger(__name__)

# A miss that loses the fill race waits this long for the winner, then reads the database itself.
LOCK_MILLISECONDS = 2000
WAIT_FOR_FILL_SECONDS = 0.5
# It looks again after 2 ms, then twice as long each time up to 20 ms: a fill takes a few milliseconds, and
# every reader of an entry that just expired waits on it (a fixed 20 ms stalled all of them for 20-35 ms).
FIRST_WAIT_STEP_SECONDS = 0.002
MAX_WAIT_STEP_SECONDS = 0.02

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

# (value, or None; monotonic time it expires at in Redis, or None when nothing may be kept of it)
Found = tuple[bytes | None, float | None]


def fallback_result(error: RedisUnavailable) -> Any:
    """How a read served from the database is counted: `bypass` if the open circuit kept Redis out of it,
    `error` if Redis was called and failed."""
    return CACHE_BYPASS if isinstance(error, CircuitOpen) else CACHE_ERROR


class RedisCache:
    """Cache-aside in Redis with tickets (exact invalidation) and a fill lock (stampede protection), and the
    near-cache in front of it.

    A ticket is a random token per product (and one for all list pages) that every write replaces. A reader
    takes the current ticket (creating one if there is none) before it reads the database and fills only if
    the ticket is still the same, so a fill can never store what a write made old. A write also publishes
    the product's id, on which every worker's listener drops the product and the list pages from its
    near-cache. Reads that bypass Redis (this pod distrusts it, its circuit is open, or it failed) share one
    database load per key in this worker.
    """

    def __init__(
        self, guarded: GuardedRedis, ttl_seconds: int, board: InvalidationBoard, near: NearCache | None = None
    ) -> None:
        self.guarded = guarded
        self.ttl_seconds = ttl_seconds
        self.board = board
        self.near = near or NearCache(board)
        self._fill = guarded.register_script(FILL_SCRIPT)
        self._flights = SingleFlight()

    @property
    def ticket_ttl_ms(self) -> int:
        """Tickets outlive every entry filled under them."""
        return max(self.ttl_seconds * 10, 3600) * 1000

    def product(self, product_id: str, load: Loader) -> tuple[bytes | None, Status]:
        """The cached product entry, or `load()` stored under the product's ticket."""
        near = self.near
        if not self.board.redis_trusted():
            return self._bypass("p" + product_id, near.product_token(product_id), load, CACHE_BYPASS)
        token = None
        if not self.guarded.breaker.is_open and near.usable():
            value = near.product(product_id)
            if value is not None:
                CACHE_HIT.inc()
                return value, "HIT"
            token = near.product_token(product_id)
        stamp = token if token is not None else near.product_token(product_id)
        value, status, expires_at = self._read_through(
            product_key(product_id), product_ticket(product_id), load, ("p" + product_id, stamp)
        )
        if token is not None and value is not None and expires_at is not None:
            near.put_product(product_id, value, expires_at, token)
        return value, status

    def page(self, params: str, load: Loader) -> tuple[bytes | None, Status]:
        """A cached list page, keyed by the list ticket that every write replaces."""
        near = self.near
        if not self.board.redis_trusted():
            return self._bypass("l" + params, near.page_token(), load, CACHE_BYPASS)
        token = None
        if not self.guarded.breaker.is_open and near.usable():
            value = near.page(params)
            if value is not None:
                CACHE_HIT.inc()
                return value, "HIT"
            token = near.page_token()
        stamp = token if token is not None else near.page_token()
        try:
            generation = self.guarded.call(self._take_list_ticket)
        except RedisUnavailable as error:
            return self._bypass("l" + params, stamp, load, fallback_result(error))
        value, status, expires_at = self._read_through(
            page_key(generation, params), LIST_TICKET, load, ("l" + params, stamp), generation
        )
        if token is not None and value is not None and expires_at is not None:
            near.put_page(params, value, expires_at, token)
        return value, status

    def invalidate(self, product_id: str, pending: int | None = None) -> bool:
        """Retire the product's entry and every cached page in Redis and in every worker's near-cache (this
        one's at once); True when Redis took it. When it did not, `pending` (the outbox row that holds the
        invalidation until it is delivered, by this pod or another's sweeper: catalog.outbox) is what every
        worker of this pod waits for before it trusts Redis again."""
        self.near.drop(product_id)
        try:
            self.deliver([product_id])
        except RedisUnavailable:
            # Redis may still hold the old entry: no worker of this pod may read it until it is delivered.
            if pending is not None:
                self.board.distrust_redis(pending)
            log.warning("cache invalidation pending: redis unavailable", extra={"product_id": product_id})
            return False
        finally:
            # Every worker of this master stops serving its near-cached copy before the write answers (and
            # a reader that took its token before this read Redis before the delete, so it is refused).
            self.board.bump(self.board.slot(product_id), InvalidationBoard.LISTS)
            self.near.drop(product_id)
        return True

    def deliver(self, product_ids: Collection[str]) -> None:
        """In one Redis transaction: delete the products' entries, replace their tickets and the list ticket,
        and publish each id to every worker's listener; RedisUnavailable if Redis did not take it."""

        def send(client: redis.Redis) -> None:
            with client.pipeline(transaction=True) as pipe:
                for product_id in product_ids:
                    pipe.delete(product_key(product_id))
                    pipe.set(product_ticket(product_id), new_ticket(), px=self.ticket_ttl_ms)
                pipe.set(LIST_TICKET, new_ticket(), px=self.ticket_ttl_ms)
                for product_id in product_ids:
                    pipe.publish(INVALIDATION_CHANNEL, product_id)
                pipe.execute()

        self.guarded.call(send)

    def check(self) -> str:
        """'ok' when Redis answers PING, else 'degraded' (a half-open circuit lets this probe)."""
        try:
            self.guarded.call(lambda r: r.ping())
        except RedisUnavailable:
            return "degraded"
        return "ok"

    def _take_list_ticket(self, client: redis.Redis) -> bytes:
        with client.pipeline(transaction=False) as pipe:
            pipe.set(LIST_TICKET, new_ticket(), nx=True, px=self.ticket_ttl_ms)
            pipe.get(LIST_TICKET)
            return pipe.execute()[1]  # type: ignore[no-any-return]

    @staticmethod
    def _get(key: str) -> Any:
        """The value of `key` and its remaining milliseconds, in one round trip."""

        def read(client: redis.Redis) -> Found:
            asked_at = time.monotonic()  # the entry's time left counts from no later than this
            with client.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                value, pttl = pipe.execute()
            expires_at = asked_at + pttl / 1000 if value is not None and pttl > 0 else None
            return value, expires_at

        return read

    def _bypass(self, key: str, stamp: Hashable, load: Loader, counter: Any) -> tuple[bytes | None, Status]:
        """The database's answer, Redis not consulted; concurrent reads of `key` share one load, unless an
        invalidation reached this worker between their starts (`stamp` is the near-cache's token)."""
        counter.inc()
        return self._flights.load(key, stamp, load), "BYPASS"

    def _read_through(
        self,
        key: str,
        ticket_key: str,
        load: Loader,
        flight: tuple[str, Hashable],
        ticket: bytes | None = None,
    ) -> tuple[bytes | None, Status, float | None]:
        lock_key = fill_lock(key)

        def claim(client: redis.Redis) -> list[Any]:
            with client.pipeline(transaction=False) as pipe:
                pipe.set(lock_key, b"1", nx=True, px=LOCK_MILLISECONDS)
                pipe.set(ticket_key, new_ticket(), nx=True, px=self.ticket_ttl_ms)
                pipe.get(ticket_key)
                return pipe.execute()

        try:
            cached, expires_at = self.guarded.call(self._get(key))
            if cached is not None:
                CACHE_HIT.inc()
                return cached, "HIT", expires_at
            won, _created, current_ticket = self.guarded.call(claim)
        except RedisUnavailable as error:
            value, status = self._bypass(*flight, load, fallback_result(error))
            return value, status, None
        if not won:
            waited, expires_at = self._wait_for_fill(key)
            if waited is not None:
                CACHE_HIT.inc()
                return waited, "HIT", expires_at
            CACHE_MISS.inc()
            return load(), "MISS", None
        CACHE_MISS.inc()
        value = load()
        ttl_ms = int(self.ttl_seconds * 1000 * random.uniform(0.9, 1.1))  # noqa: S311 - jitter, not security
        # Redis keeps the entry at least this long after the fill: the near-cache keeps it no longer.
        expires_at = time.monotonic() + ttl_ms / 1000
        # A page key already names its ticket; the product's is the one taken before the database read.
        expected = ticket if ticket is not None else current_ticket
        try:
            if value is None or not self.board.redis_trusted():
                self.guarded.call(lambda r: r.delete(lock_key))
                return value, "MISS", None
            stored = self.guarded.call(
                lambda r: self._fill(
                    keys=[key, ticket_key, lock_key], args=[expected, value, ttl_ms], client=r
                )
            )
        except RedisUnavailable:
            return value, "MISS", None
        return value, "MISS", expires_at if stored == 1 else None

    def _wait_for_fill(self, key: str) -> Found:
        deadline = time.monotonic() + WAIT_FOR_FILL_SECONDS
        step = FIRST_WAIT_STEP_SECONDS
        while time.monotonic() < deadline:
            time.sleep(step)
            step = min(step * 2, MAX_WAIT_STEP_SECONDS)
            try:
                value, expires_at = self.guarded.call(self._get(key))
            except RedisUnavailable:
                return None, None
            if value is not None:
                return value, expires_at
        return None, None
