"""The one error path: every 4xx/5xx leaves as an RFC 9457 problem body with the request id."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, NamedTuple

from flask import Flask, Response, g, json
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from catalog.domain import (
    Conflict,
    DomainError,
    DuplicateSku,
    IdempotencyKeyReused,
    InvalidCursor,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    Unavailable,
)

PROBLEM_MIMETYPE = "application/problem+json"
log = logging.getLogger(__name__)


class ProblemType(NamedTuple):
    """How a kind of error reads as a problem body: status, type slug, title."""

    status: int
    slug: str
    title: str


# The one mapping of the service's errors to HTTP; the most specific class listed wins.
DOMAIN_PROBLEMS: dict[type[DomainError], ProblemType] = {
    NotFound: ProblemType(404, "not-found", "Not found"),
    DuplicateSku: ProblemType(409, "duplicate-sku", "Duplicate SKU"),
    Conflict: ProblemType(409, "conflict", "Conflict"),
    PreconditionFailed: ProblemType(412, "precondition-failed", "Precondition failed"),
    IdempotencyKeyReused: ProblemType(422, "idempotency-key-reused", "Idempotency-Key reused"),
    # Well-formed (the document's pattern) but not made by this service: stale, foreign or tampered with.
    InvalidCursor: ProblemType(422, "invalid-cursor", "Invalid cursor"),
    InvalidInput: ProblemType(422, "validation-error", "Validation failed"),
    Unavailable: ProblemType(503, "unavailable", "Service unavailable"),
}


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


def problem_type(kind: type[DomainError]) -> ProblemType | None:
    """The problem type of the most specific mapped class of `kind`; None for one nobody mapped (a bug)."""
    for base in kind.__mro__:
        mapped = DOMAIN_PROBLEMS.get(base)
        if mapped is not None:
            return mapped
    return None


def _handle_domain_error(error: DomainError) -> Response:
    mapped = problem_type(type(error))
    if mapped is None:
        return _handle_unexpected(error)
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if isinstance(error, Unavailable):
        # Expected in operation (a failover, a lock held too long), not a bug: one warning, no traceback.
        log.warning(
            "%s unavailable: answered 503",
            error.dependency,
            extra={"dependency": error.dependency, "error_type": error.reason},
        )
        headers["Retry-After"] = str(error.retry_after_seconds)
    if isinstance(error, InvalidInput):
        extra["errors"] = error.errors
    return problem_response(
        mapped.status, error.detail, title=mapped.title, slug=mapped.slug, headers=headers, **extra
    )


def _handle_http_exception(error: HTTPException) -> Response | HTTPException:
    if isinstance(error.response, Response):
        return error.response
    if error.code is None or error.code < 400:
        return error
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return problem_response(error.code, error.description or HTTPStatus(error.code).phrase, headers=headers)


def _handle_unexpected(error: Exception) -> Response:
    log.error(
        "unhandled exception while serving the request",
        exc_info=error,
        extra={"error_type": f"{type(error).__module__}.{type(error).__qualname__}"},
    )
    return problem_response(500, "The server failed to answer this request; it has been logged.")


def init_app(app: Flask) -> None:
    """Register the handlers that turn every error into a problem body."""
    app.register_error_handler(Problem, _handle_problem)
    app.register_error_handler(DomainError, _handle_domain_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
