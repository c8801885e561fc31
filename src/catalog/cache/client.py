"""The process's Redis client: short timeouts, one retry on a dropped connection, a circuit breaker."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.connection import parse_url
from redis.credentials import CredentialProvider
from redis.retry import Retry

from catalog.config import read_secret_file
from catalog.metrics import CACHE_CIRCUIT_OPEN

log = logging.getLogger(__name__)

# A dead or paused Redis must cost a request at most about 2 x the timeout (connect, then read).
SOCKET_TIMEOUT_SECONDS = 0.2
RETRIES = 1
HEALTH_CHECK_SECONDS = 10
FAILURES_TO_OPEN = 3
OPEN_SECONDS = 3.0


class CircuitBreaker:
    """Closed until FAILURES_TO_OPEN consecutive failures; open for OPEN_SECONDS; then one probe at a time."""

    def __init__(self, failures_to_open: int = FAILURES_TO_OPEN, open_seconds: float = OPEN_SECONDS) -> None:
        self.failures_to_open = failures_to_open
        self.open_seconds = open_seconds
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        """True while calls are refused (open, or half-open with a probe under way)."""
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a call go to Redis now?"""
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probing or time.monotonic() - self._opened_at < self.open_seconds:
                return False
            self._probing = True
            return True

    def succeeded(self) -> None:
        """A call answered: close the circuit."""
        if self._failures or self._opened_at is not None:
            with self._lock:
                was_open = self._opened_at is not None
                self._failures, self._opened_at, self._probing = 0, None, False
            if was_open:
                CACHE_CIRCUIT_OPEN.set(0)
                log.info("redis circuit closed")

    def failed(self) -> None:
        """A call failed: count it, and open (again) at the threshold."""
        with self._lock:
            self._failures += 1
            self._probing = False
            newly_open = self._opened_at is None and self._failures >= self.failures_to_open
            if self._opened_at is not None or newly_open:
                self._opened_at = time.monotonic()
        if newly_open:
            CACHE_CIRCUIT_OPEN.set(1)
            log.warning("redis circuit opened", extra={"failures": self._failures})


class PasswordFileProvider(CredentialProvider):
    """Reads the Redis password from its mounted Secret on each new connection: rotation needs no restart."""

    def __init__(self, path: str, username: str | None) -> None:
        self.path = path
        self.username = username

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        # redis-py drops a half-made connection on a RedisError; an OSError would leave it unauthenticated.
        try:
            password = read_secret_file(self.path)
        except OSError as error:
            raise redis.AuthenticationError(
                f"the Redis password file cannot be read: {error.strerror}"
            ) from None
        return (self.username, password) if self.username else (password,)


def make_redis(
    url: str,
    password_file: str | None,
    pool_size: int,
    retries: int = RETRIES,
    health_check_seconds: int = HEALTH_CHECK_SECONDS,
) -> redis.Redis:
    """A client that fails fast: short timeouts, one immediate retry, connection health checks.

    Options in the URL's query (e.g. `ssl_ca_certs` for `rediss://`) override these defaults."""
    options: dict[str, Any] = {
        "max_connections": pool_size,
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_keepalive": True,
        # A dropped connection is worth one immediate retry; a timeout is not: a Redis that did not answer
        # in time will not answer the retry either, and retrying (health-check PING, then command, each
        # with its own retry) made one call to a paused Redis cost 4 x the timeout instead of 1-2 x.
        "retry": Retry(NoBackoff(), retries, supported_errors=(redis.ConnectionError,)),
        "retry_on_error": [redis.ConnectionError] if retries else [],
        "health_check_interval": health_check_seconds,
        "client_name": "catalog",
        **parse_url(url),  # type: ignore[no-untyped-call]
    }
    if password_file:
        options["credential_provider"] = PasswordFileProvider(password_file, options.pop("username", None))
        options.pop("password", None)
    return redis.Redis(connection_pool=redis.ConnectionPool(**options))


class RedisUnavailable(Exception):
    """Redis was not consulted: its circuit is open, or the call failed."""


class CircuitOpen(RedisUnavailable):
    """Redis was not called at all: its circuit is open."""


class GuardedRedis:
    """Every Redis call of the process goes through here: the breaker and error logging."""

    def __init__(self, client: redis.Redis, breaker: CircuitBreaker) -> None:
        self.client = client
        self.breaker = breaker
        # The process's Lua scripts, loaded into Redis whenever it may have restarted empty (the near-cache's
        # listener subscribing), so that their first EVALSHA is not a NOSCRIPT error.
        self.scripts: list[str] = []

    def register_script(self, source: str) -> Script:
        """A Lua script run by EVALSHA (redis-py loads it on NOSCRIPT), kept in `scripts`."""
        self.scripts.append(source)
        return self.client.register_script(source)

    def load_scripts(self) -> None:
        """Load every registered script now (best effort: EVALSHA still loads a missing one itself)."""
        with contextlib.suppress(RedisUnavailable):
            self.call(lambda client: [client.script_load(source) for source in self.scripts])

    def call(self, operation: Callable[[redis.Redis], Any]) -> Any:
        """Run `operation(client)`; raise RedisUnavailable instead of waiting on a Redis that is failing."""
        if not self.breaker.allow():
            raise CircuitOpen
        try:
            result = operation(self.client)
        # Whatever goes wrong talking to Redis (also a bug in a script) is a miss, never a failed request.
        except Exception as error:
            self.breaker.failed()
            log.warning("redis call failed", extra={"error_type": type(error).__name__})
            raise RedisUnavailable from error
        self.breaker.succeeded()
        return result
