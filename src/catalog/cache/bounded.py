"""The map both in-process caches keep entries in: least recently used first out, bounded in bytes, each
entry with its own expiry (cachetools' TLRUCache; not thread-safe, so its users hold a lock)."""

from __future__ import annotations

import sys
from typing import NamedTuple

from cachetools import TLRUCache

# What one entry costs besides its key and value bytes: the entry tuple and its float and int, the value's
# object header and cachetools' bookkeeping (two dict slots, an order link and an expiry heap item).
# Measured with tracemalloc over 100,000 entries (tests/test_cache_near.py), rounded up.
ENTRY_OVERHEAD_BYTES = 480


class Entry(NamedTuple):
    """A cached value, until when it may be used, and what it was stored under."""

    expires_at: float  # time.monotonic()
    stamp: int  # the generation (or board counter) it was filled under
    value: bytes
    size: int  # what it counts against the bound


def _expiry(_key: str, entry: Entry, _now: float) -> float:
    return entry.expires_at


def _size(entry: Entry) -> int:
    return entry.size


def bounded_map(max_bytes: int) -> TLRUCache[str, Entry]:
    """An empty map that never holds more than `max_bytes` of entries (as `entry` counts them)."""
    return TLRUCache(maxsize=max_bytes, ttu=_expiry, getsizeof=_size)


def entry(key: str, value: bytes, expires_at: float, stamp: int, max_bytes: int) -> Entry | None:
    """The entry to store, or None if it alone would exceed the bound."""
    size = sys.getsizeof(key) + len(value) + ENTRY_OVERHEAD_BYTES
    return Entry(expires_at, stamp, value, size) if size <= max_bytes else None
