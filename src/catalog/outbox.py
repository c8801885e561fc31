"""Cache invalidations that survive their writer: recorded in the write's own transaction, delivered after
the commit, and swept up by one pod at a time when the writer could not deliver them (cut off from Redis,
or killed after its commit)."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from sqlalchemy import Connection

from catalog.cache import Cache, RedisCache
from catalog.cache.keys import OUTBOX_SWEEPER
from catalog.cache.memory import new_ticket
from catalog.db import Database, utcnow

log = logging.getLogger(__name__)

# Each worker sweeps this often; more often while its pod distrusts Redis, so that the distrust ends soon
# after another pod delivered what it waits for. Every sweep first removes the rows this worker's own writes
# delivered (one DELETE for all of them, off the requests' path; a DELETE per write, or a wake-up every
# 0.25 s, cost a PATCH 10-25 % of its throughput on SQLite).
SWEEP_SECONDS = 1.0
DISTRUSTED_SWEEP_SECONDS = 0.25
# A row is the writer's own to deliver for this long after it was recorded: longer than a sweep period, so a
# delivered row is removed before anyone delivers it again (that is harmless, but costs every near-cache
# the product and the list pages once more). A lost one is delivered within GRACE + SWEEP_SECONDS.
GRACE = dt.timedelta(seconds=1.5)
# Rows delivered per Redis transaction, and how long a sweeper holds the lock at most (a sweeper that died
# holding it stops nobody for longer).
BATCH = 500
LOCK_MILLISECONDS = 2000

# Release the sweeper lock only if it is still this sweeper's.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Outbox:
    """The outbox of a cache shared by pods (Redis): a write records its invalidation in its transaction and
    delivers it after the commit, removing the row; a row whose delivery failed stays, and a sweeper delivers
    it. With a cache of this pod's own (in-process, or off) invalidations are delivered at once and nothing
    is recorded."""

    def __init__(self, db: Database, cache: Cache) -> None:
        self.db = db
        self.cache = cache
        self.shared = cache if isinstance(cache, RedisCache) else None
        self._release = self.shared.guarded.register_script(RELEASE_SCRIPT) if self.shared else None
        self._failing = False
        # Rows this worker's writes delivered, not yet removed from the table.
        self._delivered: list[int] = []
        self._delivered_lock = threading.Lock()

    def record(self, connection: Connection, product_id: str) -> int | None:
        """Inside the write's transaction: the outbox row of its invalidation (None when nothing is kept)."""
        return self.db.record_invalidation(connection, product_id) if self.shared else None

    def deliver(self, product_id: str, row_id: int | None) -> None:
        """After the commit: invalidate. A delivered row is removed by this worker's next sweep; one Redis
        did not take stays for the sweepers, and this pod does not trust Redis until it is delivered."""
        if self.cache.invalidate(product_id, row_id) and row_id is not None:
            with self._delivered_lock:
                self._delivered.append(row_id)

    def run(self, stop: threading.Event) -> None:
        """The sweeper thread of a worker: sweep until `stop` is set. (Rows delivered but not yet removed
        when the worker exits are delivered once more by a sweeper after their grace: harmless.)"""
        assert self.shared is not None
        board = self.shared.board
        while not stop.wait(SWEEP_SECONDS if board.redis_trusted() else DISTRUSTED_SWEEP_SECONDS):
            self.sweep()

    def sweep(self) -> None:
        """Remove the rows this worker delivered; deliver rows older than GRACE (if this worker gets the lock
        that one sweeper of all pods holds); trust Redis again if this pod distrusted it and what it waited
        for is delivered. Errors are logged once per episode as a warning; the next sweep tries again."""
        errors = []
        for step in (self._remove_delivered, self._deliver_pending, self._end_distrust):
            try:
                step()
            except Exception as error:
                errors.append(error)
        if errors and not self._failing:
            cause = errors[0].__cause__ or errors[0]
            log.warning(
                "cache invalidation sweep failing: retrying every second",
                extra={"error_type": type(cause).__name__},
            )
        elif not errors and self._failing:
            log.info("cache invalidation sweep recovered")
        self._failing = bool(errors)

    def _remove_delivered(self) -> None:
        with self._delivered_lock:
            delivered, self._delivered = self._delivered, []
        if not delivered:
            return
        try:
            self.db.delete_invalidations(delivered)
        except Exception:
            with self._delivered_lock:  # next time (meanwhile the sweepers may deliver them once more)
                self._delivered[:0] = delivered
            raise

    def _deliver_pending(self) -> None:
        shared, release = self.shared, self._release
        assert shared is not None and release is not None
        token = new_ticket()
        if not shared.guarded.call(lambda r: r.set(OUTBOX_SWEEPER, token, nx=True, px=LOCK_MILLISECONDS)):
            return  # another sweeper is at it
        started = time.monotonic()
        try:
            while True:
                rows = self.db.pending_invalidations(utcnow() - GRACE, BATCH)
                if not rows:
                    return
                shared.deliver(dict.fromkeys(product_id for _row, product_id in rows))
                self.db.delete_invalidations([row for row, _product_id in rows])
                log.info("pending cache invalidations delivered", extra={"count": len(rows)})
                if len(rows) < BATCH or time.monotonic() - started > LOCK_MILLISECONDS / 2000:
                    return
        finally:
            shared.guarded.call(lambda r: release(keys=[OUTBOX_SWEEPER], args=[token], client=r))

    def _end_distrust(self) -> None:
        assert self.shared is not None
        board = self.shared.board
        checked = board.distrust()
        waited_for = checked[0]
        if waited_for and not self.db.invalidations_pending_up_to(waited_for) and board.trust_redis(checked):
            log.info("redis trusted again: the pending cache invalidations are delivered")
