"""The `catalog` command: database migrations and seed data, and a local API key for `make run`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Sequence
from importlib.resources import files
from typing import TYPE_CHECKING

from catalog import logs
from catalog.config import ConfigError, Settings

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

log = logging.getLogger("catalog.cli")

# Shared by every replica: whoever holds it migrates; the others wait, then find nothing to do.
MIGRATION_LOCK_ID = 0x63617461  # "cata"
# `make run`'s local client, and the mark of a keys directory `catalog dev-keys` made (and so may write to).
DEV_KEY_NAME = "dev"
DEV_KEYS_MARKER = ".catalog-dev-keys"
# A key file curl can send as it is: a bare key (not `sha256:…`, not JSON), as the key store reads one.
BARE_KEY = re.compile(r"(?!sha256:)[^\s{]\S{15,}")
MAX_BARE_KEY_BYTES = 4096
# Pauses between connection attempts of `db upgrade --wait`: doubling from the first, capped.
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 5.0


class DatabaseNotReachable(Exception):
    """The database did not accept a connection within the time `db upgrade --wait` allowed."""


def connect_waiting(engine: Engine, wait_seconds: float) -> Connection:
    """A connection, retried with backoff for up to `wait_seconds` (a database still starting up, e.g. the
    chart's PostgreSQL on a first install); each failed attempt is one log line naming the error type."""
    from sqlalchemy.exc import OperationalError

    started = time.monotonic()
    pause = FIRST_RETRY_SECONDS
    attempt = 0
    while True:
        attempt += 1
        try:
            connection = engine.connect()
        except OperationalError as error:
            waited = time.monotonic() - started
            remaining = wait_seconds - waited
            fields = {
                "attempt": attempt,
                "error_type": type(error.orig).__name__,
                "error": _first_line(error.orig, engine),
                "waited_seconds": round(waited, 1),
            }
            if remaining <= 0:
                log.error("database not reachable: giving up", extra={**fields, "wait_seconds": wait_seconds})
                raise DatabaseNotReachable from None
            retry_in = min(pause, remaining)
            fields["retry_in_seconds"] = round(retry_in, 1)
            log.warning("database not reachable yet", extra=fields)
            time.sleep(retry_in)
            pause = min(pause * 2, MAX_RETRY_SECONDS)
        else:
            if attempt > 1:
                log.info("database reachable", extra={"attempt": attempt})
            return connection


def _first_line(error: BaseException | None, engine: Engine) -> str:
    """The driver's message, first line only, without the password should a driver ever echo it."""
    message = (str(error).strip().splitlines() or [""])[0][:300]
    password = engine.url.password
    return message.replace(str(password), "***") if password else message


def upgrade(settings: Settings, wait_seconds: float = 0) -> None:
    """Migrate to the newest schema; on PostgreSQL under an advisory lock, so replicas can all run it.
    The first connection is retried for up to `wait_seconds` (raises DatabaseNotReachable after that)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from catalog.db import make_engine

    engine = make_engine(settings)
    config = Config()
    config.set_main_option("script_location", "catalog:migrations")
    try:
        connection = connect_waiting(engine, wait_seconds)
    except DatabaseNotReachable:
        engine.dispose()
        raise
    with connection:
        postgres = connection.dialect.name == "postgresql"
        if postgres:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            connection.commit()
        try:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
        finally:
            if postgres:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
                connection.commit()
    engine.dispose()
    log.info("database schema is up to date", extra={"backend": engine.dialect.name})


def seed(settings: Settings) -> None:
    """Load the demo products into an empty catalog (a catalog with products is left as it is)."""
    from sqlalchemy import func, select

    from catalog.cache import NoCache
    from catalog.db import Database, make_engine, products
    from catalog.products import ProductService

    engine = make_engine(settings)
    with engine.connect() as connection:
        existing = connection.execute(select(func.count()).select_from(products)).scalar_one()
    if existing:
        log.info("seed skipped: the catalog already has products", extra={"count": existing})
        engine.dispose()
        return
    service = ProductService(Database(engine), NoCache())
    demo = json.loads(files("catalog").joinpath("seed.json").read_text(encoding="utf-8"))
    for fields in demo:
        service.create({"description": "", "tags": [], **fields}, "seed", None, "")
    engine.dispose()
    log.info("seeded demo products", extra={"count": len(demo)})


def dev_keys(settings: Settings) -> None:
    """Make a local API key (once; kept between runs) and print how to use it. Only in a directory this
    command made (or found empty): never beside someone else's keys, such as a mounted Secret's."""
    directory = settings.api_keys_dir
    if not _claim_keys_directory(directory):
        _point_at_existing_keys(settings)
        return
    path = os.path.join(directory, DEV_KEY_NAME)
    if not os.path.exists(path):
        with open(
            os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8"
        ) as key_file:
            key_file.write(secrets.token_urlsafe(32) + "\n")
    print(f"API key of the client '{DEV_KEY_NAME}': {os.path.abspath(path)}", file=sys.stderr)
    _print_curl_line(settings, path)


def _claim_keys_directory(directory: str) -> bool:
    """True when dev-keys may write its key into `directory`: it creates it now, finds it empty, or made it
    before (its marker is there). The marker is a dot file, which the key store ignores."""
    marker = os.path.join(directory, DEV_KEYS_MARKER)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        entries = os.listdir(directory)
        if DEV_KEYS_MARKER in entries:
            return True
        if entries:
            return False
    with open(marker, "w", encoding="utf-8") as marker_file:
        marker_file.write("Made by `catalog dev-keys`, which may add its local key here.\n")
    return True


def _point_at_existing_keys(settings: Settings) -> None:
    """Say which of the keys already in the directory to use, and add none."""
    directory = settings.api_keys_dir
    names = sorted(n for n in os.listdir(directory) if not n.startswith(".") and _is_file(directory, n))
    print(
        f"{os.path.abspath(directory)} (CATALOG_API_KEYS_DIR) holds keys that `catalog dev-keys` did not"
        " make: it adds none there. Use one of its key files: "
        + (", ".join(os.path.abspath(os.path.join(directory, name)) for name in names) or "none yet"),
        file=sys.stderr,
    )
    for name in names:
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8-sig", errors="replace") as key_file:
            content = key_file.read(MAX_BARE_KEY_BYTES + 1).strip()
        if BARE_KEY.fullmatch(content):
            _print_curl_line(settings, path)
            return
    print(
        "None of them holds a bare key that curl can send as it is (hashed or JSON entries).", file=sys.stderr
    )


def _is_file(directory: str, name: str) -> bool:
    return os.path.isfile(os.path.join(directory, name))


def _print_curl_line(settings: Settings, key_path: str) -> None:
    print(
        f'Try: curl -s -H "{settings.api_key_header}: $(cat {key_path})" '
        f"'http://127.0.0.1:{settings.port}/api/v1/products?limit=3'",
        file=sys.stderr,
    )


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {raw!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError("must be between 0 and 86400 seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `catalog` console script."""
    parser = argparse.ArgumentParser(prog="catalog", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    database = commands.add_parser("db", help="database schema and data")
    database_commands = database.add_subparsers(dest="action", required=True)
    upgrade_parser = database_commands.add_parser(
        "upgrade", help="migrate to the newest schema (safe to run concurrently)"
    )
    upgrade_parser.add_argument(
        "--wait",
        type=_seconds,
        default=0,
        metavar="SECONDS",
        help="retry connecting for up to SECONDS, with backoff, while the database starts (default: 0)",
    )
    database_commands.add_parser("seed", help="load demo products into an empty catalog")
    commands.add_parser("dev-keys", help="make a local API key for `make run` and print a curl line")
    arguments = parser.parse_args(argv)
    # One-off commands must not write into the server's metric files (the init container shares them).
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        logs.configure("INFO")
        log.critical("invalid configuration", extra={"variable": error.variable, "problem": error.problem})
        return 2
    logs.configure(settings.log_level)
    if arguments.command == "dev-keys":
        dev_keys(settings)
    elif arguments.action == "upgrade":
        try:
            upgrade(settings, arguments.wait)
        except DatabaseNotReachable:
            return 1
    else:
        seed(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
