"""Counters shared by the workers of one gunicorn master (an mmap'ed file): which in-process entries a write
retired, and until when no worker may trust Redis because a write could not invalidate it there."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable

# gunicorn.conf.py creates the file in `on_starting` and names it here for the workers.
BOARD_ENV = "CATALOG_CACHE_BOARD"


class InvalidationBoard:
    """A counter per slot of products (and one for all list pages), bumped by every write; and one slot
    holding until when Redis must not be trusted by any worker because a write could not invalidate it.

    An in-process entry is valid only while its counter is unchanged, so a write in one worker retires the
    entries of every worker at once.
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
    def from_env(cls) -> InvalidationBoard:
        """The board of this master's workers (a private one outside gunicorn)."""
        return cls(os.environ.get(BOARD_ENV))

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
        """No worker reads or fills Redis entries (nor its near-cache) for the next `seconds`."""
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
