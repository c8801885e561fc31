"""Configuration from the environment: defaults, overrides, and a bad value stops start-up with one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from tests.conftest import ROOT

from catalog.config import ConfigError, Settings, database_url_with_password


def test_defaults_are_the_contracts() -> None:
    settings = Settings.from_env({})
    assert (settings.port, settings.web_concurrency, settings.threads) == (8080, 2, 4)
    assert settings.database_url == "sqlite:///var/catalog.db"
    assert settings.redis_url is None and settings.cache_ttl_seconds == 60
    assert settings.api_keys_dir == "/var/run/secrets/catalog/api-keys"
    assert settings.api_key_header == "X-Api-Key"
    assert (settings.rate_limit, settings.auth_failure_limit) == ("1000/second", "30/minute")
    assert (settings.trusted_proxy_hops, settings.log_level) == (0, "INFO")


def test_every_variable_overrides(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    settings = Settings.from_env(
        {
            "PORT": "9000",
            "WEB_CONCURRENCY": "3",
            "CATALOG_THREADS": "8",
            "CATALOG_DATABASE_URL": "postgresql://catalog@db:5432/catalog",
            "CATALOG_DATABASE_PASSWORD_FILE": str(password),
            "CATALOG_REDIS_URL": "rediss://:pw@cache:6380/2?ssl_ca_certs=/etc/ssl/ca.pem&ssl_cert_reqs=required",
            "CATALOG_REDIS_PASSWORD_FILE": str(password),
            "CATALOG_CACHE_TTL_SECONDS": "5",
            "CATALOG_API_KEYS_DIR": "/keys",
            "CATALOG_API_KEY_HEADER": "X-Catalog-Key",
            "CATALOG_RATE_LIMIT": "10/second; 100/minute",
            "CATALOG_AUTH_FAILURE_LIMIT": "5/minute",
            "CATALOG_TRUSTED_PROXY_HOPS": "2",
            "CATALOG_LOG_LEVEL": "debug",
        }
    )
    assert (settings.port, settings.web_concurrency, settings.threads) == (9000, 3, 8)
    assert settings.redis_url.startswith("rediss://:pw@cache:6380/2?") and settings.cache_ttl_seconds == 5
    assert (settings.api_keys_dir, settings.api_key_header) == ("/keys", "X-Catalog-Key")
    assert (settings.rate_limit, settings.auth_failure_limit) == ("10/second; 100/minute", "5/minute")
    assert (settings.trusted_proxy_hops, settings.log_level) == (2, "DEBUG")
    url = database_url_with_password(settings)
    assert url.drivername == "postgresql+psycopg" and url.password == "s3cret"


def test_the_password_file_overrides_the_urls_password(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("from-file")
    settings = Settings(database_url="postgresql://u:from-url@db/x", database_password_file=str(password))
    assert make_url(
        str(database_url_with_password(settings).render_as_string(hide_password=False))
    ).password == ("from-file")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "http"),
        ("PORT", "70000"),
        ("WEB_CONCURRENCY", "0"),
        ("CATALOG_THREADS", "two"),
        ("CATALOG_CACHE_TTL_SECONDS", "1.5"),
        ("CATALOG_CACHE_TTL_SECONDS", "-1"),
        ("CATALOG_DATABASE_URL", "not a url"),
        ("CATALOG_DATABASE_URL", "mysql://db/x"),
        ("CATALOG_DATABASE_URL", "postgresql:///nohost"),
        ("CATALOG_REDIS_URL", "http://cache:6379"),
        ("CATALOG_REDIS_URL", "redis://cache:port/0"),
        ("CATALOG_REDIS_URL", "redis://cache:6379/zero"),
        ("CATALOG_REDIS_URL", "redis://cache:6379/0?socket_timeout=soon"),
        ("CATALOG_REDIS_URL", "redis://cache:6379/0?colour=blue"),
        ("CATALOG_REDIS_URL", "rediss://cache:6380/0?ssl_cert_reqs=maybe"),
        ("CATALOG_REDIS_PASSWORD_FILE", "/nonexistent/password"),
        ("CATALOG_DATABASE_PASSWORD_FILE", "/nonexistent/password"),
        ("CATALOG_API_KEY_HEADER", "X Api Key"),
        ("CATALOG_RATE_LIMIT", "fast"),
        ("CATALOG_AUTH_FAILURE_LIMIT", "30/fortnight"),
        ("CATALOG_TRUSTED_PROXY_HOPS", "-1"),
        ("CATALOG_LOG_LEVEL", "LOUD"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({variable: value})
    assert raised.value.variable == variable


OTLP = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, False),
        (OTLP, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector:4318/v1/traces"}, True),
        ({**OTLP, "OTEL_SDK_DISABLED": "true"}, False),
        ({**OTLP, "OTEL_TRACES_EXPORTER": "none"}, False),
        (
            {**OTLP, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            True,
        ),
        ({**OTLP, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
    ],
)
def test_tracing_is_on_when_an_otlp_endpoint_is_set(env: dict[str, str], enabled: bool) -> None:
    assert Settings.from_env(env).tracing_enabled is enabled


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:port"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc://collector:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "half"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
    ],
)
def test_a_bad_tracing_value_is_an_error_naming_the_variable(variable: str, value: str) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_SAMPLER": "traceidratio"}
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({**env, variable: value})
    assert raised.value.variable == variable


def one_json_line_naming(output: str, variable: str) -> dict[str, object]:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    record = json.loads(lines[0])
    assert record["variable"] == variable and record["level"] == "CRITICAL"
    assert {"timestamp", "logger", "message"} <= record.keys()
    return dict(record)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CATALOG_CACHE_TTL_SECONDS", "soon"),
        ("CATALOG_DATABASE_URL", "nonsense"),
        ("CATALOG_LOG_LEVEL", "LOUD"),
    ],
)
def test_gunicorn_refuses_to_start_with_one_json_line(tmp_path: Path, variable: str, value: str) -> None:
    assert_gunicorn_refuses(tmp_path, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), variable: value}, variable)


def test_gunicorn_refuses_to_start_without_a_metrics_directory(tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}
    assert_gunicorn_refuses(tmp_path, env, "PROMETHEUS_MULTIPROC_DIR")


def assert_gunicorn_refuses(directory: Path, env: dict[str, str], variable: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
        cwd=directory,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    one_json_line_naming(result.stdout + result.stderr, variable)


def test_the_cli_refuses_a_bad_value_with_one_json_line(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PORT": "eighty"}
    result = subprocess.run(
        [sys.executable, "-m", "catalog.cli", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    one_json_line_naming(result.stdout + result.stderr, "PORT")
