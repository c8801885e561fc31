"""The /api/ request pipeline: one hook, so authentication always runs before the rate limit."""

from __future__ import annotations

from flask import Flask, current_app, request

from catalog.auth import authenticate_request

API_PREFIX = "/api/"


def guard_api() -> None:
    """Before every /api/ request, in this order: the key and its scope (401/403; failed attempts count
    per client IP, 429 past their limit), then the client's own rate limit (429). The limit needs the
    client that authentication found, so the two are one step, whatever order their modules load in."""
    if not request.path.startswith(API_PREFIX):
        return
    authenticate_request()
    current_app.extensions["catalog.limiter"].limit_client()


def init_app(app: Flask) -> None:
    """Register the pipeline: the only before-request hook that deals with /api/."""
    app.before_request(guard_api)
