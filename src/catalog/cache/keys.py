"""Names in Redis: every cache key, and the channel invalidations are published on."""

from __future__ import annotations

# Bump when the cached shape of a product or page changes: a deploy then never reads old entries.
CACHE_SCHEMA = 1
PREFIX = f"catalog:v{CACHE_SCHEMA}:"
# Every write publishes the product's id here; the message below retires every worker's whole near-cache.
INVALIDATION_CHANNEL = f"{PREFIX}invalidations"
WHOLE_CACHE = b"*"
LIST_TICKET = f"{PREFIX}lists"
# Held (SET NX PX) by the one outbox sweeper, of all pods, that delivers pending invalidations right now.
OUTBOX_SWEEPER = f"{PREFIX}outbox-sweeper"


def product_key(product_id: str) -> str:
    """Where a product's entry lives."""
    return f"{PREFIX}product:{product_id}"


def product_ticket(product_id: str) -> str:
    """The token every write of the product replaces (a fill under an older one is refused)."""
    return f"{PREFIX}ticket:{product_id}"


def page_key(generation: bytes, params: str) -> str:
    """Where a list page filled under the list ticket `generation` lives."""
    return f"{PREFIX}list:{generation.decode()}:{params}"


def fill_lock(key: str) -> str:
    """Held by the one reader that fills `key` while the others wait for it."""
    return f"{PREFIX}lock:{key}"
