"""The in-process fallback cache (no CATALOG_REDIS_URL), exact across the workers of one master, and the
switched-off cache (TTL 0)."""

from __future__ import annotations

import os
import random
import threading
import time
import zlib
from collections.abc import Callable
from typing import Literal

from catalog.cache.board import InvalidationBoard
from catalog.cache.bounded import bounded_map, entry
from catalog.metrics import CACHE_BYPASS, CACHE_HIT, CACHE_MISS

Status = Literal["HIT", "MISS", "BYPASS"]
Loader = Callable[[], bytes | None]

# The in-process cache holds at most this many bytes of entries per worker.
MEMORY_CACHE_BYTES = 64 * 1024 * 1024


def new_ticket() -> bytes:
    """A value never seen before: a ticket key that was evicted or lost in a restart cannot match again."""
    return os.urandom(12).hex().encode()


def bypass(load: Loader) -> tuple[bytes | None, Status]:
    """The database's answer, the cache not consulted."""
    CACHE_BYPASS.inc()
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
        self._entries = bounded_map(max_bytes)
        self._lock = threading.Lock()
        # Striped, so the locks stay few whatever keys (e.g. unknown ids) are asked for.
        self._fill_locks = [threading.Lock() for _ in range(self.FILL_LOCKS)]

    def product(self, product_id: str, load: Loader) -> tuple[bytes | None, Status]:
        """The cached product entry, or `load()` remembered until a write bumps its counter."""
        return self._read_through(f"product:{product_id}", self.board.slot(product_id), load)

    def page(self, params: str, load: Loader) -> tuple[bytes | None, Status]:
        """A cached list page, retired by any write."""
        return self._read_through(f"list:{params}", InvalidationBoard.LISTS, load)

    def invalidate(self, product_id: str, pending: int | None = None) -> bool:
        """Retire the product's entries and every page, in all workers (always delivered: one pod, no
        outbox)."""
        self.board.bump(self.board.slot(product_id), InvalidationBoard.LISTS)
        return True

    def check(self) -> str:
        """The in-process cache is always available."""
        return "ok"

    def _lookup(self, key: str, slot: int) -> bytes | None:
        with self._lock:
            found = self._entries.get(key)
        if found is None or found.stamp != self.board.read(slot):
            return None
        return found.value

    def _store(self, key: str, stamp: int, value: bytes) -> None:
        ttl = self.ttl_seconds * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not security
        stored = entry(key, value, time.monotonic() + ttl, stamp, self.max_bytes)
        if stored is not None:
            with self._lock:
                self._entries[key] = stored

    def _read_through(self, key: str, slot: int, load: Loader) -> tuple[bytes | None, Status]:
        value = self._lookup(key, slot)
        if value is not None:
            CACHE_HIT.inc()
            return value, "HIT"
        with self._fill_locks[zlib.crc32(key.encode()) % self.FILL_LOCKS]:
            value = self._lookup(key, slot)
            if value is not None:
                CACHE_HIT.inc()
                return value, "HIT"
            CACHE_MISS.inc()
            # Read before the database: a write that lands meanwhile bumps it past this stamp.
            stamp = self.board.read(slot)
            value = load()
            if value is not None:
                self._store(key, stamp, value)
        return value, "MISS"


class NoCache:
    """Caching switched off (TTL 0): every read goes to the database and says BYPASS."""

    def product(self, product_id: str, load: Loader) -> tuple[bytes | None, Status]:
        """Read from the database."""
        return bypass(load)

    def page(self, params: str, load: Loader) -> tuple[bytes | None, Status]:
        """Read from the database."""
        return bypass(load)

    def invalidate(self, product_id: str, pending: int | None = None) -> bool:
        """Nothing is cached: nothing to deliver."""
        return True

    def check(self) -> str:
        """Caching is off by configuration."""
        return "disabled"
