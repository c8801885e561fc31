"""Traces over OTLP, off unless an endpoint is set, and the trace ids that log lines of a request carry.

Off, nothing of OpenTelemetry is imported or run per request: the only work left is the log filter's
look at a `traceparent` header, so that lines still join the caller's trace. On (catalog.otel does the
OpenTelemetry part), each gunicorn worker (`post_fork`) gets its own tracer provider, `service.instance.id`
and batching OTLP/HTTP exporter, flushed when the worker exits; the app gets a span per request named by
URL rule, with Redis commands and SQL statements as child spans and the auth, rate-limit and cache
decisions as attributes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, current_app, g, request

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from catalog.config import Settings

log = logging.getLogger(__name__)

# A worker that exits gives its last batch this long to reach the collector.
FLUSH_MILLIS = 5000
# W3C Trace Context: version (not ff), trace id and parent id (not all zeros), flags.
TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-[0-9a-f]{2}(?:-.*)?"
)

# Set when this process traces (`init_app` with tracing enabled): the current span's getter.
_current_span: Callable[[], Span] | None = None
_provider: TracerProvider | None = None


def log_ids(environ: dict[str, Any]) -> tuple[str, str] | None:
    """(trace_id, span_id) for a line logged while serving the request of `environ`: the request's span
    when tracing is on, else the caller's `traceparent` (its trace and span), else None."""
    if _current_span is not None:
        context = _current_span().get_span_context()
        if context.is_valid:
            return format(context.trace_id, "032x"), format(context.span_id, "016x")
    header = environ.get("HTTP_TRACEPARENT")
    if header is None:
        return None
    match = TRACEPARENT.fullmatch(header)
    return (match[1], match[2]) if match else None


def record_exception(error: BaseException) -> None:
    """Put an unhandled exception on the request's span, with status ERROR."""
    if _current_span is not None:
        from catalog import otel

        otel.record_exception(_current_span(), error)


def start_worker(settings: Settings) -> None:
    """In a gunicorn worker (`post_fork`): this process's tracer provider and OTLP exporter (an exporter
    made before the fork would have its batching thread left behind in the master)."""
    global _provider
    if not settings.tracing_enabled:
        return
    from opentelemetry import trace

    from catalog import otel

    _provider = otel.provider(settings.version)
    trace.set_tracer_provider(_provider)


def stop_worker() -> None:
    """When a worker exits (`worker_exit`, after its requests drained): export every finished span."""
    global _provider
    if _provider is None:
        return
    if not _provider.force_flush(FLUSH_MILLIS):
        log.warning("spans not exported before exit", extra={"timeout_ms": FLUSH_MILLIS})
    _provider.shutdown()
    _provider = None


def _name_unrouted(span: Span, environ: dict[str, Any]) -> None:
    """A request no route matched is named by its method alone, not by a path anyone can vary."""
    if request.url_rule is None and span.is_recording():
        span.update_name(request.method)


def _record_decisions(response: Response) -> Response:
    """The request's auth, rate-limit and cache decisions on its span (client names, never keys)."""
    assert _current_span is not None
    span = _current_span()
    if not span.is_recording():
        return response
    client = g.get("client")
    if client is not None:
        span.set_attribute("catalog.client", client.name)
    if request.path.startswith("/api/"):
        span.set_attribute("catalog.auth.result", _auth_result(client, response.status_code))
    quota = g.get("quota")
    if quota is not None:
        span.set_attribute("catalog.rate_limit.limit", quota.limit)
        span.set_attribute("catalog.rate_limit.remaining", max(quota.remaining, 0))
        span.set_attribute("catalog.rate_limit.exceeded", quota.remaining < 0)
    cache = response.headers.get("X-Cache")
    if cache is not None:
        span.set_attribute("catalog.cache.result", cache)
    return response


def _auth_result(client: Any, status: int) -> str:
    """What the key check decided: ok, missing, invalid (401 or, past the per-IP limit, 429) or forbidden
    (the only 403 there is)."""
    if client is None:
        from catalog.auth import presented_key

        header = current_app.config["SETTINGS"].api_key_header
        return "invalid" if presented_key(request.headers, header) else "missing"
    return "forbidden" if status == 403 else "ok"


def init_app(app: Flask) -> None:
    """When tracing is enabled: a span per request, around every other hook; Redis and SQL child spans."""
    global _current_span
    if not app.config["SETTINGS"].tracing_enabled:
        _current_span = None
        return
    from opentelemetry import trace

    from catalog import otel

    _current_span = trace.get_current_span
    otel.instrument(app, request_hook=_name_unrouted, after_request=_record_decisions)
