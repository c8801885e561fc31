"""Every error is an RFC 9457 problem body with the request id; HTTP errors keep their status; an
unhandled exception is a bare 500 and exactly one ERROR line with the traceback."""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text
from tests.conftest import SecretDir, assert_problem, auth, product_body

from catalog.cli import upgrade
from catalog.config import Settings


@pytest.mark.parametrize("path", ["/nowhere", "/api/v2/products", "/api/v1/products/x/y"])
def test_unknown_routes_are_404_problems(client: Any, path: str) -> None:
    response = client.get(path, headers=auth())
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["request_id"] == response.headers["X-Request-ID"]


def test_405_keeps_the_allow_header(client: Any) -> None:
    response = client.delete("/api/v1/products", headers=auth())
    assert response.status_code == 405
    assert response.mimetype == "application/problem+json"
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert client.post("/livez").headers["Allow"]


def test_413_over_one_mebibyte(client: Any) -> None:
    response = client.post(
        "/api/v1/products",
        data=b"{" + b" " * (1024 * 1024 + 1) + b"}",
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.mimetype == "application/problem+json"


def test_422_lists_each_broken_rule(client: Any) -> None:
    response = client.post(
        "/api/v1/products", json=product_body(price_cents="1", currency="x"), headers=auth()
    )
    body = response.get_json()
    assert response.status_code == 422 and response.mimetype == "application/problem+json"
    assert {tuple(e["loc"]) for e in body["errors"]} == {("body", "price_cents"), ("body", "currency")}
    assert all(set(e) == {"loc", "msg"} for e in body["errors"])


@pytest.fixture
def broken_server(gunicorn: Any, tmp_path: Path, keys_dir: SecretDir) -> Any:
    """A server whose database lost its products table: every product query fails inside the app."""
    url = f"sqlite:///{tmp_path / 'broken.db'}"
    upgrade(Settings(database_url=url))
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE product_tags"))
        connection.execute(text("DROP TABLE products"))
    engine.dispose()
    return gunicorn({"CATALOG_DATABASE_URL": url, "CATALOG_API_KEYS_DIR": str(keys_dir.path)})


def test_an_unhandled_exception_is_a_bare_500_and_one_error_line(broken_server: Any) -> None:
    response = requests.get(
        f"{broken_server.url}/api/v1/products", headers={**auth(), "X-Request-ID": "boom-1"}, timeout=10
    )
    body = assert_problem(response, 500)
    assert body["request_id"] == "boom-1"
    text = response.text.lower()
    for internal in ("select", "sqlite", "traceback", "/tmp", ".py", "operationalerror", "products"):
        assert internal not in text, internal
    lines = broken_server.log_lines()
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1, errors
    (error,) = errors
    assert error["request_id"] == "boom-1"
    assert error["error_type"].endswith("OperationalError")
    assert "Traceback (most recent call last)" in error["exc_info"] and "\n" in error["exc_info"]
    access = [
        line for line in lines if line["logger"] == "catalog.access" and line.get("request_id") == "boom-1"
    ]
    assert [line["status"] for line in access] == [500]


def test_an_unreachable_database_is_a_503_not_a_bug(
    settings: Settings, caplog: pytest.LogCaptureFixture, build_app: Callable[[Settings], Any]
) -> None:
    unreachable = dataclasses.replace(settings, database_url="postgresql://nobody@127.0.0.1:1/none")
    app = build_app(unreachable)
    response = app.test_client().get("/api/v1/products", headers=auth())
    body = assert_problem(response, 503)
    assert response.headers["Retry-After"] == "5"
    assert "127.0.0.1" not in body["detail"] and "nobody" not in response.get_data(as_text=True)
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
