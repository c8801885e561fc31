"""Counters shared by the workers of one gunicorn master (an mmap'ed file): which in-process entries a write
retired, and which undelivered invalidation keeps every worker from trusting Redis."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Callable
from typing import TypeVar

# gunicorn.conf.py creates the file in `on_starting` and names it here for the workers.
BOARD_ENV = "CATALOG_CACHE_BOARD"

T = TypeVar("T")


class InvalidationBoard:
    """A counter per slot of products (and one for all list pages), bumped by every write; and the newest
    outbox row whose invalidation a write of this master could not deliver to Redis: until no row up to it is
    left, no worker trusts Redis (nor its near-cache).

    An in-process entry is valid only while its counter is unchanged, so a write in one worker retires the
    entries of every worker at once.
    """

    SLOTS = 4096
    LISTS = SLOTS  # the list generation
    DISTRUST = SLOTS + 1  # the outbox row id waited for; 0 while Redis is trusted
    DISTRUSTS = SLOTS + 2  # how many times Redis was distrusted: a release checked against an older one fails

    def __init__(self, path: str | None) -> None:
        size = (self.SLOTS + 3) * 8
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

    def distrust_redis(self, row_id: int) -> None:
        """No worker reads or fills Redis entries (nor its near-cache) until outbox row `row_id` and every
        older one are delivered (`trust_redis`)."""

        def distrust() -> None:
            self._write(self.DISTRUST, max(row_id, self.read(self.DISTRUST)))
            self._write(self.DISTRUSTS, self.read(self.DISTRUSTS) + 1)

        self._update(distrust)

    def redis_trusted(self) -> bool:
        """False while a write's invalidation may be missing from Redis."""
        return self.read(self.DISTRUST) == 0

    def distrust(self) -> tuple[int, int]:
        """(the outbox row id waited for, or 0; the distrust count), read together."""
        return self._update(lambda: (self.read(self.DISTRUST), self.read(self.DISTRUSTS)))

    def trust_redis(self, checked: tuple[int, int]) -> bool:
        """Trust Redis again, unless Redis was distrusted again since `checked` (what `distrust()` gave before
        the outbox was found delivered up to its row); True when it did."""

        def release() -> bool:
            if (self.read(self.DISTRUST), self.read(self.DISTRUSTS)) != checked:
                return False
            self._write(self.DISTRUST, 0)
            return True

        return self._update(release)

    def _write(self, slot: int, value: int) -> None:
        struct.pack_into("<Q", self._map, slot * 8, value)

    def _update(self, change: Callable[[], T]) -> T:
        with self._lock:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                return change()
            finally:
                if self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
