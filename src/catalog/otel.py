"""The OpenTelemetry side of tracing, imported only when tracing is on: the worker's provider (sampler,
exporter) and the instrumentation of the app, its Redis client and its database engine."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flask import Flask
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.instrumentation.sqlalchemy.version import __version__ as sqlalchemy_version
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, get_current_span
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

SERVICE_NAME = "catalog"
# Probes and scrapes would be most traces and tell nothing. Left out by the sampler, from the route it is
# given: the instrumentation's own exclusion (OTEL_PYTHON_FLASK_EXCLUDED_URLS, still honoured when set)
# builds the request's full URL three times per request to match it.
UNTRACED_ROUTES = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
# Request headers the instrumentation may be told to record (OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*)
# are recorded as [REDACTED] when they carry credentials, whatever else the variable lists.
SANITIZE_FIELDS = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS"
CREDENTIAL_HEADERS = ("authorization", "cookie", "set-cookie", "proxy-authorization")


class RequestTracesOnly(Sampler):
    """The configured sampler, for traces of requests other than probes and scrapes. A Redis command or
    SQL statement outside any request span (a background thread) would otherwise be a trace of its own,
    and a probe one every few seconds, telling nothing."""

    def __init__(self, configured: Sampler) -> None:
        self.configured = configured

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """Drop a probe's span and a root span that is not a request's; else what the configured sampler
        says (the children of a dropped span follow it)."""
        if kind is SpanKind.SERVER:
            if attributes and attributes.get("http.route") in UNTRACED_ROUTES:
                return SamplingResult(Decision.DROP)
        elif not get_current_span(parent_context).get_span_context().is_valid:
            return SamplingResult(Decision.DROP)
        return self.configured.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """For the SDK's debug output."""
        return f"RequestTracesOnly{{{self.configured.get_description()}}}"


def configured_sampler(env: Mapping[str, str]) -> Sampler:
    """What OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG name (validated by catalog.config)."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip() or "parentbased_always_on"
    ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or "1.0")
    root = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}.get(
        name.removeprefix("parentbased_")
    ) or TraceIdRatioBased(ratio)
    return ParentBased(root) if name.startswith("parentbased_") else root


def provider(version: str) -> TracerProvider:
    """This worker's provider: its own service.instance.id, a batching OTLP/HTTP exporter configured by the
    OTEL_EXPORTER_OTLP_* variables, the sampler of OTEL_TRACES_SAMPLER for traces of requests."""
    resource = Resource.create(
        {"service.instance.id": str(uuid.uuid4()), "service.version": version, "process.pid": os.getpid()}
    )
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    tracer_provider = TracerProvider(
        resource=resource, sampler=RequestTracesOnly(configured_sampler(os.environ))
    )
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return tracer_provider


def instrument(
    app: Flask,
    request_hook: Callable[[Span, dict[str, Any]], None],
    after_request: Callable[[Any], Any],
) -> None:
    """A server span per request, around every other hook; Redis commands and SQL statements as its
    children."""
    # The instrumentation reads this variable on every request, from the environment only.
    sanitized = [
        os.environ.get(SANITIZE_FIELDS, ""),
        app.config["SETTINGS"].api_key_header,
        *CREDENTIAL_HEADERS,
    ]
    os.environ[SANITIZE_FIELDS] = ",".join(field for field in sanitized if field)
    FlaskInstrumentor.instrument_app(  # type: ignore[no-untyped-call]
        app, request_hook=request_hook, enable_commenter=False
    )
    # The span must be open before auth and the rate limiter run (their Redis calls are its children,
    # and a hook that answers 401 or 429 skips the hooks after it), and `after_request` reads what every
    # other after_request hook decided: first in both lists (after_request hooks run in reverse).
    before = app.before_request_funcs.setdefault(None, [])
    before.insert(0, before.pop(before.index(app._before_request)))  # type: ignore[attr-defined]
    app.after_request_funcs.setdefault(None, []).insert(0, after_request)

    # A span per SQL statement, from the engine's events. Not through SQLAlchemyInstrumentor().instrument:
    # it declares `sqlalchemy<2.1` and, past that check, imports sqlalchemy.ext.asyncio, which 2.1 cannot
    # without greenlet; it would also patch create_engine and Engine.connect for the whole process. The
    # engine tracer it would return is the part needed; tests/test_tracing.py proves the SQL spans.
    EngineTracer(  # type: ignore[no-untyped-call]
        trace.get_tracer(EngineTracer.__module__, sqlalchemy_version),
        app.extensions["catalog.db"].engine,
        # Connection-pool usage is a metric; catalog's metrics are Prometheus', so this one goes nowhere.
        metrics.get_meter(__name__).create_up_down_counter("db.client.connections.usage"),
    )
    guarded = app.extensions["catalog.redis"]
    if guarded is not None:
        # Commands are recorded as `SET ? ?`: no key, value or password reaches a span.
        RedisInstrumentor.instrument_client(guarded.client)
    near = getattr(app.extensions["catalog.cache"], "near", None)
    if near is not None:
        _mark_near_hits(near)


def _mark_near_hits(near: Any) -> None:
    """A read the worker's near-cache answered makes no network call, so no span: the request's span says
    `catalog.cache.near_hit` instead (its lookups wrapped, on this worker's near-cache only)."""
    for name in ("product", "page"):
        lookup = getattr(near, name)

        def marked(key: str, lookup: Callable[[str], bytes | None] = lookup) -> bytes | None:
            value = lookup(key)
            if value is not None:
                get_current_span().set_attribute("catalog.cache.near_hit", True)
            return value

        setattr(near, name, marked)


def record_exception(span: Span, error: BaseException) -> None:
    """An unhandled exception on the span (event `exception` with the traceback), status ERROR."""
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
