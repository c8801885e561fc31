"""Read-through caching that never turns a Redis outage into an outage.

- `client`: the Redis client (short timeouts, one retry) and its circuit breaker;
- `redis_cache`: cache-aside in Redis (L2) with exact invalidation, behind
- `near`: the per-worker near-cache (L1) and the invalidation listener that keeps it honest;
- `memory`: the in-process fallback when no Redis is configured, and the switched-off cache;
- `board`: what the workers of one master share (in-process invalidations, distrust of Redis).
"""

from __future__ import annotations

from typing import Protocol

from flask import Flask

from catalog.background import Background
from catalog.cache.board import BOARD_ENV, InvalidationBoard
from catalog.cache.client import CircuitBreaker, GuardedRedis, RedisUnavailable, make_redis
from catalog.cache.keys import PREFIX
from catalog.cache.memory import Loader, MemoryCache, NoCache, Status
from catalog.cache.near import InvalidationListener, NearCache
from catalog.cache.redis_cache import RedisCache
from catalog.config import Settings
from catalog.metrics import CACHE_CIRCUIT_OPEN

__all__ = [
    "BOARD_ENV",
    "PREFIX",
    "Cache",
    "CircuitBreaker",
    "GuardedRedis",
    "InvalidationBoard",
    "InvalidationListener",
    "Loader",
    "MemoryCache",
    "NearCache",
    "NoCache",
    "RedisCache",
    "RedisUnavailable",
    "Status",
    "init_app",
    "make_cache",
    "make_redis",
]


class Cache(Protocol):
    """What the products service reads through and invalidates."""

    def product(self, product_id: str, load: Loader) -> tuple[bytes | None, Status]:
        """A product's entry (its JSON body) and whether it came from the cache."""

    def page(self, params: str, load: Loader) -> tuple[bytes | None, Status]:
        """A list page (its JSON body) and whether it came from the cache."""

    def invalidate(self, product_id: str, pending: int | None = None) -> bool:
        """Retire the product and every list page everywhere; True when that was delivered (else `pending`,
        the outbox row that holds it, is delivered later: catalog.outbox)."""

    def check(self) -> str:
        """The readiness check's word on the cache: ok, degraded or disabled."""


def make_cache(settings: Settings, guarded: GuardedRedis | None) -> Cache:
    """Redis (with a near-cache) when configured, else in-process; off when the TTL is 0."""
    if settings.cache_ttl_seconds == 0:
        return NoCache()
    board = InvalidationBoard.from_env()
    if guarded is not None:
        return RedisCache(guarded, settings.cache_ttl_seconds, board)
    return MemoryCache(settings.cache_ttl_seconds, board)


def init_app(app: Flask) -> None:
    """Build this process's Redis client (shared with the rate limiter), the cache, and the near-cache's
    invalidation listener."""
    settings: Settings = app.config["SETTINGS"]
    guarded = None
    if settings.redis_url:
        url, password_file = settings.redis_url, settings.redis_password_file
        client = make_redis(url, password_file, pool_size=settings.threads * 2 + 4)
        guarded = GuardedRedis(client, CircuitBreaker())
        CACHE_CIRCUIT_OPEN.set(0)
    cache = make_cache(settings, guarded)
    if isinstance(cache, RedisCache):
        # A connection of its own, held by the subscription; errors surface at once (no retry), so that the
        # near-cache is switched off before anything else.
        listener = InvalidationListener(
            lambda: make_redis(url, password_file, pool_size=1, retries=0, health_check_seconds=0),
            cache.near,
            cache.guarded.load_scripts,
        )
        background: Background = app.extensions["catalog.background"]
        background.run("cache-invalidations", listener.run)
        app.extensions["catalog.cache_listener"] = listener
    app.extensions["catalog.redis"] = guarded
    app.extensions["catalog.cache"] = cache
