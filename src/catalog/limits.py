"""Rate limits per API client and per IP for failed authentication: fixed windows counted in Redis (one
round trip, which also brings the cache entry the request will read), per worker in memory meanwhile."""

from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import NamedTuple

from flask import Flask, Response, current_app, g, request
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from werkzeug.middleware.proxy_fix import ProxyFix

from catalog.cache import GuardedRedis, RedisUnavailable
from catalog.errors import Problem
from catalog.metrics import RATE_LIMITED

# Every counter lives under this prefix, apart from the cache's keys (and independent of its schema version,
# so pods of two releases count together during a rolling update).
KEY_PREFIX = "catalog:ratelimit:"
# All /api/ routes share one budget per client.
API_SCOPE = "api"
AUTH_FAILURE_SCOPE = "auth-failures"
# For each of the first ARGV[1] keys: INCR, an expiry for a new window (or a key that somehow lost its own)
# and the window's remaining milliseconds; then the value of every further key (the cache entry this request
# reads next), all in one round trip.
HIT_SCRIPT = """
local counters = tonumber(ARGV[1])
local out = {}
for i = 1, counters do
  local count = redis.call('INCR', KEYS[i])
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < 0 then
    redis.call('EXPIRE', KEYS[i], ARGV[i + 1])
    ttl = tonumber(ARGV[i + 1]) * 1000
  end
  out[#out + 1] = count
  out[#out + 1] = ttl
end
for i = counters + 1, #KEYS do
  out[#out + 1] = redis.call('GET', KEYS[i]) or false
end
return out
"""


class RateLimited(Problem):
    """Too many requests."""

    status, slug, title = 429, "rate-limited", "Too many requests"


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


class WindowCounter:
    """Fixed-window counters in Redis through the cache's guarded client (same timeouts and breaker); in
    this process's memory whenever Redis cannot answer, and in Redis again as soon as a call succeeds."""

    def __init__(self, guarded: GuardedRedis | None) -> None:
        self.guarded = guarded
        self.memory = MemoryStorage()
        self._hit = guarded.client.register_script(HIT_SCRIPT) if guarded else None

    def hit(
        self, items: tuple[RateLimitItem, ...], *identifiers: str, prefetch: list[str] | None = None
    ) -> Quota:
        """Count one request against every item; the quota to report (the first one breached, else the one
        with the least left). `prefetch` keys are read in the same round trip for the cache."""
        keys = [item.key_for(*identifiers) for item in items]
        windows = self._redis_hit(items, keys, prefetch or []) if self.guarded else None
        if windows is None:
            windows = [
                (self.memory.incr(key, item.get_expiry()), self.memory.get_expiry(key))
                for item, key in zip(items, keys, strict=True)
            ]
        quotas = [
            Quota(item.amount, item.amount - count, reset_at)
            for item, (count, reset_at) in zip(items, windows, strict=True)
        ]
        return min(quotas, key=lambda quota: quota.remaining)

    def _redis_hit(
        self, items: tuple[RateLimitItem, ...], keys: list[str], prefetch: list[str]
    ) -> list[tuple[int, float]] | None:
        assert self.guarded is not None and self._hit is not None
        script = self._hit
        arguments = [len(keys), *(item.get_expiry() for item in items)]
        try:
            answer = self.guarded.call(
                lambda r: script(keys=[KEY_PREFIX + key for key in keys] + prefetch, args=arguments, client=r)
            )
        except RedisUnavailable:
            return None
        now = time.time()
        self.guarded.remember(dict(zip(prefetch, answer[2 * len(keys) :], strict=True)))
        return [(int(answer[2 * i]), now + int(answer[2 * i + 1]) / 1000) for i in range(len(keys))]


class RateLimiter:
    """The client's budget (its own `rate_limit` from the Secret, else CATALOG_RATE_LIMIT) shared by all
    /api/ routes, and a budget of failed authentications per client IP."""

    def __init__(self, counter: WindowCounter, default_limit: str, auth_failure_limit: str) -> None:
        self.counter = counter
        self.default_limit = default_limit
        self.auth_failure_items = parse_limits(auth_failure_limit)

    def limit_client(self) -> None:
        """Before an authenticated /api/ request: count it; 429 once the client's budget is used up."""
        client = g.get("client")
        if client is None or g.get("rate_limit_quota") is not None:
            return
        prefetch = current_app.extensions["catalog.redis_prefetch"]()
        quota = self.counter.hit(
            parse_limits(client.rate_limit or self.default_limit), client.name, API_SCOPE, prefetch=prefetch
        )
        g.rate_limit_quota = quota
        if quota.remaining < 0:
            RATE_LIMITED.labels(client=client.name).inc()
            raise RateLimited(f"The rate limit of client {client.name!r} is used up; see Retry-After.")

    def limit_auth_failure(self, reason: str) -> None:
        """Count a failed authentication of the caller's IP (its quota heads the 401); 429 past the limit."""
        ip = request.remote_addr or "unknown"
        quota = self.counter.hit(self.auth_failure_items, AUTH_FAILURE_SCOPE, ip)
        g.rate_limit_quota = quota
        if quota.remaining < 0:
            RATE_LIMITED.labels(client="anonymous").inc()
            raise RateLimited("Too many failed authentications from this address; wait before trying again.")

    def headers(self, response: Response) -> Response:
        """RateLimit-* on every /api/ answer, Retry-After on a 429. A 403 (decided by auth before the
        limiter ran) still counts against the client's budget here, and is the 429 once that is used up."""
        quota: Quota | None = g.get("rate_limit_quota")
        if quota is None:
            if response.status_code != 403 or g.get("client") is None:
                return response
            try:
                self.limit_client()
            except RateLimited as breach:
                response = current_app.handle_user_exception(breach)  # type: ignore[assignment]
            quota = g.rate_limit_quota
        response.headers["RateLimit-Limit"] = str(quota.limit)
        response.headers["RateLimit-Remaining"] = str(max(quota.remaining, 0))
        response.headers["RateLimit-Reset"] = str(quota.reset_seconds)
        if response.status_code == 429:
            response.headers["Retry-After"] = str(max(quota.reset_seconds, 1))
        return response


def init_app(app: Flask) -> None:
    """The limiter of every authenticated /api/ request (run by the pipeline) and of failed
    authentications; trust X-Forwarded-For only as far as CATALOG_TRUSTED_PROXY_HOPS says."""
    settings = app.config["SETTINGS"]
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)  # type: ignore[method-assign]
    limiter = RateLimiter(
        WindowCounter(app.extensions["catalog.redis"]), settings.rate_limit, settings.auth_failure_limit
    )
    app.extensions["catalog.auth_failed"] = limiter.limit_auth_failure
    app.extensions["catalog.limiter"] = limiter  # the pipeline limits each request after authenticating it
    app.after_request(limiter.headers)
