"""Single-flight for reads that bypass the cache: concurrent reads of one key in a worker share one load."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable


class _Flight:
    """One load under way, and what it gave."""

    def __init__(self, stamp: Hashable) -> None:
        self.stamp = stamp
        self.done = threading.Event()
        self.value: bytes | None = None
        self.failed = False


class SingleFlight:
    """While a load of a key is under way, a read of the same key with the same stamp waits for it and gets
    its value instead of loading again.

    The stamp is what invalidations change (the near-cache's token for the key): a read that starts after an
    invalidation reached this worker never joins a load that started before it, so it never gets a value
    the write made old. A failed load is not shared: each waiter then loads for itself.
    """

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()

    def load(self, key: str, stamp: Hashable, load: Callable[[], bytes | None]) -> bytes | None:
        """`load()`'s value, shared with the concurrent reads of `key` under the same stamp."""
        with self._lock:
            current = self._flights.get(key)
            joined = current is not None and current.stamp == stamp
            flight = current if current is not None and joined else _Flight(stamp)
            self._flights[key] = flight
        if joined:
            flight.done.wait()
            return load() if flight.failed else flight.value
        try:
            flight.value = load()
        except BaseException:
            flight.failed = True
            raise
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()
        return flight.value
