"""The products service: reads go through the cache; writes record their invalidation in their transaction
and deliver it after the commit (catalog.outbox)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app

from catalog.cache import Cache, Status
from catalog.db import Database, dumps, utcnow
from catalog.domain import (
    Conflict,
    IdempotencyKeyReused,
    InvalidCursor,
    NotFound,
    PreconditionFailed,
)
from catalog.outbox import Outbox

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_PATTERN = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")

Fields = dict[str, Any]
Precondition = Callable[[int], bool]


def new_id() -> str:
    """A 26-character id that sorts by creation time: 48 bits of milliseconds, 80 random bits (Crockford)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


# What encode_cursor makes of an id (26 ASCII characters: 35 of unpadded URL-safe base64); the API
# document states it, and decode_cursor checks the rest.
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{35}$"


def encode_cursor(product_id: str) -> str:
    """An opaque cursor that resumes after `product_id`."""
    return base64.urlsafe_b64encode(product_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The id a cursor resumes after; InvalidCursor if it was not made here."""
    try:
        product_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        product_id = ""
    if not ID_PATTERN.match(product_id):
        raise InvalidCursor(
            "The cursor is not one this service returned.",
            [{"loc": ["query", "cursor"], "msg": "invalid cursor"}],
        )
    return product_id


def _timestamp(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def public(row: Mapping[str, Any]) -> dict[str, Any]:
    """The product as the API shows it."""
    return {
        "id": row["id"],
        "sku": row["sku"],
        "name": row["name"],
        "description": row["description"],
        "price_cents": row["price_cents"],
        "currency": row["currency"],
        "tags": list(row["tags"]),
        "created_at": _timestamp(row["created_at"]),
        "updated_at": _timestamp(row["updated_at"]),
        "version": row["version"],
    }


def encode_entry(row: Mapping[str, Any]) -> bytes:
    """A cache entry: the product's JSON body, nothing else (a cache holds JSON, never pickle). `public`
    puts `version` last, so the entry ends with `"version":<n>}`."""
    return dumps(public(row)).encode()


def entry_version(entry: bytes) -> str:
    """The version (the ETag's digits) of a cache entry, read off its end without parsing the JSON."""
    return entry[entry.rindex(b":") + 1 : -1].decode()


def request_fingerprint(body: Any) -> str:
    """The same JSON body always gives the same fingerprint, whatever its key order or spacing."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Created:
    """The answer to a create: fresh, or replayed for a repeated Idempotency-Key."""

    status: int
    body: bytes
    location: str | None
    replayed: bool


class ProductService:
    """Every read and write of products; routes call only this."""

    def __init__(self, db: Database, cache: Cache) -> None:
        self.db = db
        self.cache = cache
        self.outbox = Outbox(db, cache)

    def get(self, product_id: str) -> tuple[str, bytes, Status]:
        """(version, JSON body, cache status) of a product; NotFound if absent."""
        if not ID_PATTERN.match(product_id):
            raise NotFound(f"No product has the id {product_id!r}.")

        def load() -> bytes | None:
            row = self.db.get_product(product_id)
            return encode_entry(row) if row else None

        entry, status = self.cache.product(product_id, load)
        if entry is None:
            raise NotFound(f"No product has the id {product_id!r}.")
        return entry_version(entry), entry, status

    def list(self, limit: int, cursor: str | None, tag: str | None) -> tuple[bytes, Status]:
        """One page of products in a stable order, with the cursor of the next page."""
        after_id = decode_cursor(cursor) if cursor else None

        def load() -> bytes:
            rows = self.db.list_products(limit + 1, after_id, tag)
            page = rows[:limit]
            next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
            return dumps({"items": [public(row) for row in page], "next_cursor": next_cursor}).encode()

        body, status = self.cache.page(f"{limit}:{after_id or ''}:{tag or ''}", load)
        assert body is not None
        return body, status

    def create(self, fields: Fields, client: str, idempotency_key: str | None, fingerprint: str) -> Created:
        """Insert a product; a repeated Idempotency-Key gets the first answer back."""
        if idempotency_key:
            replay = self._replay(client, idempotency_key, fingerprint)
            if replay:
                return replay
        now = utcnow()
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        row = {**fields, "id": new_id(), "created_at": now, "updated_at": now, "version": 1}
        body = dumps(public(row)).encode()
        location = f"/api/v1/products/{row['id']}"
        try:
            with self.db.transaction() as connection:
                self.db.insert_product(connection, row)
                if idempotency_key:
                    self.db.store_idempotent(
                        connection,
                        {
                            "client": client,
                            "key": idempotency_key,
                            "request_hash": fingerprint,
                            "status": 201,
                            "body": body.decode(),
                            "location": location,
                            "created_at": now,
                        },
                    )
                pending = self.outbox.record(connection, row["id"])
        except Conflict:
            # A concurrent repeat of this request may have committed first: then its answer is ours.
            replay = self._replay(client, idempotency_key, fingerprint) if idempotency_key else None
            if replay:
                return replay
            raise
        self.outbox.deliver(row["id"], pending)
        return Created(201, body, location, replayed=False)

    def replace(
        self, product_id: str, fields: Fields, precondition: Precondition | None
    ) -> tuple[int, bytes]:
        """Replace every field; (new version, JSON body)."""
        return self._write(product_id, lambda _current: fields, precondition)

    def patch(
        self, product_id: str, change: Callable[[Fields], Fields], precondition: Precondition | None
    ) -> tuple[int, bytes]:
        """Apply `change` to the current fields (a JSON merge patch, validated by the caller)."""
        return self._write(product_id, change, precondition)

    def delete(self, product_id: str, precondition: Precondition | None) -> None:
        """Delete a product; NotFound if absent, PreconditionFailed on a stale If-Match."""
        with self.db.transaction(locked=True) as connection:  # deletes are rare: no optimistic first try
            current = (
                self.db.get_product_for_update(connection, product_id)
                if ID_PATTERN.match(product_id)
                else None
            )
            if current is None:
                raise NotFound(f"No product has the id {product_id!r}.")
            if precondition and not precondition(current["version"]):
                raise PreconditionFailed("The product has changed since the version named in If-Match.")
            self.db.delete_product(connection, product_id)
            pending = self.outbox.record(connection, product_id)
        self.outbox.deliver(product_id, pending)

    def _write(
        self, product_id: str, change: Callable[[Fields], Fields], precondition: Precondition | None
    ) -> tuple[int, bytes]:
        if not ID_PATTERN.match(product_id):
            raise NotFound(f"No product has the id {product_id!r}.")
        # SQLite: first without its write lock (held only from the UPDATE to the commit, so writes of other
        # products wait less); if another writer committed between the read and the UPDATE, once more with
        # the lock held from the read, which cannot lose. PostgreSQL's row lock makes the first one enough.
        written = self._attempt_write(product_id, change, precondition, locked=False) or self._attempt_write(
            product_id, change, precondition, locked=True
        )
        if written is None:  # a read under the write lock cannot be overtaken
            raise RuntimeError(f"product {product_id} changed under the database's write lock")
        row, pending = written
        self.outbox.deliver(product_id, pending)
        return row["version"], dumps(public(row)).encode()

    def _attempt_write(
        self,
        product_id: str,
        change: Callable[[Fields], Fields],
        precondition: Precondition | None,
        *,
        locked: bool,
    ) -> tuple[dict[str, Any], int | None] | None:
        """(the new row, its outbox row's id); None when another writer came between read and write."""
        with self.db.transaction(locked=locked) as connection:
            current = self.db.get_product_for_update(connection, product_id)
            if current is None:
                raise NotFound(f"No product has the id {product_id!r}.")
            if precondition and not precondition(current["version"]):
                raise PreconditionFailed("The product has changed since the version named in If-Match.")
            fields = change(editable(current))
            now = utcnow()
            values = {
                **fields,
                "updated_at": now.replace(microsecond=now.microsecond // 1000 * 1000),
                "version": current["version"] + 1,
            }
            version, tags = current["version"], current["tags"]
            if not self.db.update_product(connection, product_id, version, values, tags):
                return None
            return {**current, **values}, self.outbox.record(connection, product_id)

    def _replay(self, client: str, key: str, fingerprint: str) -> Created | None:
        stored = self.db.get_idempotent(client, key)
        if stored is None:
            return None
        if stored["request_hash"] != fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was used in the last 24 hours with a different request body."
            )
        return Created(stored["status"], stored["body"].encode(), stored["location"], replayed=True)


EDITABLE = ("sku", "name", "description", "price_cents", "currency", "tags")


def editable(row: Mapping[str, Any]) -> Fields:
    """The fields a client may change."""
    return {name: row[name] for name in EDITABLE}


def service() -> ProductService:
    """The products service of the current app."""
    return current_app.extensions["catalog.products"]  # type: ignore[no-any-return]


def init_app(app: Flask) -> None:
    """Wire the service to this app's database and cache; a cache shared by pods gets its outbox sweeper
    (a thread in every worker)."""
    products = ProductService(app.extensions["catalog.db"], app.extensions["catalog.cache"])
    if products.outbox.shared is not None:
        app.extensions["catalog.background"].run("cache-outbox", products.outbox.run)
    app.extensions["catalog.products"] = products
