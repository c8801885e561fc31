"""Shared fixtures: databases (SQLite and PostgreSQL), a kubelet-style keys directory, the app, and real
redis-server and gunicorn processes."""

import os
import tempfile

# prometheus_client picks multiprocess mode when it is imported: a fresh directory before catalog is.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="catalog-test-metrics-")

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import psycopg
import pytest
import redis
import requests
from sqlalchemy import create_engine, text
from tests.tools import require_tool, unavailable

from catalog import create_app
from catalog.cli import upgrade
from catalog.config import Settings

ROOT = Path(__file__).resolve().parent.parent
WRITER_KEY = "writer-key-0123456789abcdef"
READER_KEY = "reader-key-0123456789abcdef"
DEFAULT_KEYS = {
    "writer": WRITER_KEY,
    "reader": json.dumps({"key": READER_KEY, "scopes": ["read"]}),
}
TABLES = ("product_tags", "idempotency_keys", "products", "cache_outbox")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def poll(condition: Callable[[], Any], timeout: float, message: str) -> Any:
    """`condition()`'s first truthy value within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(message)


def auth(key: str = WRITER_KEY) -> dict[str, str]:
    """Headers that authenticate as the client owning `key`."""
    return {"X-Api-Key": key}


def product_body(**overrides: Any) -> dict[str, Any]:
    """A valid product body with a unique sku."""
    body = {
        "sku": f"SKU-{uuid.uuid4().hex[:10].upper()}",
        "name": "Espresso cup",
        "description": "Porcelain, 90 ml",
        "price_cents": 1250,
        "currency": "EUR",
        "tags": ["kitchen"],
    }
    body.update(overrides)
    return body


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    """An RFC 9457 body with the contract's fields and the response's request id (Flask test client or
    requests)."""
    assert response.status_code == status, response.text if hasattr(response, "text") else response.get_data()
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = dict(json.loads(response.content if hasattr(response, "content") else response.get_data()))
    assert body["status"] == status
    assert {"type", "title", "detail", "request_id"} <= body.keys()
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


# --- databases ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite database file for this test session."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'catalog.db'}"
    upgrade(Settings(database_url=url))
    return url


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """A migrated schema of its own in the test PostgreSQL (CATALOG_TEST_DATABASE_URL), dropped afterwards."""
    base = os.environ.get("CATALOG_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        psycopg.connect(base.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3).close()
    except psycopg.OperationalError as error:
        unavailable(f"PostgreSQL at CATALOG_TEST_DATABASE_URL is not reachable: {error}")
    schema = f"catalog_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    url = f"{base}{separator}options=-csearch_path%3D{schema}"
    upgrade(Settings(database_url=url))
    yield url
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def backend() -> str:
    """The database backend of a test; API test modules parametrize it over both."""
    return "sqlite"


@pytest.fixture
def database_url(request: pytest.FixtureRequest, backend: str) -> str:
    """The backend's migrated database, emptied for this test."""
    url: str = request.getfixturevalue(f"{backend}_url")
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as connection:
        for table in TABLES:
            connection.execute(text(f"DELETE FROM {table}"))
    engine.dispose()
    return url


# --- the API keys Secret -----------------------------------------------------------------------------------


class SecretDir:
    """A directory laid out and updated exactly as the kubelet's atomic writer does for a Secret volume:
    `..<timestamp>/` holds the files, `..data` links to it, and each key is a link `name -> ..data/name`.
    An update writes a new timestamped directory and renames a new `..data` link over the old one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def write(self, entries: Mapping[str, str]) -> None:
        """Replace the whole Secret's content atomically."""
        stamp = datetime.now(UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
        new_dir = self.path / stamp
        new_dir.mkdir()
        for name, content in entries.items():
            (new_dir / name).write_text(content)
        data = self.path / "..data"
        old_target = os.readlink(data) if data.is_symlink() else None
        temporary = self.path / "..data_tmp"
        os.symlink(stamp, temporary)
        os.rename(temporary, data)
        for name in entries:
            link = self.path / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        for link in self.path.iterdir():
            if not link.name.startswith(".") and link.name not in entries:
                link.unlink()
        if old_target:
            shutil.rmtree(self.path / old_target)


@pytest.fixture
def keys_dir(tmp_path: Path) -> SecretDir:
    """A Secret volume with a read-write client `writer` and a read-only client `reader`."""
    secret = SecretDir(tmp_path / "api-keys")
    secret.write(DEFAULT_KEYS)
    return secret


# --- the app -----------------------------------------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, keys_dir: SecretDir) -> Settings:
    """Settings of an app on the test database, the test keys and the in-process cache."""
    return Settings(
        database_url=database_url,
        api_keys_dir=str(keys_dir.path),
        rate_limit="100000/second",
        auth_failure_limit="100000/minute",
    )


def close_app(application: Any) -> None:
    """Stop an app's background threads and close its connections."""
    application.extensions["catalog.background"].stop()
    application.extensions["catalog.db"].engine.dispose()
    if application.extensions["catalog.redis"] is not None:
        application.extensions["catalog.redis"].client.connection_pool.disconnect()


@pytest.fixture
def app(settings: Settings) -> Iterator[Any]:
    """The app, as gunicorn would build it; its threads and connections are closed afterwards."""
    application = create_app(settings)
    yield application
    close_app(application)


@pytest.fixture
def client(app: Any) -> Any:
    """A test client of the app."""
    return app.test_client()


@pytest.fixture
def build_app() -> Iterator[Callable[[Settings], Any]]:
    """Build apps (`build_app(settings)`); their threads and connections are closed after the test."""
    apps: list[Any] = []

    def build(settings: Settings) -> Any:
        apps.append(create_app(settings))
        return apps[-1]

    yield build
    for application in apps:
        close_app(application)


@pytest.fixture
def make_client(build_app: Callable[[Settings], Any]) -> Callable[[Settings], Any]:
    """Build apps and return their test clients; they are closed after the test."""
    return lambda settings: build_app(settings).test_client()


class ThreadLoop:
    """`threads` threads running `_run(index)` until the `with` block ends (subclasses say what they do;
    `_stop` is set at the end)."""

    def __init__(self, threads: int) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,)) for index in range(threads)]

    def __enter__(self) -> "Self":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, index: int) -> None:
        raise NotImplementedError


# --- real servers ------------------------------------------------------------------------------------------


# `make test-compat` runs the Redis-facing tests again with this set to another server's binary (Redis 6.2,
# Valkey); unset, the tests' own servers are the redis-server on PATH.
REDIS_SERVER_ENV = "CATALOG_TEST_REDIS_SERVER"


class RedisServer:
    """A redis-server of the test's own on a free port, which the test may kill, pause and restart."""

    def __init__(self, directory: Path, password: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.binary = require_tool(os.environ.get(REDIS_SERVER_ENV, "redis-server"))
        self.directory = directory
        self.password = password
        self.extra = extra
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """redis:// URL (without the password)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again) on the same port, empty."""
        arguments = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.extra,
        ]
        if self.password:
            arguments += ["--requirepass", self.password]
        self.process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.client().ping()
                return
            except redis.AuthenticationError:
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def client(self) -> redis.Redis:
        """A plain client of this server."""
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL: the server is gone, connections are reset."""
        assert self.process
        self.resume()
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers."""
        assert self.process
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        assert self.process
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop for good."""
        if self.process and self.process.poll() is None:
            self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a free port."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


class PrivatePostgres:
    """A PostgreSQL server of the test's own: `initdb` and `pg_ctl` as the postgres user, on a free port, with
    its socket in its own directory; the test may start it late, stop it and start it again."""

    def __init__(self, server_options: tuple[str, ...] = ()) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
        if not versions or shutil.which("runuser") is None or os.geteuid() != 0:
            unavailable("a private PostgreSQL needs /usr/lib/postgresql/<major>/bin, runuser and root")
        self.bin = versions[-1].parent
        self.root = Path(tempfile.mkdtemp(prefix="catalog-pg-"))
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self.server_options = server_options
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )

    def _as_postgres(self, *command: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.root,
            check=False,
        )
        assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout}{result.stderr}"
        return result

    def start(self) -> None:
        """Start and wait until it accepts connections (pg_ctl -w)."""
        options = " ".join(
            [
                "-c",
                "listen_addresses=127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                *self.server_options,
            ]
        )
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        """Stop at once (`-m immediate`), if running."""
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, user: str = "postgres", database: str = "postgres", password: str | None = None) -> str:
        """A postgresql:// URL over TCP (the password, if given, URL-quoted)."""
        secret = f":{quote(password, safe='')}" if password is not None else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{database}"

    def psql(
        self, *arguments: str, user: str = "postgres", database: str = "postgres", over_socket: bool = False
    ) -> str:
        """Run psql over TCP or the server's Unix socket (ON_ERROR_STOP); return its output, fail the test on
        an error."""
        result = subprocess.run(
            [
                str(self.bin / "psql"),
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.root) if over_socket else "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                user,
                "-d",
                database,
                *arguments,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
            check=False,
        )
        assert result.returncode == 0, f"psql {arguments}: {result.stdout}{result.stderr}"
        return result.stdout

    def remove(self) -> None:
        """Stop and delete the data directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[Callable[..., PrivatePostgres]]:
    """Make private PostgreSQL servers (initialised, not started): `private_postgres(server_options)`."""
    servers: list[PrivatePostgres] = []

    def make(server_options: tuple[str, ...] = ()) -> PrivatePostgres:
        servers.append(PrivatePostgres(server_options))
        return servers[-1]

    yield make
    for server in servers:
        server.remove()


class Gunicorn:
    """The real server: `gunicorn -c gunicorn.conf.py` with the given environment, on a free port."""

    def __init__(self, directory: Path, env: Mapping[str, str], arguments: tuple[str, ...] = ()) -> None:
        self.port = int(env.get("PORT") or free_port())
        self.arguments = arguments
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / f"gunicorn-{self.port}.log"
        metrics_dir = directory / f"metrics-{self.port}"
        metrics_dir.mkdir()
        self.env = {
            "PATH": os.environ["PATH"],
            "PORT": str(self.port),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "CATALOG_LOG_LEVEL": "INFO",
            **env,
        }
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), *arguments],
            cwd=directory,
            env=self.env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every worker has built its app and /livez answers."""
        workers = 1 if "--preload" in self.arguments else int(self.env.get("WEB_CONCURRENCY", "2"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.output()}")
            if self.output().count('"message": "catalog app ready"') >= workers:
                try:
                    if requests.get(f"{self.url}/livez", timeout=5).status_code == 200:
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not become ready:\n{self.output()}")

    def output(self) -> str:
        """Everything gunicorn and the app wrote so far."""
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The output parsed as JSON lines (fails the test on a line that is not JSON)."""
        return [json.loads(line) for line in self.output().split("\n") if line.strip()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        """Signal gunicorn and wait for its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode


def worker_pids(master: int) -> set[int]:
    """The live child processes of gunicorn's master (from /proc: no tool needed)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(after_name[1]) == master:
            pids.add(int(stat.parent.name))
    return pids


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Any]:
    """Start real gunicorn servers: `gunicorn(env, arguments)`; all are stopped after the test."""
    servers: list[Gunicorn] = []

    def start(env: Mapping[str, str], arguments: tuple[str, ...] = ()) -> Gunicorn:
        server = Gunicorn(tmp_path, env, arguments)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
