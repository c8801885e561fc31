"""Logs: one JSON object per line on stdout from the app, gunicorn and the access log; request ids."""

import json
import logging
import time
from typing import Any

import pytest
import requests
from tests.conftest import SecretDir, auth

from catalog.logs import ACCESS_FIELDS, ACCESS_LOGGER, JsonGunicornLogger, JsonLineFormatter


@pytest.fixture
def server(gunicorn: Any, sqlite_url: str, keys_dir: SecretDir) -> Any:
    return gunicorn({"CATALOG_DATABASE_URL": sqlite_url, "CATALOG_API_KEYS_DIR": str(keys_dir.path)})


def test_every_line_is_json_with_the_contract_fields(server: Any) -> None:
    requests.get(f"{server.url}/api/v1/products", headers=auth(), timeout=10)
    requests.get(f"{server.url}/api/v1/products", timeout=10)
    server.stop()
    lines = server.log_lines()
    loggers = {line["logger"] for line in lines}
    assert {"gunicorn.error", "catalog.access", "catalog.auth"} <= loggers
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= line.keys()
        assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]


def test_one_access_line_per_request_with_client_and_duration(server: Any) -> None:
    ok = requests.get(f"{server.url}/api/v1/products?limit=1", headers=auth(), timeout=10)
    denied = requests.get(f"{server.url}/api/v1/products", timeout=10)
    server.stop()
    access = {line["request_id"]: line for line in server.log_lines() if line["logger"] == "catalog.access"}
    line = access[ok.headers["X-Request-ID"]]
    assert (line["method"], line["path"], line["status"], line["client"]) == (
        "GET",
        "/api/v1/products",
        200,
        "writer",
    )
    assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
    assert access[denied.headers["X-Request-ID"]]["client"] is None
    assert access[denied.headers["X-Request-ID"]]["status"] == 401
    assert len([x for x in server.log_lines() if x["logger"] == "catalog.access"]) == len(access)


@pytest.mark.parametrize("offered", ["abc-123", "A.b_c-9", "x" * 128])
def test_a_well_formed_request_id_is_kept(server: Any, offered: str) -> None:
    response = requests.get(f"{server.url}/livez", headers={"X-Request-ID": offered}, timeout=10)
    assert response.headers["X-Request-ID"] == offered


@pytest.mark.parametrize("offered", ["", "x" * 129, "has space", "semi;colon", "ünï"])
def test_a_malformed_request_id_is_replaced(server: Any, offered: str) -> None:
    response = requests.get(f"{server.url}/livez", headers={"X-Request-ID": offered.encode()}, timeout=10)
    assert response.headers["X-Request-ID"] not in ("", offered)
    assert 1 <= len(response.headers["X-Request-ID"]) <= 128


def test_lines_written_while_serving_carry_the_request_id(gunicorn: Any, keys_dir: SecretDir) -> None:
    """A warning logged while a request is served (the readiness probe finding the database away) names
    that request's id; lines of the background threads (the key store's re-reads) name none."""
    server = gunicorn(
        {
            "CATALOG_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "CATALOG_API_KEYS_DIR": str(keys_dir.path),
        }
    )
    keys_dir.write({"broken": "short"})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and '"file": "broken"' not in server.output():
        time.sleep(0.2)
    assert (
        requests.get(f"{server.url}/readyz", headers={"X-Request-ID": "probe-7"}, timeout=10).status_code
        == 503
    )
    server.stop()
    lines = server.log_lines()
    failing = [line for line in lines if line["message"] == "readiness: database check failed"]
    assert [line.get("request_id") for line in failing] == ["probe-7"], failing
    skipped = [line for line in lines if line["message"] == "api key file skipped"]
    assert skipped and all("request_id" not in line for line in skipped), skipped


def test_gunicorn_builds_no_access_atoms(monkeypatch: pytest.MonkeyPatch) -> None:
    """catalog writes its own access line: gunicorn's logger class never builds its access atoms (a dict
    of every header and environ entry) for a line it would drop."""
    from gunicorn.config import Config

    def no_atoms(*_: Any) -> None:
        raise AssertionError("access atoms built")

    logger = JsonGunicornLogger(Config())
    monkeypatch.setattr(logger, "atoms", no_atoms)
    logger.access(None, None, {}, None)


def test_the_direct_access_line_is_the_formatters_line() -> None:
    """The line written straight to stdout is the one the JSON formatter makes of the access record."""
    formatter = JsonLineFormatter()
    fields = {
        "method": "GET",
        "path": "/x",
        "status": 200,
        "duration_ms": 1.5,
        "client": None,
        "request_id": "r",
    }
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, "GET /x 200", None, None)
    record.__dict__[ACCESS_FIELDS] = fields
    assert formatter.format(record) == formatter.access_line(record.created, "GET /x 200", fields)
    line = json.loads(formatter.format(record))
    assert list(line) == ["timestamp", "level", "logger", "message", *fields]
    assert (line["level"], line["logger"]) == ("INFO", ACCESS_LOGGER)


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "GET", "path": "/x", "status": 200, "duration_ms": 0.0, "client": None, "request_id": "r"},
        {
            "method": "PATCH",
            "path": '/api/v1/products/"ä\\\n\u2028',
            "status": 412,
            "duration_ms": 1234.56,
            "client": "team-ä",
            "request_id": "a.b_c-1",
            "trace_id": "0af7651916cd43dd8448eb211c80319c",
            "span_id": "b7ad6b7169203331",
        },
    ],
)
def test_the_access_line_is_what_json_dumps_writes(fields: dict[str, Any]) -> None:
    """Filled into a template, the line is byte for byte the `json.dumps` of the same fields: strings escaped
    to ASCII, null for no client, the trace ids last when there are any."""
    formatter = JsonLineFormatter()
    created = 1764510000.125
    message = f"{fields['method']} {fields['path']} {fields['status']}"
    line = formatter.access_line(created, message, fields)
    expected = {
        "timestamp": "2025-11-30T13:40:00.125Z",
        "level": "INFO",
        "logger": ACCESS_LOGGER,
        "message": message,
        **fields,
    }
    assert line == json.dumps(expected)
    assert line.isascii() and json.loads(line) == expected
