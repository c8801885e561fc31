"""Rate limits per API client and per IP for failed authentication: counted in Redis, in memory meanwhile."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, current_app, g, request
from flask_limiter import HeaderNames, Limiter, RequestLimit
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, Storage
from limits.strategies import FixedWindowRateLimiter
from werkzeug.middleware.proxy_fix import ProxyFix

from catalog.cache import PREFIX, GuardedRedis, RedisUnavailable
from catalog.errors import Problem, problem_response
from catalog.metrics import RATE_LIMITED

log = logging.getLogger(__name__)

KEY_PREFIX = f"{PREFIX}ratelimit"
RESET_HEADER = "RateLimit-Reset"

# INCRBY and, for a new window, EXPIRE, answering the count and the window's end in one round trip.
HIT_SCRIPT = """
local count = redis.call('INCRBY', KEYS[1], ARGV[2])
if count == tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('TTL', KEYS[1])
return {count, ttl}
"""


class GuardedRedisStorage(Storage):
    """A `limits` storage on the cache's Redis client: same timeouts, same circuit breaker, one round trip
    per hit (the count and the window's end it answers serve the RateLimit-* headers of the request)."""

    STORAGE_SCHEME = ["catalog-redis"]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self.redis: GuardedRedis = options["guarded"]
        self._hit = self.redis.client.register_script(HIT_SCRIPT)

    @property
    def base_exceptions(self) -> type[Exception]:
        """What a failing Redis raises here."""
        return RedisUnavailable

    def _seen(self) -> dict[str, tuple[int, float]]:
        seen: dict[str, tuple[int, float]] = g.setdefault("rate_limit_windows", {})
        return seen

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Count a hit; remember the window for this request's headers."""
        count, ttl = self.redis.call(lambda r: self._hit(keys=[key], args=[expiry, amount], client=r))
        self._seen()[key] = (int(count), time.time() + max(int(ttl), 0))
        return int(count)

    def get(self, key: str) -> int:
        """The count (from this request's hit when there was one)."""
        if key in self._seen():
            return self._seen()[key][0]
        value = self.redis.call(lambda r: r.get(key))
        return int(value or 0)

    def get_expiry(self, key: str) -> float:
        """When the window ends (from this request's hit when there was one)."""
        if key in self._seen():
            return self._seen()[key][1]
        ttl = self.redis.call(lambda r: r.ttl(key))
        return time.time() + max(int(ttl), 0)

    def check(self) -> bool:
        """Redis answers (used by Flask-Limiter to leave its in-memory fallback)."""
        try:
            return bool(self.redis.call(lambda r: r.ping()))
        except RedisUnavailable:
            return False

    def reset(self) -> int | None:
        """Clear every counter."""
        keys = self.redis.call(lambda r: list(r.scan_iter(f"{KEY_PREFIX}*")))
        if keys:
            self.redis.call(lambda r: r.delete(*keys))
        return len(keys)

    def clear(self, key: str) -> None:
        """Clear one counter."""
        self.redis.call(lambda r: r.delete(key))


class RateLimited(Problem):
    """Too many requests."""

    status, slug, title = 429, "rate-limited", "Too many requests"


def client_name() -> str:
    """Limits are counted per API client (its name, never its key)."""
    client = g.get("client")
    return client.name if client else "anonymous"


def client_limit() -> str:
    """The client's own limit from the Secret, else CATALOG_RATE_LIMIT."""
    client = g.get("client")
    return (client.rate_limit if client else None) or current_app.config["SETTINGS"].rate_limit


def not_api() -> bool:
    """Operational endpoints are never limited."""
    return not request.path.startswith("/api/")


def on_breach(limit: RequestLimit) -> Response:
    """A 429 problem body; Retry-After and RateLimit-* are added with every limited answer."""
    RATE_LIMITED.labels(client=client_name()).inc()
    return problem_response(
        429, f"The rate limit of {limit.limit} for this client is used up.", title="Too many requests",
        slug="rate-limited",
    )


class AuthFailureLimiter:
    """Counts failed authentications per client IP; past the limit the answer is 429, not 401."""

    def __init__(self, limiter: Limiter, limit: str) -> None:
        self.limiter = limiter
        self.items: list[RateLimitItem] = parse_many(limit)
        self.memory = FixedWindowRateLimiter(MemoryStorage())

    def hit(self, reason: str) -> None:
        """Count this failure; raise RateLimited once the client IP is over the limit."""
        ip = request.remote_addr or "unknown"
        for item in self.items:
            try:
                allowed = self.limiter.limiter.hit(item, KEY_PREFIX, "auth-failures", ip)
                window = self.limiter.limiter.get_window_stats(item, KEY_PREFIX, "auth-failures", ip)
            except RedisUnavailable:
                allowed = self.memory.hit(item, "auth-failures", ip)
                window = self.memory.get_window_stats(item, "auth-failures", ip)
            if not allowed:
                RATE_LIMITED.labels(client="anonymous").inc()
                retry_after = max(int(window.reset_time - time.time()), 1)
                raise RateLimited(
                    "Too many failed authentications from this address; wait before trying again.",
                    headers={
                        "Retry-After": str(retry_after),
                        "RateLimit-Limit": str(item.amount),
                        "RateLimit-Remaining": "0",
                        RESET_HEADER: str(retry_after),
                    },
                )


def finish_headers(response: Response) -> Response:
    """RateLimit-Reset in seconds from now (the IETF draft's form, not Flask-Limiter's epoch time);
    Retry-After only where a retry is asked for (429, 503)."""
    reset = response.headers.get(RESET_HEADER)
    if reset and reset.isdigit() and int(reset) > 1_000_000_000:
        response.headers[RESET_HEADER] = str(max(int(reset) - int(time.time()), 0))
    if response.status_code not in (429, 503):
        response.headers.pop("Retry-After", None)
    return response


def init_app(app: Flask) -> None:
    """Flask-Limiter keyed by client name, storage in the cache's Redis (memory while it is away)."""
    settings = app.config["SETTINGS"]
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)  # type: ignore[method-assign]
    guarded: GuardedRedis | None = app.extensions["catalog.redis"]
    storage: dict[str, Any] = (
        {"storage_uri": "catalog-redis://", "storage_options": {"guarded": guarded}}
        if guarded
        else {"storage_uri": "memory://"}
    )
    app.after_request(finish_headers)
    limiter = Limiter(
        key_func=client_name,
        default_limits=[client_limit],
        in_memory_fallback=[client_limit],
        in_memory_fallback_enabled=True,
        headers_enabled=True,
        header_name_mapping={
            HeaderNames.LIMIT: "RateLimit-Limit",
            HeaderNames.REMAINING: "RateLimit-Remaining",
            HeaderNames.RESET: RESET_HEADER,
        },
        strategy="fixed-window",
        key_prefix=KEY_PREFIX,
        on_breach=on_breach,
        request_identifier=lambda: "api",
        **storage,
    )
    limiter.request_filter(not_api)
    limiter.init_app(app)
    failures = AuthFailureLimiter(limiter, settings.auth_failure_limit)
    app.extensions["catalog.auth_failed"] = failures.hit
