"""The database: engine per process, Core tables, and every query the service runs."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    exists,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from catalog.config import Settings, database_url_with_password
from catalog.domain import DuplicateSku, IdempotencyKeyInFlight, Unavailable
from catalog.metrics import DB_QUERIES

if TYPE_CHECKING:
    from flask import Flask

# What a client is told to wait, and what a background job backs off, when the database cannot serve.
RETRY_AFTER_SECONDS = 5
# SQLite result codes (the low byte of an extended code) that mean "not now" rather than a bug: another
# connection holds the lock past the busy timeout, or the file cannot be opened. Others (no such table,
# a syntax error) stay what they are.
SQLITE_NOT_NOW = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN})


metadata = MetaData()

products = Table(
    "products",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("sku", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("price_cents", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("tags", JSON, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("version", Integer, nullable=False),
    UniqueConstraint("sku", name="uq_products_sku"),
)

product_tags = Table(
    "product_tags",
    metadata,
    Column("product_id", String(26), ForeignKey("products.id", ondelete="CASCADE"), nullable=False),
    Column("tag", String(40), nullable=False),
    PrimaryKeyConstraint("product_id", "tag"),
    Index("ix_product_tags_tag_product", "tag", "product_id"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("client", String(200), nullable=False),
    Column("key", String(255), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Column("body", Text, nullable=False),
    Column("location", String(300), nullable=True),
    Column("created_at", DateTime, nullable=False),
    PrimaryKeyConstraint("client", "key"),
    Index("ix_idempotency_keys_created_at", "created_at"),
)

IDEMPOTENCY_WINDOW = dt.timedelta(hours=24)

# The outbox of cache invalidations: one row per write (when the cache is shared by pods), inserted in the
# write's own transaction and deleted once Redis took the invalidation (catalog.outbox).
cache_outbox = Table(
    "cache_outbox",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("product_id", String(26), nullable=False),
    Column("created_at", DateTime, nullable=False),
    sqlite_autoincrement=True,  # ids never reused: a pod's distrust names the newest row it waits for
)


def utcnow() -> dt.datetime:
    """Now in UTC, naive (both backends store UTC without a zone)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def make_engine(settings: Settings) -> Engine:
    """An engine: SQLite with WAL, or PostgreSQL through psycopg 3; no wait longer than
    `database_wait_seconds` for a connection, a lock or a free pooled connection."""
    url = database_url_with_password(settings)
    wait = settings.database_wait_seconds
    if url.get_backend_name() == "sqlite":
        # sqlite3's `timeout` is SQLite's busy timeout: how long a write waits for another's lock.
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": wait}, pool_timeout=wait
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_size=settings.threads,
        max_overflow=settings.threads,
        pool_timeout=wait,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": max(1, round(wait)), "application_name": "catalog"},
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Database:
    """The engine of this process and the queries over it; each query counts in catalog_db_queries_total."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def dispose(self) -> None:
        """Drop pooled connections inherited from a parent process (called after fork)."""
        self.engine.dispose(close=False)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A pooled connection. A database that cannot serve now (unreachable, restarted under an open
        connection, locked past the busy timeout, no pooled connection free in time) raises Unavailable;
        what was not committed is rolled back, so nothing changed."""
        try:
            connection = self.engine.connect()
        except (OperationalError, PoolTimeout) as error:
            # Whatever stops us getting a connection at all, the database is not there for us now.
            raise _unavailable(unavailable_reason(error) or _kind(error)) from error
        try:
            with connection:
                yield connection
        except DBAPIError as error:
            reason = unavailable_reason(error)
            if reason is None:
                raise
            raise _unavailable(reason) from error

    @contextmanager
    def transaction(self, *, locked: bool = False) -> Iterator[Connection]:
        """A connection inside one transaction, committed on success (Unavailable as for `connect`).
        PostgreSQL locks the rows it reads `for_update` until it ends. SQLite (pysqlite begins a transaction
        only at the first INSERT/UPDATE/DELETE) reads outside it, unless `locked`: then it holds the
        database's write lock from its first statement, so nothing it reads can change before it writes."""
        with self.connect() as connection, connection.begin():
            if locked and connection.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection

    def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        DB_QUERIES.labels(operation="ping").inc()

    def get_product(self, product_id: str) -> dict[str, Any] | None:
        """One product row, or None."""
        with self.connect() as connection:
            row = connection.execute(select(products).where(products.c.id == product_id)).mappings().first()
        DB_QUERIES.labels(operation="get_product").inc()
        return dict(row) if row else None

    def list_products(self, limit: int, after_id: str | None, tag: str | None) -> list[dict[str, Any]]:
        """Up to `limit` products in id order, after `after_id`, optionally having `tag`."""
        query = select(products).order_by(products.c.id).limit(limit)
        if after_id is not None:
            query = query.where(products.c.id > after_id)
        if tag is not None:
            query = query.where(
                exists().where(product_tags.c.product_id == products.c.id, product_tags.c.tag == tag)
            )
        with self.connect() as connection:
            rows = connection.execute(query).mappings().all()
        DB_QUERIES.labels(operation="list_products").inc()
        return [dict(row) for row in rows]

    def insert_product(self, connection: Connection, row: Mapping[str, Any]) -> None:
        """Insert a product and its tags; DuplicateSku if another product has its sku."""
        try:
            connection.execute(insert(products).values(**row))
        except IntegrityError as error:
            if _is_unique_violation(error):
                raise DuplicateSku(f"A product with sku {row['sku']!r} already exists.") from None
            raise
        self._write_tags(connection, row["id"], row["tags"])
        DB_QUERIES.labels(operation="insert_product").inc()

    def update_product(
        self,
        connection: Connection,
        product_id: str,
        expected_version: int,
        values: Mapping[str, Any],
        previous_tags: Sequence[str],
    ) -> bool:
        """Apply `values` if the row still has `expected_version` (False, with nothing changed, when another
        writer got there first: possible only where the read was not locked); DuplicateSku if the new sku is
        another product's. The tag index is rewritten only when the set of tags differs from
        `previous_tags` (the row's, read in this transaction)."""
        try:
            result = connection.execute(
                update(products)
                .where(products.c.id == product_id, products.c.version == expected_version)
                .values(**values)
            )
        except IntegrityError as error:
            if _is_unique_violation(error):
                raise DuplicateSku("Another product already has this sku.") from None
            raise
        DB_QUERIES.labels(operation="update_product").inc()
        if result.rowcount != 1:
            return False
        if set(values["tags"]) != set(previous_tags):
            connection.execute(delete(product_tags).where(product_tags.c.product_id == product_id))
            self._write_tags(connection, product_id, values["tags"])
        return True

    def delete_product(self, connection: Connection, product_id: str) -> None:
        """Delete a row read with `get_product_for_update` in a `locked` transaction, and its tags."""
        connection.execute(delete(product_tags).where(product_tags.c.product_id == product_id))
        connection.execute(delete(products).where(products.c.id == product_id))
        DB_QUERIES.labels(operation="delete_product").inc()

    def get_product_for_update(self, connection: Connection, product_id: str) -> dict[str, Any] | None:
        """The current row inside a write transaction, locked until it ends on PostgreSQL (and on SQLite in
        a `locked` one): concurrent writers of one product queue here, each reading what the one before it
        wrote."""
        query = select(products).where(products.c.id == product_id).with_for_update()
        row = connection.execute(query).mappings().first()
        DB_QUERIES.labels(operation="get_product").inc()
        return dict(row) if row else None

    def get_idempotent(self, client: str, key: str) -> dict[str, Any] | None:
        """The stored answer for (client, Idempotency-Key), if still within its window."""
        query = select(idempotency_keys).where(
            idempotency_keys.c.client == client,
            idempotency_keys.c.key == key,
            idempotency_keys.c.created_at > utcnow() - IDEMPOTENCY_WINDOW,
        )
        with self.connect() as connection:
            row = connection.execute(query).mappings().first()
        DB_QUERIES.labels(operation="get_idempotency_key").inc()
        return dict(row) if row else None

    def store_idempotent(self, connection: Connection, record: Mapping[str, Any]) -> None:
        """Record the answer given for an Idempotency-Key and drop records past their window;
        IdempotencyKeyInFlight if a concurrent request with the same key committed first."""
        connection.execute(
            delete(idempotency_keys).where(idempotency_keys.c.created_at <= utcnow() - IDEMPOTENCY_WINDOW)
        )
        try:
            connection.execute(insert(idempotency_keys).values(**record))
        except IntegrityError as error:
            if _is_unique_violation(error):
                raise IdempotencyKeyInFlight(
                    "A request with this Idempotency-Key is being answered; retry it shortly."
                ) from None
            raise
        DB_QUERIES.labels(operation="store_idempotency_key").inc()

    def record_invalidation(self, connection: Connection, product_id: str) -> int:
        """Add the invalidation of a product to the outbox, inside the write's transaction; its row id."""
        result = connection.execute(insert(cache_outbox).values(product_id=product_id, created_at=utcnow()))
        DB_QUERIES.labels(operation="record_invalidation").inc()
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])

    def pending_invalidations(self, recorded_before: dt.datetime, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` outbox rows recorded before `recorded_before`, oldest first: (row id, product id)."""
        query = (
            select(cache_outbox.c.id, cache_outbox.c.product_id)
            .where(cache_outbox.c.created_at < recorded_before)
            .order_by(cache_outbox.c.id)
            .limit(limit)
        )
        with self.connect() as connection:
            rows = connection.execute(query).all()
        DB_QUERIES.labels(operation="pending_invalidations").inc()
        return [(row.id, row.product_id) for row in rows]

    def invalidations_pending_up_to(self, row_id: int) -> bool:
        """Whether any outbox row with an id up to `row_id` is still there (not yet delivered)."""
        query = select(cache_outbox.c.id).where(cache_outbox.c.id <= row_id).limit(1)
        with self.connect() as connection:
            found = connection.execute(query).first()
        DB_QUERIES.labels(operation="pending_invalidations").inc()
        return found is not None

    def delete_invalidations(self, row_ids: Sequence[int]) -> None:
        """Remove delivered outbox rows."""
        with self.transaction() as connection:
            connection.execute(delete(cache_outbox).where(cache_outbox.c.id.in_(row_ids)))
        DB_QUERIES.labels(operation="delete_invalidations").inc()

    @staticmethod
    def _write_tags(connection: Connection, product_id: str, tags: Sequence[str]) -> None:
        unique = list(dict.fromkeys(tags))
        if unique:
            connection.execute(insert(product_tags), [{"product_id": product_id, "tag": t} for t in unique])


def unavailable_reason(error: BaseException) -> str | None:
    """When `error` means the database cannot serve now, what kind of failure it is (a name, never the
    message: that may hold a host, a path or SQL); None when it is something else, such as a bug."""
    if isinstance(error, PoolTimeout):
        return "PoolTimeout"
    if not isinstance(error, DBAPIError):
        return None
    cause = error.orig
    if isinstance(cause, sqlite3.Error):
        code = getattr(cause, "sqlite_errorcode", 0) & 0xFF
        return str(cause.sqlite_errorname) if code in SQLITE_NOT_NOW else None
    if error.connection_invalidated or isinstance(error, OperationalError):
        return _kind(error)
    return None


def _kind(error: BaseException) -> str:
    """The class name of the driver's exception (e.g. AdminShutdown), else of `error` itself."""
    return type(error.orig if isinstance(error, DBAPIError) else error).__name__


def _unavailable(reason: str) -> Unavailable:
    return Unavailable(
        "The database cannot answer at the moment; retry shortly.",
        dependency="database",
        reason=reason,
        retry_after_seconds=RETRY_AFTER_SECONDS,
    )


def _is_unique_violation(error: IntegrityError) -> bool:
    """True when the integrity error is a unique-constraint violation (duplicate sku or key)."""
    code = getattr(error.orig, "sqlstate", None)
    if code is not None:
        return bool(code == "23505")
    return "UNIQUE" in str(error.orig).upper()


def dumps(value: Any) -> str:
    """Compact JSON for stored answers."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def init_app(app: Flask) -> None:
    """Create this process's engine; gunicorn's post_fork disposes any inherited pool."""
    app.extensions["catalog.db"] = Database(make_engine(app.config["SETTINGS"]))
