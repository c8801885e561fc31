"""What the store and the service can fail with, in their own words: no HTTP, no Flask, no request.

`db.py` and `products.py` raise these; `errors.py` alone turns them into problem bodies. Nothing here
needs a request, so work done off the request path (a background delivery or sweep) raises and catches
the same errors: `Unavailable.retry_after_seconds` is its back-off as much as a client's Retry-After.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Something a caller can act on; `detail` is safe to show (no SQL, no path, no key)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    """No product has this id."""


class Conflict(DomainError):
    """The write collides with the current state of another resource."""


class DuplicateSku(Conflict):
    """Another product already has this sku."""


class IdempotencyKeyInFlight(Conflict):
    """Another request with this Idempotency-Key committed first, and its answer cannot be read yet."""


class PreconditionFailed(DomainError):
    """The product is not at the version the caller named (If-Match), or it changed during the write."""


class InvalidInput(DomainError):
    """Input that passed the schema but is still unusable; `errors` locate it like validation errors."""

    def __init__(self, detail: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(detail)
        self.errors = errors


class InvalidCursor(InvalidInput):
    """The cursor was not made by this service."""


class IdempotencyKeyReused(DomainError):
    """The Idempotency-Key was used before with a different body."""


class Unavailable(DomainError):
    """A dependency cannot serve now; nothing was changed. Retrying after `retry_after_seconds` may work.

    `dependency` names it ("database"); `reason` is the failure's kind (an exception class name, never its
    message, which may hold a host, a path or SQL)."""

    def __init__(self, detail: str, *, dependency: str, reason: str, retry_after_seconds: int) -> None:
        super().__init__(detail)
        self.dependency = dependency
        self.reason = reason
        self.retry_after_seconds = retry_after_seconds
