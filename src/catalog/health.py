"""Probes and identity: /livez, /healthz, /readyz and /version (no API key, never rate limited)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, json

log = logging.getLogger(__name__)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(
        json.dumps(body), status=status, mimetype="application/json", headers={"Cache-Control": "no-store"}
    )


def livez() -> Response:
    """The process can serve; dependencies are not consulted (a restart would not fix them)."""
    return _json({"status": "ok"})


def readyz() -> Response:
    """Ready when the database answers and a key is loaded; a cache outage only degrades."""
    checks: dict[str, str] = {}
    try:
        current_app.extensions["catalog.db"].ping()
        checks["database"] = "ok"
    except Exception as error:
        log.warning("readiness: database check failed", extra={"error_type": type(error).__name__})
        checks["database"] = "failing"
    keys = current_app.extensions["catalog.keys"]
    keys.refresh_if_due()
    checks["api_keys"] = "ok" if keys.count else "failing"
    checks["cache"] = current_app.extensions["catalog.cache"].check()
    if "failing" in checks.values():
        return _json({"status": "unavailable", "checks": checks}, 503)
    return _json({"status": "degraded" if checks["cache"] == "degraded" else "ok", "checks": checks})


def version() -> Response:
    """The running version and the commit it was built from."""
    settings = current_app.config["SETTINGS"]
    return _json({"version": settings.version, "commit": settings.commit})


def init_app(app: Flask) -> None:
    """Register the operational endpoints."""
    app.add_url_rule("/livez", "livez", livez)
    app.add_url_rule("/healthz", "healthz", livez)
    app.add_url_rule("/readyz", "readyz", readyz)
    app.add_url_rule("/version", "version", version)
