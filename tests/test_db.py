"""The store: a database that cannot serve now (restarted under an open connection, locked past the busy
timeout, no pooled connection free) is a 503 with Retry-After and one warning, and a write that did not
commit changes nothing; the store and the service speak no HTTP."""

import ast
import dataclasses
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tests.conftest import PrivatePostgres, assert_problem, auth, product_body

from catalog import create_app, db, domain, errors
from catalog.cli import upgrade
from catalog.config import Settings
from catalog.domain import DomainError, Unavailable

ROOT = Path(__file__).resolve().parent.parent
# Short enough to keep the tests quick, long enough that a loaded machine still gets its lock or connection
# when nothing holds it.
SHORT_WAIT_SECONDS = 0.5


def query_one(url: str, sql: str, **parameters: Any) -> Any:
    """The one value `sql` selects, read from the database itself (not the API, not a cache)."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as connection:
        value = connection.execute(text(sql), parameters).scalar()
    engine.dispose()
    return value


def products_with_sku(url: str, sku: str) -> int:
    """How many products the database holds with `sku`."""
    return int(query_one(url, "SELECT count(*) FROM products WHERE sku = :sku", sku=sku))


def assert_one_warning_and_503(response: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The client gets 503 + Retry-After; the log gets one WARNING line and nothing worse."""
    body = assert_problem(response, 503)
    assert response.headers["Retry-After"] == str(db.RETRY_AFTER_SECONDS)
    assert "select" not in body["detail"].lower() and "insert" not in body["detail"].lower()
    noteworthy = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.levelname for record in noteworthy] == ["WARNING"], [r.getMessage() for r in noteworthy]
    assert noteworthy[0].request_id == response.headers["X-Request-ID"]  # type: ignore[attr-defined]


# --- PostgreSQL restarted after the pre-ping ---------------------------------------------------------------


@pytest.fixture
def postgres(private_postgres: Callable[..., PrivatePostgres]) -> PrivatePostgres:
    """A private PostgreSQL of the test's own (so it may be restarted), started and migrated."""
    server = private_postgres()
    server.start()
    upgrade(Settings(database_url=server.url()))
    return server


@pytest.fixture
def pg_app(postgres: PrivatePostgres, settings: Settings) -> Iterator[Any]:
    """The app on that server."""
    application = create_app(dataclasses.replace(settings, database_url=postgres.url()))
    yield application
    application.extensions["catalog.db"].engine.dispose()


def restart_once_on(
    engine: Any, event_name: str, postgres: PrivatePostgres, statement_start: str | None = None
) -> None:
    """Restart PostgreSQL the first time `event_name` fires on `engine` (for a statement starting with
    `statement_start`, if given): after the pool's pre-ping passed, before the statement or the commit
    reaches the server."""
    fired = False

    def restart(_connection: Connection, *args: Any) -> None:
        nonlocal fired
        if fired or (statement_start and not str(args[1]).lstrip().startswith(statement_start)):
            return
        fired = True
        postgres.stop()  # immediate: every backend dies at once, as in a crash or a failover
        postgres.start()

    event.listen(engine, event_name, restart)


@pytest.mark.parametrize(
    ("event_name", "statement_start"),
    [("before_cursor_execute", "INSERT INTO products"), ("commit", None)],
)
def test_postgres_restarted_before_a_write_is_a_503_and_nothing_is_written(
    pg_app: Any,
    postgres: PrivatePostgres,
    caplog: pytest.LogCaptureFixture,
    event_name: str,
    statement_start: str | None,
) -> None:
    client = pg_app.test_client()
    assert client.get("/api/v1/products", headers=auth()).status_code == 200  # a pooled connection
    restart_once_on(pg_app.extensions["catalog.db"].engine, event_name, postgres, statement_start)
    body = product_body()
    caplog.clear()
    response = client.post(
        "/api/v1/products", json=body, headers={**auth(), "Idempotency-Key": f"restart-{event_name}"}
    )
    assert_one_warning_and_503(response, caplog)
    assert products_with_sku(postgres.url(), body["sku"]) == 0, f"written although {event_name} failed"
    again = client.post(
        "/api/v1/products", json=body, headers={**auth(), "Idempotency-Key": f"restart-{event_name}"}
    )
    assert again.status_code == 201, again.get_json()  # nothing was recorded for the key either
    assert products_with_sku(postgres.url(), body["sku"]) == 1


def test_postgres_restarted_before_a_read_is_a_503(
    pg_app: Any, postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture
) -> None:
    client = pg_app.test_client()
    assert client.get("/api/v1/products", headers=auth()).status_code == 200
    restart_once_on(pg_app.extensions["catalog.db"].engine, "before_cursor_execute", postgres, "SELECT")
    caplog.clear()
    assert_one_warning_and_503(client.get("/api/v1/products?limit=7", headers=auth()), caplog)
    assert client.get("/api/v1/products?limit=7", headers=auth()).status_code == 200


# --- SQLite locked past the busy timeout, and no pooled connection free ----------------------------------


@pytest.fixture
def short_wait(settings: Settings) -> Settings:
    """Settings whose requests wait SHORT_WAIT_SECONDS for the database, on SQLite."""
    return dataclasses.replace(settings, database_wait_seconds=SHORT_WAIT_SECONDS)


@pytest.fixture
def short_client(short_wait: Settings, make_client: Callable[[Settings], Any]) -> Any:
    """A test client of an app with those settings (built before the test's log capture starts)."""
    return make_client(short_wait)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_sqlite_locked_past_the_busy_timeout_is_a_503_and_nothing_changes(
    short_wait: Settings, short_client: Any, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    client = short_client
    existing = client.post("/api/v1/products", json=product_body(), headers=auth()).get_json()
    url = "/api/v1/products" if method == "POST" else f"/api/v1/products/{existing['id']}"
    body = product_body()
    holder = sqlite3.connect(short_wait.database_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        caplog.clear()
        response = client.open(url, method=method, json=None if method == "DELETE" else body, headers=auth())
        assert_one_warning_and_503(response, caplog)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert products_with_sku(short_wait.database_url, body["sku"]) == 0
    version = "SELECT version FROM products WHERE id = :id"
    assert query_one(short_wait.database_url, version, id=existing["id"]) == 1  # neither changed nor gone
    retried = client.open(url, method=method, json=None if method == "DELETE" else body, headers=auth())
    assert retried.status_code < 300, retried.get_json()


def test_no_free_pooled_connection_in_time_is_a_503(
    short_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = short_client
    engine = client.application.extensions["catalog.db"].engine
    held = []
    try:
        while True:  # every connection the pool may hand out, taken until it has none left in time
            try:
                held.append(engine.connect())
            except PoolTimeout:
                break
        caplog.clear()
        assert_one_warning_and_503(client.get("/api/v1/products", headers=auth()), caplog)
    finally:
        for connection in held:
            connection.close()
    assert len(held) >= 1
    assert client.get("/api/v1/products", headers=auth()).status_code == 200


# --- the store and the service speak no HTTP ------------------------------------------------------------

# What serves HTTP: the framework and the modules of this service that deal in requests and responses.
WEB_LAYER = (
    "flask",
    "werkzeug",
    "flask_openapi3",
    "catalog.errors",
    "catalog.api",
    "catalog.auth",
    "catalog.limits",
)


def runtime_imports(path: Path) -> set[str]:
    """Every module `path` imports when it runs (imports only made for the type checker left out)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def is_web(module: str) -> bool:
    return any(module == web or module.startswith(f"{web}.") for web in WEB_LAYER)


@pytest.mark.parametrize("module", ["db", "domain"])
def test_the_store_and_its_errors_import_nothing_of_the_web_layer(module: str) -> None:
    imports = runtime_imports(ROOT / "src" / "catalog" / f"{module}.py")
    assert imports and not [name for name in imports if is_web(name)]


def test_the_service_raises_domain_errors_only() -> None:
    imports = runtime_imports(ROOT / "src" / "catalog" / "products.py")
    assert not [name for name in imports if is_web(name) and name != "flask"], imports  # flask: wiring only
    assert "catalog.domain" in imports


def test_loading_the_store_loads_no_module_of_this_service_s_web_layer(tmp_path: Path) -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, catalog.db; print('\\n'.join(sys.modules))"],
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "catalog.db" in loaded
    assert not [name for name in loaded if name.startswith(("catalog.", "flask_openapi3")) and is_web(name)]


def test_every_domain_error_maps_to_one_problem_type_and_only_unavailability_is_5xx() -> None:
    kinds = [
        kind
        for kind in vars(domain).values()
        if isinstance(kind, type) and issubclass(kind, DomainError) and kind is not DomainError
    ]
    assert len(kinds) >= 9
    for kind in kinds:
        mapped = errors.problem_type(kind)
        assert mapped is not None, kind
        assert (mapped.status >= 500) == issubclass(kind, Unavailable), kind


def test_outside_any_request_the_store_raises_unavailable_with_its_back_off() -> None:
    """What a background job (no app, no request) meets when the database is away."""
    settings = Settings(database_url="postgresql://nobody@127.0.0.1:1/none", database_wait_seconds=1)
    store = db.Database(db.make_engine(settings))
    with pytest.raises(Unavailable) as raised:
        store.get_product("01JDQ3ZC8X4V5W6Y7Z8A9B0C1D")
    assert raised.value.dependency == "database"
    assert raised.value.retry_after_seconds == db.RETRY_AFTER_SECONDS
    assert raised.value.reason == "OperationalError" and "127.0.0.1" not in raised.value.detail
    store.engine.dispose()
