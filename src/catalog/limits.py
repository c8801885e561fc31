"""Rate limits per API client and per IP for failed authentication: counted in Redis, in memory meanwhile."""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

from flask import Flask, Response, current_app, g, has_request_context, request
from flask_limiter import Limiter, RequestLimit
from flask_limiter.errors import RateLimitExceeded
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, Storage
from limits.strategies import FixedWindowRateLimiter
from werkzeug.middleware.proxy_fix import ProxyFix

from catalog.cache import GuardedRedis, RedisUnavailable
from catalog.errors import Problem, problem_response
from catalog.metrics import RATE_LIMITED

# Every counter lives under this prefix, apart from the cache's keys (and independent of its schema version,
# so pods of two releases count together during a rolling update).
KEY_PREFIX = "catalog:ratelimit:"
# All /api/ routes share one budget per client.
API_SCOPE = "api"
AUTH_FAILURE_SCOPE = "auth-failures"
# INCRBY, an expiry for a new window (or a key that somehow lost its own), and the window's remaining
# milliseconds, in one round trip.
HIT_SCRIPT = """
local count = redis.call('INCRBY', KEYS[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1]) * 1000
end
return {count, ttl}
"""


class GuardedRedisStorage(Storage):
    """A `limits` storage on the cache's Redis client (same timeouts, same circuit breaker) that counts in
    this process's memory whenever Redis cannot answer, and in Redis again as soon as the breaker lets a call
    through and it succeeds. One round trip per hit; the count and window end it answers are kept for the
    request, so its RateLimit-* headers cost no further round trip.

    The fallback is here rather than Flask-Limiter's: that one is process-wide state flipped by whichever
    thread fails first (a concurrent request failing a moment later got a 500), and it asks Redis again only
    after an exponential backoff of up to 32 s.
    """

    STORAGE_SCHEME = ["catalog-redis"]  # noqa: RUF012 - the type `limits` declares

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self.redis: GuardedRedis = options["guarded"]
        self.memory = MemoryStorage()
        self._hit = self.redis.client.register_script(HIT_SCRIPT)

    @property
    def base_exceptions(self) -> type[Exception]:
        """What a failing Redis raises here (a hit then counts in memory instead)."""
        return RedisUnavailable

    @staticmethod
    def _windows() -> dict[str, tuple[int, float]]:
        """Counter key -> (count, window end) of the hits of this request."""
        if not has_request_context():
            return {}
        windows: dict[str, tuple[int, float]] = g.setdefault("rate_limit_windows", {})
        return windows

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Count a hit; remember the window for this request's headers."""
        try:
            count, ttl_ms = self.redis.call(
                lambda r: self._hit(keys=[KEY_PREFIX + key], args=[expiry, amount], client=r)
            )
            window = (int(count), time.time() + int(ttl_ms) / 1000)
        except RedisUnavailable:
            window = (self.memory.incr(key, expiry, amount), self.memory.get_expiry(key))
        self._windows()[key] = window
        return window[0]

    def get(self, key: str) -> int:
        """The count (from this request's hit when there was one)."""
        if key in self._windows():
            return self._windows()[key][0]
        try:
            return int(self.redis.call(lambda r: r.get(KEY_PREFIX + key)) or 0)
        except RedisUnavailable:
            return self.memory.get(key)

    def get_expiry(self, key: str) -> float:
        """When the window ends (from this request's hit when there was one)."""
        if key in self._windows():
            return self._windows()[key][1]
        try:
            ttl_ms = self.redis.call(lambda r: r.pttl(KEY_PREFIX + key))
        except RedisUnavailable:
            return self.memory.get_expiry(key)
        return time.time() + max(int(ttl_ms), 0) / 1000

    def check(self) -> bool:
        """Redis answers."""
        try:
            return bool(self.redis.call(lambda r: r.ping()))
        except RedisUnavailable:
            return False

    def reset(self) -> int | None:
        """Clear every counter."""
        self.memory.reset()
        keys = self.redis.call(lambda r: list(r.scan_iter(f"{KEY_PREFIX}*")))
        if keys:
            self.redis.call(lambda r: r.delete(*keys))
        return len(keys)

    def clear(self, key: str) -> None:
        """Clear one counter."""
        self.memory.clear(key)
        self.redis.call(lambda r: r.delete(KEY_PREFIX + key))


class RateLimited(Problem):
    """Too many requests."""

    status, slug, title = 429, "rate-limited", "Too many requests"


class Quota(NamedTuple):
    """What the RateLimit-* headers of an answer say."""

    limit: int
    remaining: int
    reset_at: float

    @property
    def reset_seconds(self) -> int:
        """Whole seconds until the window ends (the IETF draft's form, not an epoch time)."""
        return max(math.ceil(self.reset_at - time.time()), 0)


def client_name() -> str:
    """Limits are counted per API client (its name, never its key)."""
    client = g.get("client")
    return client.name if client else "anonymous"


def client_limit() -> str:
    """The client's own limit from the Secret, else CATALOG_RATE_LIMIT."""
    client = g.get("client")
    limit: str = (client.rate_limit if client else None) or current_app.config["SETTINGS"].rate_limit
    return limit


def is_api() -> bool:
    """Only /api/ is limited; operational endpoints never are."""
    return request.path.startswith("/api/")


def on_breach(limit: RequestLimit) -> Response:
    """The 429 problem body of a client over its limit."""
    RATE_LIMITED.labels(client=client_name()).inc()
    return problem_response(
        429,
        f"The rate limit of {limit.limit} for this client is used up; see Retry-After.",
        title="Too many requests",
        slug="rate-limited",
    )


class AuthFailureLimiter:
    """Counts failed authentications per client IP; past the limit the answer is 429, not 401."""

    def __init__(self, storage: Storage, limit: str) -> None:
        self.items: list[RateLimitItem] = sorted(parse_many(limit))
        self.limiter = FixedWindowRateLimiter(storage)

    def hit(self, reason: str) -> None:
        """Count this failure (its quota heads the 401's headers); raise RateLimited once over the limit."""
        ip = request.remote_addr or "unknown"
        quotas: list[tuple[bool, Quota]] = []
        for item in self.items:
            allowed = self.limiter.hit(item, AUTH_FAILURE_SCOPE, ip)
            window = self.limiter.get_window_stats(item, AUTH_FAILURE_SCOPE, ip)
            quotas.append((allowed, Quota(item.amount, window.remaining, window.reset_time)))
        breached = [quota for allowed, quota in quotas if not allowed]
        g.auth_failure_quota = breached[0] if breached else quotas[0][1]
        if breached:
            RATE_LIMITED.labels(client="anonymous").inc()
            raise RateLimited("Too many failed authentications from this address; wait before trying again.")


def current_quota(limiter: Limiter) -> Quota | None:
    """The quota this answer reports: the client's limit, or (on 401) the caller IP's failure limit."""
    limit = limiter.current_limit
    if limit is not None:
        window = limit.window
        return Quota(limit.limit.amount, window.remaining, window.reset_time)
    quota: Quota | None = g.get("auth_failure_quota")
    return quota


def rate_limit_headers(limiter: Limiter, response: Response) -> Response:
    """RateLimit-* on every /api/ answer, Retry-After on a 429.

    A 403 is decided by auth before the limiter runs: it still counts against the client's limit here (and
    becomes the 429 once that is used up).
    """
    if not is_api():
        return response
    if limiter.current_limit is None and g.get("client") is not None:
        # The very check Flask-Limiter runs before each request, which auth's refusal pre-empted.
        try:
            limiter._check_request_limit(in_middleware=True)
        except RateLimitExceeded as breach:
            if isinstance(breach.response, Response):  # on_breach's 429 problem body
                response = breach.response
    quota = current_quota(limiter)
    if quota is None:
        return response
    response.headers["RateLimit-Limit"] = str(quota.limit)
    response.headers["RateLimit-Remaining"] = str(quota.remaining)
    response.headers["RateLimit-Reset"] = str(quota.reset_seconds)
    if response.status_code == 429:
        response.headers["Retry-After"] = str(max(quota.reset_seconds, 1))
    return response


def init_app(app: Flask) -> None:
    """Flask-Limiter keyed by client name, one budget for all /api/ routes, counted in the cache's Redis
    (per worker in memory while it is unreachable); failed authentications limited per client IP."""
    settings = app.config["SETTINGS"]
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)  # type: ignore[method-assign]
    guarded: GuardedRedis | None = app.extensions["catalog.redis"]
    storage: dict[str, Any] = (
        {"storage_uri": "catalog-redis://", "storage_options": {"guarded": guarded}}
        if guarded
        else {"storage_uri": "memory://"}
    )
    limiter = Limiter(
        key_func=client_name,
        default_limits=[client_limit],
        # rate_limit_headers writes them: Reset in seconds, on 401/403 too, Retry-After only on 429.
        headers_enabled=False,
        strategy="fixed-window",
        on_breach=on_breach,
        request_identifier=lambda: API_SCOPE,
        **storage,
    )
    limiter.request_filter(lambda: not is_api())
    limiter.init_app(app)
    app.after_request(lambda response: rate_limit_headers(limiter, response))
    app.extensions["catalog.auth_failed"] = AuthFailureLimiter(
        limiter.storage, settings.auth_failure_limit
    ).hit
