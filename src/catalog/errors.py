"""The one error path: every 4xx/5xx leaves as an RFC 9457 problem body with the request id."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, g, json
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from catalog import tracing

PROBLEM_MIMETYPE = "application/problem+json"
log = logging.getLogger(__name__)


class Problem(Exception):
    """An error the client can act on; subclasses set the status, type slug and title."""

    status = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    slug: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    """Build an application/problem+json response; `slug` names the problem type, else `about:blank`."""
    body = {
        "type": f"/problems/{slug}" if slug else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": g.get("request_id"),
        **extra,
    }
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_MIMETYPE)
    if headers:
        response.headers.update(headers)
    return response


def validation_problem(error: ValidationError, location: str | None = None) -> Response:
    """422 with one entry per failed rule; never echoes the rejected input."""
    errors = [
        {"loc": ([location] if location else []) + [str(part) for part in item["loc"]], "msg": item["msg"]}
        for item in error.errors(include_url=False, include_input=False, include_context=False)
    ]
    return problem_response(
        422,
        "The request does not follow the API's rules: see `errors`.",
        title="Validation failed",
        slug="validation-error",
        errors=errors,
    )


def _handle_problem(problem: Problem) -> Response:
    return problem_response(
        problem.status,
        problem.detail,
        title=problem.title,
        slug=problem.slug,
        headers=problem.headers,
        **problem.extra,
    )


def _handle_http_exception(error: HTTPException) -> Response | HTTPException:
    if isinstance(error.response, Response):
        return error.response
    if error.code is None or error.code < 400:
        return error
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return problem_response(error.code, error.description or HTTPStatus(error.code).phrase, headers=headers)


def _handle_unexpected(error: Exception) -> Response:
    tracing.record_exception(error)
    log.error(
        "unhandled exception while serving the request",
        exc_info=error,
        extra={"error_type": f"{type(error).__module__}.{type(error).__qualname__}"},
    )
    return problem_response(500, "The server failed to answer this request; it has been logged.")


def init_app(app: Flask) -> None:
    """Register the handlers that turn every error into a problem body."""
    app.register_error_handler(Problem, _handle_problem)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
