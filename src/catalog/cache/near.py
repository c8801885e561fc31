"""The per-worker near-cache (L1) in front of Redis, and the listener that keeps it honest.

A hit in the near-cache costs no network round trip. It is used only while this worker's invalidation
listener is subscribed to the channel every write publishes to (and heard from Redis within the last
SILENCE_SECONDS); whenever it is not, the near-cache is flushed and unused until the listener has
subscribed again. Entries never outlive the Redis entry they copy (nor the cache TTL), and the whole map is
bounded in bytes.

Redis publishes a write's invalidation before the write answers, so by the time another pod's read starts
the message is in that pod's listener socket. A busy worker may not give its listener thread the CPU (nor
the GIL) for a while, so the message may sit there: a hit therefore first checks that nothing is waiting in
the socket or being applied, and reads Redis otherwise. The socket check is a select() with no timeout; a
check that found the socket empty holds for RECHECK_SECONDS, so a busy worker makes one such system call
every 2 ms instead of one per hit (each one hands the GIL to another thread and queues the request behind
it): a message is then heeded at most that much later, well inside the 100 ms other pods are allowed.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable

import redis

from catalog.cache.board import InvalidationBoard
from catalog.cache.bounded import bounded_map, entry
from catalog.cache.keys import INVALIDATION_CHANNEL, WHOLE_CACHE

log = logging.getLogger(__name__)

NEAR_CACHE_BYTES = 32 * 1024 * 1024
# Writes to different products retire each other's in-flight fills only when they share a stripe.
STRIPES = 64
# The listener pings this often and gives up on a connection it has not heard from for SILENCE_SECONDS.
HEARTBEAT_SECONDS = 0.25
SILENCE_SECONDS = 1.0
RECONNECT_MIN_SECONDS = 0.05
RECONNECT_MAX_SECONDS = 1.0
# How long a check that found no invalidation waiting in the listener's socket holds (see above).
RECHECK_SECONDS = 0.002


Token = tuple[int, int]  # (this worker's invalidation epoch, the board's counter)


class NearCache:
    """A thread-safe, byte-bounded map of products and list pages with an expiry per entry.

    Fills are guarded by tokens: a reader takes `product_token` / `page_token` before it asks Redis, and
    `put_*` stores only if no invalidation (of that stripe, or of any page) reached this worker since, so a
    value read from Redis just before a write's invalidation can never land after it. Each entry also
    keeps the board counter of its product (or of the list pages) as it was when the token was taken: a
    write in any worker of this master bumps that counter before it answers, so no worker of the master
    serves the old entry once the write has answered (other pods drop it when the message arrives).
    """

    def __init__(self, board: InvalidationBoard, max_bytes: int = NEAR_CACHE_BYTES) -> None:
        self.board = board
        self.max_bytes = max_bytes
        self._entries = bounded_map(max_bytes)
        self._epochs = [0] * STRIPES
        self._pages = 0
        self._lock = threading.Lock()
        # Set only by the listener: True while subscribed and recently heard from; its socket then; and
        # True from before it takes messages out of the socket until it has applied them.
        self.live = False
        self._socket: socket.socket | None = None
        self.reading = False
        self._clear_at = -RECHECK_SECONDS  # time.monotonic() of the last check that found the socket empty

    def usable(self) -> bool:
        """May a read use the near-cache now? Asked before the lookup: only while subscribed, with no message
        waiting in the listener's socket and none taken out of it but not yet applied (in that order: a
        message leaves the socket only after `reading` is set)."""
        sock = self._socket
        if not self.live or sock is None:
            return False
        now = time.monotonic()
        if now - self._clear_at < RECHECK_SECONDS:
            return not self.reading
        try:
            waiting = select.select((sock,), (), (), 0)[0]
        except (OSError, ValueError):  # closed by the listener meanwhile
            return False
        if waiting or self.reading:
            return False
        self._clear_at = now
        return True

    @property
    def bytes_used(self) -> int:
        """What the entries count against the bound."""
        return int(self._entries.currsize)

    def __len__(self) -> int:
        return len(self._entries)

    def product(self, product_id: str) -> bytes | None:
        """The cached entry of a product, if not expired nor retired by a write."""
        with self._lock:
            found = self._entries.get("p" + product_id)
        if found is None or found.stamp != self.board.read(self.board.slot(product_id)):
            return None
        return found.value

    def page(self, params: str) -> bytes | None:
        """A cached list page, if not expired nor retired by a write."""
        with self._lock:
            found = self._entries.get("l" + params)
        if found is None or found.stamp != self._page_stamp(self._pages):
            return None
        return found.value

    def product_token(self, product_id: str) -> Token:
        """Taken before asking Redis; `put_product` stores only if it still holds."""
        return self._epochs[hash(product_id) % STRIPES], self.board.read(self.board.slot(product_id))

    def page_token(self) -> Token:
        """Taken before asking Redis; `put_page` stores only if it still holds."""
        return self._pages, self._page_stamp(self._pages)

    def _page_stamp(self, generation: int) -> int:
        """Pages are retired by a write anywhere: of this master (the board) or elsewhere (a message)."""
        return self.board.read(InvalidationBoard.LISTS) << 32 | generation & 0xFFFFFFFF

    def put_product(self, product_id: str, value: bytes, expires_at: float, token: Token) -> None:
        """Keep a product's entry until `expires_at`, unless an invalidation came after `token`."""
        with self._lock:
            if self.live and self._epochs[hash(product_id) % STRIPES] == token[0]:
                self._store("p" + product_id, value, expires_at, token[1])

    def put_page(self, params: str, value: bytes, expires_at: float, token: Token) -> None:
        """Keep a list page until `expires_at`, unless any write came after `token`."""
        with self._lock:
            if self.live and self._pages == token[0]:
                self._store("l" + params, value, expires_at, token[1])

    def drop(self, product_id: str) -> None:
        """A write: the product's entry and every list page go; fills in flight for them are refused."""
        with self._lock:
            self._epochs[hash(product_id) % STRIPES] += 1
            self._pages += 1
            self._entries.pop("p" + product_id, None)

    def flush(self) -> None:
        """Everything goes; every fill in flight is refused."""
        with self._lock:
            self._flush_locked()

    def enable(self, listening: socket.socket) -> None:
        """The listener subscribed on `listening`: start from nothing (invalidations may have been missed
        before)."""
        with self._lock:
            self._flush_locked()
            self.reading = False
            self._clear_at = -RECHECK_SECONDS
            self._socket = listening
            self.live = True

    def disable(self) -> None:
        """The listener lost its subscription: unused and empty until it subscribes again."""
        with self._lock:
            self._socket = None
            # Off already, it holds nothing and stores nothing: the failed reconnects that follow must not
            # retire the tokens of reads under way (a shared database load is joined only under the same).
            if self.live:
                self.live = False
                self._flush_locked()

    def _flush_locked(self) -> None:
        self._epochs = [epoch + 1 for epoch in self._epochs]
        self._pages += 1
        self._entries.clear()

    def _store(self, key: str, value: bytes, expires_at: float, stamp: int) -> None:
        stored = entry(key, value, expires_at, stamp, self.max_bytes)
        if stored is not None and expires_at > time.monotonic():
            self._entries[key] = stored


class InvalidationListener:
    """One thread per worker, subscribed to the invalidation channel on a connection of its own: each
    message drops a product (and the list pages) from the near-cache. It pings every HEARTBEAT_SECONDS; an
    error, a closed connection or SILENCE_SECONDS without an answer switch the near-cache off (flushed) until
    a new subscription is confirmed. It reconnects by itself, with a backoff."""

    def __init__(
        self,
        connect: Callable[[], redis.Redis],
        near: NearCache,
        on_subscribed: Callable[[], object],
    ) -> None:
        self.connect = connect
        self.near = near
        # Called on each new subscription, before the near-cache is used: Redis may have restarted empty.
        self.on_subscribed = on_subscribed
        self.subscriptions = 0  # confirmed subscriptions so far (for tests and logs)
        self._client: redis.Redis | None = None

    def run(self, stop: threading.Event) -> None:
        """Listen until `stop` is set (the thread's body)."""
        self.near.disable()
        delay = RECONNECT_MIN_SECONDS
        failing_since: float | None = None
        while not stop.is_set():
            try:
                self._listen(stop)
                delay = RECONNECT_MIN_SECONDS
            except Exception as error:
                self.near.disable()
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "cache invalidation listener disconnected: near-cache off",
                        extra={"error_type": type(error).__name__},
                    )
                self._close()
                stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                continue
            failing_since = None
        self.near.disable()
        self._close()

    def _listen(self, stop: threading.Event) -> None:
        if self._client is None:
            self._client = self.connect()
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(INVALIDATION_CHANNEL)
            heard = time.monotonic()
            while True:  # the confirmation; messages before it cannot exist
                message = pubsub.get_message(timeout=HEARTBEAT_SECONDS)
                if message is not None and message["type"] == "subscribe":
                    break
                if stop.is_set():
                    return
                if time.monotonic() - heard > SILENCE_SECONDS:
                    raise TimeoutError("no subscription confirmation")
            # redis-py reads the socket only inside get_message (which buffers what it reads), so waiting on
            # the socket itself keeps every unread message visible to `NearCache.usable`.
            # (what came with the confirmation is taken out of its buffer first).
            listening = pubsub.connection._get_socket()
            if listening is None:
                raise ConnectionError("the subscription has no socket")
            self._drain(pubsub)
            self.on_subscribed()
            self.subscriptions += 1
            self.near.enable(listening)
            if self.subscriptions > 1:
                log.info("cache invalidation listener subscribed again: near-cache on")
            heard = pinged = time.monotonic()
            while not stop.is_set():
                if select.select((listening,), (), (), HEARTBEAT_SECONDS)[0] and self._drain(pubsub):
                    heard = time.monotonic()
                now = time.monotonic()
                if now - pinged >= HEARTBEAT_SECONDS:
                    pubsub.ping()
                    pinged = now
                if now - heard > SILENCE_SECONDS:
                    raise TimeoutError("redis did not answer the listener's pings")
        finally:
            self.near.disable()
            pubsub.close()

    def _drain(self, pubsub: redis.client.PubSub) -> bool:
        """Apply every message read so far (and whatever the socket holds now); True if any came."""
        heard = False
        self.near.reading = True
        try:
            while (message := pubsub.get_message(timeout=0)) is not None:
                heard = True
                if message["type"] == "message":
                    self._apply(message["data"])
        finally:
            self.near.reading = False
        return heard

    def _apply(self, data: bytes) -> None:
        if data == WHOLE_CACHE:
            self.near.flush()
        else:
            self.near.drop(data.decode())

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
