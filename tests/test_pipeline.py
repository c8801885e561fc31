"""The /api/ pipeline is one hook before (and one after) every request: authenticate, then limit, whatever
order the modules are wired in."""

import dataclasses
from typing import Any

import pytest
from tests.conftest import auth, close_app

from catalog import auth as auth_module
from catalog import create_app
from catalog import limits as limits_module
from catalog.config import Settings
from catalog.pipeline import Pipeline


@pytest.fixture(params=["as create_app wires them", "limits wired before auth"])
def limited_app(request: pytest.FixtureRequest, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An app allowing each client 3 requests a minute; in the second case `limits.init_app` runs where
    `auth.init_app` used to and the other way round (the mistake that used to switch limiting off)."""
    if request.param == "limits wired before auth":
        wire_auth, wire_limits = auth_module.init_app, limits_module.init_app
        monkeypatch.setattr(auth_module, "init_app", wire_limits)
        monkeypatch.setattr(limits_module, "init_app", wire_auth)
    application = create_app(dataclasses.replace(settings, rate_limit="3/minute"))
    yield application
    close_app(application)


def test_a_client_is_limited_whatever_order_auth_and_limits_are_wired_in(limited_app: Any) -> None:
    client = limited_app.test_client()
    statuses = [client.get("/api/v1/products", headers=auth()).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert client.get("/api/v1/products").status_code == 401  # authentication still comes first


def test_one_before_request_hook_deals_with_the_api(limited_app: Any) -> None:
    hooks = limited_app.before_request_funcs[None] + [
        hook
        for blueprint in limited_app.blueprints
        for hook in limited_app.before_request_funcs.get(blueprint, [])
    ]
    assert [getattr(hook, "__func__", None) for hook in hooks].count(Pipeline.start) == 1
    # Neither the key check nor the limiter (a bound method: __module__ is its function's) hooks itself in.
    assert not [
        hook for hook in hooks if getattr(hook, "__module__", "") in {"catalog.auth", "catalog.limits"}
    ]
