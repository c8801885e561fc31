"""Rate limits per API client, and per IP for failed authentication.

Fixed windows counted in Redis, shared by all workers and pods (a window starts with its first request, as
the `limits` library's fixed window does). A request does not wait for Redis while the window's budget is
large: each worker counts locally and pushes its counts in batches (every SYNC_SECONDS in the background,
and at once when its batch is full), learning the others' counts and the window's end from the answer.
Once little is left of the budget (the exact tail), every request is counted in Redis before it is
answered, so small limits stay exact and the overshoot stays within the batches in flight. While Redis
cannot answer, each worker counts alone, in memory.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import redis
from flask import Flask
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from werkzeug.datastructures import Headers
from werkzeug.middleware.proxy_fix import ProxyFix

from catalog.auth import Client
from catalog.background import Background
from catalog.cache import GuardedRedis, RedisUnavailable
from catalog.errors import Problem
from catalog.metrics import RATE_LIMITED

# Every counter lives under this prefix, apart from the cache's keys (and independent of its schema version,
# so pods of two releases count together during a rolling update).
KEY_PREFIX = "catalog:ratelimit:"
# All /api/ routes share one budget per client.
API_SCOPE = "api"
AUTH_FAILURE_SCOPE = "auth-failures"
# While no more than this is left of a window's budget, every request is counted in Redis before it is
# answered (a limit this small is counted there entirely).
EXACT_TAIL_MIN = 50
EXACT_TAIL_FRACTION = 0.1
# Before a worker has seen its share of a counter's traffic it assumes this one; a batch is at most half
# its share of the budget left above the tail.
FIRST_SHARE = 1 / 16
# Local counts reach Redis at least this often, except in a window's last END_MARGIN_SECONDS (Redis may
# already have started the next window there).
SYNC_SECONDS = 0.1
END_MARGIN_SECONDS = 0.02
# Counters (every guessing IP is one) remembered at most: their keys, and shares of past windows.
REMEMBERED_COUNTERS = 10_000
# For each key: INCRBY ARGV[2i-1]; a new counter (or one that somehow lost its expiry) expires after
# ARGV[2i] seconds. Answers every key's count and remaining milliseconds.
ADD_SCRIPT = """
local out = {}
for i = 1, #KEYS do
  local count = redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < 0 then
    redis.call('EXPIRE', KEYS[i], ARGV[2 * i])
    ttl = tonumber(ARGV[2 * i]) * 1000
  end
  out[#out + 1] = count
  out[#out + 1] = ttl
end
return out
"""


class RateLimited(Problem):
    """Too many requests; `quota` is where the caller stands (its RateLimit-* and Retry-After headers)."""

    status, slug, title = 429, "rate-limited", "Too many requests"

    def __init__(self, detail: str, quota: Quota) -> None:
        super().__init__(detail)
        self.quota = quota


class Quota(NamedTuple):
    """Where a caller stands in one limit: what the RateLimit-* headers of the answer say."""

    limit: int
    remaining: int
    reset_at: float

    @property
    def reset_seconds(self) -> int:
        """Whole seconds until the window ends (the IETF draft's form, not an epoch time)."""
        return max(math.ceil(self.reset_at - time.time()), 0)


@lru_cache(maxsize=256)
def parse_limits(text: str) -> tuple[RateLimitItem, ...]:
    """`100/second; 5000/hour` as `limits` items (parsed once per distinct text, not per request)."""
    return tuple(parse_many(text))


@dataclass
class Window:
    """One counter as this worker sees it: the shared count Redis last answered (including what this worker
    pushed), this worker's counts on their way there and those not sent yet, and when the window ends."""

    key: str  # the counter in Redis
    amount: int
    tail: int
    ends_at: float  # time.time(); known once Redis answered
    share: float  # of the window's counts, this worker's (as last seen)
    shared: int = 0
    sending: int = 0
    pending: int = 0
    mine: int = 0  # this worker's counts in this window, sent or not
    synced: bool = False  # Redis answered in this window

    @property
    def count(self) -> int:
        """The shared count as far as this worker knows."""
        return self.shared + self.sending + self.pending

    def counts_locally(self) -> bool:
        """May this request's count be pushed later? While the window is known used up (the answer is 429
        anyway), or while its budget left is well above the tail and this worker has not counted more than
        its batch since it last heard from Redis."""
        if not self.synced:
            return False
        if self.shared >= self.amount:
            return True
        above_tail = self.amount - self.tail - self.count
        return above_tail > 0 and self.pending < max(1, int(above_tail * self.share / 2))

    def roll(self, now: float, expiry: int) -> None:
        """The window ended: the next one starts empty, unknown until Redis answers. Counts of the old
        window not sent yet are dropped: sent now, they would land in the next window's counter (and a
        worker counting 429s locally at the end of a window would eat into the next one's budget)."""
        self.shared = self.sending = self.pending = self.mine = 0
        self.synced = False
        self.ends_at = now + expiry

    def take(self) -> int:
        """The counts to send now (then on their way)."""
        pushed, self.pending = self.pending, 0
        self.sending += pushed
        return pushed

    def learned(self, shared: int, ends_at: float, pushed: int) -> None:
        """Redis answered `shared` after adding `pushed` of this worker's counts."""
        self.sending -= pushed
        if not self.synced or ends_at > self.ends_at + 0.5:  # first answer in this window, or a new window
            self.shared, self.ends_at, self.synced = shared, ends_at, True
        else:
            self.shared = max(self.shared, shared)
        if self.shared:
            self.share = min(max(self.mine / self.shared, 1 / 64), 1.0)


class SharedCounter:
    """Fixed-window counters in Redis, counted locally and pushed in batches; in memory per worker while
    Redis cannot answer (through the cache's guarded client: same timeouts and breaker)."""

    def __init__(self, guarded: GuardedRedis | None) -> None:
        self.guarded = guarded
        self.memory = MemoryStorage()
        self._add = guarded.register_script(ADD_SCRIPT) if guarded else None
        self._windows: dict[str, Window] = {}
        self._shares: dict[str, float] = {}  # per counter: this worker's share of its last window
        self._keys: dict[tuple[tuple[RateLimitItem, ...], tuple[str, ...]], tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def hit(self, items: tuple[RateLimitItem, ...], *identifiers: str) -> Quota:
        """Count one request against every item; the quota to report (the first one breached, else the one
        with the least left)."""
        now = time.time()
        keys = self._keys.get((items, identifiers))
        if keys is None:
            if len(self._keys) > REMEMBERED_COUNTERS:
                self._keys.clear()
            keys = self._keys[(items, identifiers)] = tuple(item.key_for(*identifiers) for item in items)
        if len(items) == 1:
            return self._hit_one(items[0], keys[0], now)
        quotas = [self._hit_one(item, key, now) for item, key in zip(items, keys, strict=True)]
        return min(quotas, key=lambda quota: quota.remaining)

    def sync(self) -> None:
        """Push every worker-local count to Redis and learn the shared counts (the background task)."""
        now = time.time()
        with self._lock:
            # A window about to end gets no more counts pushed (see Window.roll); an ended one goes.
            for window in self._windows.values():
                if window.ends_at - END_MARGIN_SECONDS <= now:
                    window.pending = 0
            for key in [key for key, window in self._windows.items() if window.ends_at <= now]:
                window = self._windows[key]
                if not window.sending:
                    self._shares[key] = window.share
                    del self._windows[key]
            if len(self._shares) > REMEMBERED_COUNTERS:
                self._shares.clear()
            pushes = [(window, window.take()) for window in self._windows.values() if window.pending]
        if pushes:
            self._push(pushes, now)

    def _hit_one(self, item: RateLimitItem, key: str, now: float) -> Quota:
        if self.guarded is None:
            return self._in_memory(item, key)
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                tail = max(EXACT_TAIL_MIN, int(item.amount * EXACT_TAIL_FRACTION))
                share = self._shares.pop(key, FIRST_SHARE)
                window = Window(KEY_PREFIX + key, item.amount, tail, now + item.get_expiry(), share)
                self._windows[key] = window
            elif window.ends_at <= now:
                window.roll(now, item.get_expiry())
            window.pending += 1
            window.mine += 1
            if window.counts_locally():
                return Quota(item.amount, item.amount - window.count, window.ends_at)
            pushed = window.take()
        # Little is left of the budget (or this worker's batch is full): count in Redis now, decide on it.
        answer = self._push([(window, pushed)], now, item.get_expiry())
        if answer is None:
            return self._in_memory(item, key)
        shared, ends_at = answer[0]
        return Quota(item.amount, item.amount - shared, ends_at)

    def _push(
        self, pushes: list[tuple[Window, int]], now: float, expiry: int | None = None
    ) -> list[tuple[int, float]] | None:
        """Add the counts to Redis; (shared count, window end) of each, or None (the counts are dropped)
        if Redis did not answer."""
        assert self.guarded is not None and self._add is not None
        script = self._add
        keys = [window.key for window, _ in pushes]
        arguments: list[Any] = []
        for window, pushed in pushes:
            arguments += [pushed, expiry or max(round(window.ends_at - now), 1)]

        def add(client: redis.Redis) -> list[tuple[int, float]]:
            answer = script(keys=keys, args=arguments, client=client)
            return [(int(answer[2 * i]), now + int(answer[2 * i + 1]) / 1000) for i in range(len(keys))]

        try:
            counts: list[tuple[int, float]] = self.guarded.call(add)
        except RedisUnavailable:
            with self._lock:
                for window, pushed in pushes:
                    window.sending -= pushed
            return None
        with self._lock:
            for (window, pushed), (shared, ends_at) in zip(pushes, counts, strict=True):
                window.learned(shared, ends_at, pushed)
        return counts

    def _in_memory(self, item: RateLimitItem, key: str) -> Quota:
        count = self.memory.incr(key, item.get_expiry())
        return Quota(item.amount, item.amount - count, self.memory.get_expiry(key))


class RateLimiter:
    """The client's budget (its own `rate_limit` from the Secret, else CATALOG_RATE_LIMIT) shared by all
    /api/ routes, and a budget of failed authentications per client IP (called by the pipeline)."""

    def __init__(self, counter: SharedCounter, default_limit: str, auth_failure_limit: str) -> None:
        self.counter = counter
        self.default_limit = default_limit
        self.auth_failure_items = parse_limits(auth_failure_limit)
        self._rate_limited: dict[str, Any] = {}

    def limit_client(self, client: Client) -> Quota:
        """Count an authenticated /api/ request: its quota; RateLimited (with it) past the budget."""
        quota = self.counter.hit(
            parse_limits(client.rate_limit or self.default_limit), client.name, API_SCOPE
        )
        if quota.remaining < 0:
            self._count_limited(client.name)
            raise RateLimited(
                f"The rate limit of client {client.name!r} is used up; see Retry-After.", quota=quota
            )
        return quota

    def limit_auth_failure(self, remote_addr: str | None) -> Quota:
        """Count a failed authentication of the caller's IP (its quota heads the 401); RateLimited past the
        limit."""
        quota = self.counter.hit(self.auth_failure_items, AUTH_FAILURE_SCOPE, remote_addr or "unknown")
        if quota.remaining < 0:
            self._count_limited("anonymous")
            raise RateLimited(
                "Too many failed authentications from this address; wait before trying again.", quota=quota
            )
        return quota

    def _count_limited(self, client: str) -> None:
        child = self._rate_limited.get(client)
        if child is None:
            child = self._rate_limited[client] = RATE_LIMITED.labels(client=client)
        child.inc()


def rate_limit_headers(quota: Quota, headers: Headers, limited: bool) -> None:
    """RateLimit-* on every /api/ answer, and Retry-After on a 429."""
    reset = quota.reset_seconds
    headers.add("RateLimit-Limit", str(quota.limit))
    headers.add("RateLimit-Remaining", str(max(quota.remaining, 0)))
    headers.add("RateLimit-Reset", str(reset))
    if limited:
        headers.add("Retry-After", str(max(reset, 1)))


def init_app(app: Flask) -> None:
    """The limiter the pipeline runs (failed authentications per IP, then each client's budget); trust
    X-Forwarded-For only as far as CATALOG_TRUSTED_PROXY_HOPS says."""
    settings = app.config["SETTINGS"]
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)  # type: ignore[method-assign]
    counter = SharedCounter(app.extensions["catalog.redis"])
    if counter.guarded is not None:
        background: Background = app.extensions["catalog.background"]
        background.every("rate-limit-sync", SYNC_SECONDS, counter.sync)
    app.extensions["catalog.limiter"] = RateLimiter(counter, settings.rate_limit, settings.auth_failure_limit)
