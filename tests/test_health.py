"""Operational endpoints: liveness never looks at dependencies, readiness does, and none needs a key."""

import dataclasses
from collections.abc import Callable
from typing import Any

from catalog.config import Settings


def test_livez_and_healthz_answer_ok(client: Any) -> None:
    for path in ("/livez", "/healthz"):
        response = client.get(path)
        assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_readyz_checks_database_keys_and_cache(client: Any) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ok",
        "checks": {"database": "ok", "api_keys": "ok", "cache": "ok"},
    }


def test_readyz_is_503_while_the_database_does_not_answer(
    settings: Settings, build_app: Callable[[Settings], Any]
) -> None:
    unreachable = dataclasses.replace(settings, database_url="postgresql://nobody@127.0.0.1:1/none")
    app = build_app(unreachable)
    client = app.test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable" and body["checks"]["database"] == "failing"
    assert client.get("/livez").status_code == 200


def test_version_names_version_and_commit(client: Any) -> None:
    body = client.get("/version").get_json()
    assert body["version"] == "0.1.0" and body["commit"] == "unknown"


def test_operational_endpoints_need_no_key_and_carry_no_rate_limit(client: Any) -> None:
    for path in ("/livez", "/healthz", "/readyz", "/metrics", "/version", "/openapi.json", "/docs"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert "RateLimit-Limit" not in response.headers, path
