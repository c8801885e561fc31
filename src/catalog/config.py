"""Settings read once from the environment (12-factor), validated before anything starts."""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlsplit

from limits import parse_many
from redis.connection import Connection, parse_url
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_API_KEYS_DIR = "/var/run/secrets/catalog/api-keys"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


class ConfigError(ValueError):
    """A variable holds a value the service cannot start with."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    port: int = 8080
    web_concurrency: int = 2
    threads: int = 4
    database_url: str = "sqlite:///var/catalog.db"
    database_password_file: str | None = None
    # How long a request waits for the database (a connection, SQLite's write lock, a free pooled
    # connection) before it is answered 503. Not a variable: well under gunicorn's 30 s worker timeout.
    database_wait_seconds: float = 5.0
    redis_url: str | None = None
    redis_password_file: str | None = None
    cache_ttl_seconds: int = 60
    api_keys_dir: str = DEFAULT_API_KEYS_DIR
    api_key_header: str = "X-Api-Key"
    rate_limit: str = "1000/second"
    auth_failure_limit: str = "30/minute"
    trusted_proxy_hops: int = 0
    log_level: str = "INFO"
    version: str = field(default_factory=lambda: _package_version())
    commit: str = "unknown"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise ConfigError naming the first bad one."""
        env = os.environ if env is None else env
        return cls(
            port=_integer(env, "PORT", 8080, minimum=1, maximum=65535),
            web_concurrency=_integer(env, "WEB_CONCURRENCY", 2, minimum=1),
            threads=_integer(env, "CATALOG_THREADS", 4, minimum=1),
            database_url=_database_url(env.get("CATALOG_DATABASE_URL") or "sqlite:///var/catalog.db"),
            database_password_file=_file(env, "CATALOG_DATABASE_PASSWORD_FILE"),
            redis_url=_redis_url(env.get("CATALOG_REDIS_URL") or None),
            redis_password_file=_file(env, "CATALOG_REDIS_PASSWORD_FILE"),
            cache_ttl_seconds=_integer(env, "CATALOG_CACHE_TTL_SECONDS", 60, minimum=0),
            api_keys_dir=env.get("CATALOG_API_KEYS_DIR") or DEFAULT_API_KEYS_DIR,
            api_key_header=_header_name(env.get("CATALOG_API_KEY_HEADER") or "X-Api-Key"),
            rate_limit=_rate_limit(env, "CATALOG_RATE_LIMIT", "1000/second"),
            auth_failure_limit=_rate_limit(env, "CATALOG_AUTH_FAILURE_LIMIT", "30/minute"),
            trusted_proxy_hops=_integer(env, "CATALOG_TRUSTED_PROXY_HOPS", 0, minimum=0, maximum=10),
            log_level=_log_level(env.get("CATALOG_LOG_LEVEL") or "INFO"),
            version=_package_version(),
            commit=env.get("CATALOG_COMMIT") or "unknown",
        )


def _integer(
    env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int | None = None
) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw[:40]!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(name, f"must be {bounds}, got {value}")
    return value


def _database_url(raw: str) -> str:
    name = "CATALOG_DATABASE_URL"
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise ConfigError(name, "is not a database URL (sqlite:///path or postgresql://...)") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(name, f"backend {url.get_backend_name()!r} is not supported (sqlite, postgresql)")
    if url.get_backend_name() == "postgresql" and not url.host and not url.query.get("host"):
        raise ConfigError(name, "a postgresql URL needs a host")
    return raw


def _redis_url(raw: str | None) -> str | None:
    if raw is None:
        return None
    name = "CATALOG_REDIS_URL"
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise ConfigError(name, "is not a valid URL") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(name, "must look like redis://[:password@]host:port/db or rediss://...")
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ConfigError(name, "the database number must be an integer")
    try:
        options = parse_url(raw)  # type: ignore[no-untyped-call]
    except ValueError as error:
        raise ConfigError(name, str(error)) from None
    connection_class = options.pop("connection_class", Connection)
    unknown = set(options) - _connection_options(connection_class)
    if unknown:
        raise ConfigError(name, f"unknown option(s) {', '.join(sorted(unknown))}")
    if options.get("ssl_cert_reqs", "required") not in ("none", "optional", "required"):
        raise ConfigError(name, "ssl_cert_reqs must be none, optional or required")
    return raw


def _connection_options(connection_class: type) -> set[str]:
    """The keyword arguments a redis-py connection class takes (its own and its bases')."""
    names: set[str] = set()
    for klass in connection_class.__mro__:
        if "__init__" in vars(klass):
            parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
            names |= {
                p.name for p in parameters if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
            }
    return names - {"self"}


def _file(env: Mapping[str, str], name: str) -> str | None:
    path = env.get(name) or None
    if path is not None and not os.path.isfile(path):
        raise ConfigError(name, "names a file that does not exist")
    return path


def _header_name(raw: str) -> str:
    if not raw.replace("-", "").isalnum():
        raise ConfigError("CATALOG_API_KEY_HEADER", "must be an HTTP header name (letters, digits, '-')")
    return raw


def _rate_limit(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    try:
        if not parse_many(raw):
            raise ValueError(raw)
    except ValueError:
        raise ConfigError(
            name, "must be a rate limit such as '100/second' ('; ' separates several)"
        ) from None
    return raw


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError("CATALOG_LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _package_version() -> str:
    try:
        return version("catalog")
    except PackageNotFoundError:
        return "0.0.0"


def check_metrics_dir(env: Mapping[str, str] | None = None) -> None:
    """The workers' metric files need PROMETHEUS_MULTIPROC_DIR to name an existing directory."""
    env = os.environ if env is None else env
    if not os.path.isdir(env.get("PROMETHEUS_MULTIPROC_DIR", "")):
        raise ConfigError("PROMETHEUS_MULTIPROC_DIR", "must name an existing, writable directory")


def database_url_with_password(settings: Settings) -> URL:
    """The SQLAlchemy URL with the psycopg 3 driver and the password from its file, if one is set."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if settings.database_password_file:
        url = url.set(password=read_secret_file(settings.database_password_file))
    return url


def read_secret_file(path: str) -> str:
    """A mounted Secret's value, surrounding whitespace trimmed."""
    with open(path, encoding="utf-8") as secret:
        return secret.read().strip()


def listen_addresses(port: int) -> list[str]:
    """gunicorn binds for every interface on IPv4 and IPv6 (IPv4-only, IPv6-only and dual-stack pods alike):
    `[::]`, which takes IPv4 too as mapped addresses; `[::]` and `0.0.0.0` where IPv6 sockets are IPv6-only
    (net.ipv6.bindv6only=1); `0.0.0.0` alone on a kernel without IPv6."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            v6_only = probe.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except OSError:
        return [f"0.0.0.0:{port}"]
    return [f"[::]:{port}", f"0.0.0.0:{port}"] if v6_only else [f"[::]:{port}"]
