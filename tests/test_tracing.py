"""Traces: real gunicorn (2 workers) exporting OTLP/HTTP to a receiver in the test that decodes the real
protobuf payloads; span trees, sampling, log correlation, no secrets, flush on SIGTERM; nothing when off."""

import concurrent.futures
import json
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from tests.conftest import READER_KEY, ROOT, WRITER_KEY, RedisServer, SecretDir, auth, product_body
from tests.failing_app import FAILING_PATH
from tests.otlp_receiver import OtlpReceiver, Span

REDIS_PASSWORD = "redis-password-" + secrets.token_hex(8)
UNKNOWN_ID = "0" * 26
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    otlp = OtlpReceiver()
    yield otlp
    otlp.close()


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password=REDIS_PASSWORD)
    yield server
    server.stop()


@pytest.fixture
def traced(
    gunicorn: Any,
    receiver: OtlpReceiver,
    database_url: str,
    keys_dir: SecretDir,
    redis_with_password: RedisServer,
    tmp_path: Path,
) -> Any:
    """Start catalog with Redis (password from a file) and tracing to the receiver: `traced(**env)`; it is
    tests/failing_app.py's catalog, which has one route that raises."""
    password_file = tmp_path / "redis-password"
    password_file.write_text(REDIS_PASSWORD)

    def start(*arguments: str, **env: str) -> Any:
        return gunicorn(
            {
                "CATALOG_DATABASE_URL": database_url,
                "CATALOG_API_KEYS_DIR": str(keys_dir.path),
                "CATALOG_REDIS_URL": redis_with_password.url,
                "CATALOG_REDIS_PASSWORD_FILE": str(password_file),
                "CATALOG_RATE_LIMIT": "100000/second",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                **env,
            },
            (*arguments, "--pythonpath", str(ROOT), "tests.failing_app:create_app()"),
        )

    return start


def access_line(server: Any, response: requests.Response) -> dict[str, Any]:
    """The access log line of a response (matched by its request id)."""
    request_id = response.headers["X-Request-ID"]
    (line,) = [
        line
        for line in server.log_lines()
        if line["logger"] == "catalog.access" and line["request_id"] == request_id
    ]
    return line


def trace_of(server: Any, receiver: OtlpReceiver, response: requests.Response) -> tuple[Span, list[Span]]:
    """(request span, its child spans) of a response, found through the ids of its access log line; the
    request span ends last, so once it is here every child is too."""
    line = access_line(server, response)
    spans: list[Span] = receiver.wait_for(
        lambda: (
            (found := receiver.trace(line["trace_id"]))
            and any(s.span_id == line["span_id"] for s in found)
            and found
        )
    )
    (root,) = [span for span in spans if span.span_id == line["span_id"]]
    assert root.kind == "SPAN_KIND_SERVER"
    children = [span for span in spans if span is not root]
    assert all(child.parent_span_id == root.span_id for child in children), spans
    return root, children


def status_code(span: Span) -> Any:
    return span.attributes.get("http.response.status_code", span.attributes.get("http.status_code"))


def of_system(spans: list[Span], *systems: str) -> list[Span]:
    return [span for span in spans if span.attributes.get("db.system") in systems]


def statement(span: Span) -> str:
    return str(span.attributes.get("db.statement", span.attributes.get("db.query.text", "")))


def test_span_trees_of_a_write_a_miss_a_hit_a_404_and_a_500(traced: Any, receiver: OtlpReceiver) -> None:
    # A header recorded on request (an operator's setting) keeps its value out of the span if it is a key.
    server = traced(OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST="X-Api-Key,Authorization,Accept")
    with requests.Session() as session:
        # Probes and scrapes make no spans, nor do the readiness probe's database and Redis checks.
        assert session.get(f"{server.url}/readyz", timeout=10).json()["checks"]["cache"] == "ok"
        assert session.get(f"{server.url}/livez", timeout=10).status_code == 200
        assert session.get(f"{server.url}/metrics", timeout=10).status_code == 200
        created = session.post(
            f"{server.url}/api/v1/products", json=product_body(), headers=auth(), timeout=10
        )
        assert created.status_code == 201
        product = f"{server.url}{created.headers['Location']}"
        miss = session.get(product, headers=auth(), timeout=10)
        hit = session.get(product, headers=auth(READER_KEY), timeout=10)
        assert (miss.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
        unknown = session.get(f"{server.url}/api/v1/products/{UNKNOWN_ID}", headers=auth(), timeout=10)
        unrouted = session.get(f"{server.url}/no/such/page/{secrets.token_hex(4)}", timeout=10)
        assert (unknown.status_code, unrouted.status_code) == (404, 404)
        refused = {
            "missing": session.get(f"{server.url}/api/v1/products", timeout=10),
            "invalid": session.get(f"{server.url}/api/v1/products", headers=auth("x" * 32), timeout=10),
            "forbidden": session.post(
                f"{server.url}/api/v1/products", json=product_body(), headers=auth(READER_KEY), timeout=10
            ),
        }
        assert [response.status_code for response in refused.values()] == [401, 401, 403]

    root, children = trace_of(server, receiver, created)
    assert (root.name, status_code(root), root.status) == ("POST /api/v1/products", 201, "STATUS_CODE_UNSET")
    assert root.attributes["catalog.client"] == "writer"
    assert root.attributes["catalog.auth.result"] == "ok"
    assert root.attributes["http.request.header.x_api_key"] == ["[REDACTED]"]
    assert root.attributes["http.request.header.accept"] == ["*/*"]
    assert root.attributes["catalog.rate_limit.exceeded"] is False
    inserts = [span for span in of_system(children, "sqlite") if statement(span).startswith("INSERT")]
    assert {"products", "product_tags"} <= {statement(span).split()[2] for span in inserts}
    (invalidation,) = [span for span in children if "db.redis.pipeline_length" in span.attributes]
    assert "DEL" in invalidation.name.split(), "the write's invalidation is one pipeline, one span"
    assert all(span.kind == "SPAN_KIND_CLIENT" for span in of_system(children, "sqlite", "redis"))

    root, children = trace_of(server, receiver, miss)
    assert root.name == "GET /api/v1/products/<product_id>"
    assert root.attributes["http.route"] == "/api/v1/products/<product_id>"
    assert (status_code(root), root.attributes["catalog.cache.result"]) == (200, "MISS")
    selects = of_system(children, "sqlite")
    assert any(
        statement(span).startswith("SELECT") and "FROM products" in statement(span) for span in selects
    )
    assert of_system(children, "redis"), "the rate limiter's and the cache's Redis calls"
    # The worker's first fill runs the fill script: loaded when the listener subscribed, so no NOSCRIPT.
    assert [(span.name, span.status) for span in children if span.status == "STATUS_CODE_ERROR"] == []

    root, children = trace_of(server, receiver, hit)
    assert (root.attributes["catalog.cache.result"], root.attributes["catalog.client"]) == ("HIT", "reader")
    # The worker's near-cache answered (the miss on this connection's worker filled it): an attribute, not
    # a span. No database read; a Redis call only if the rate limiter's batched counts were due.
    assert root.attributes["catalog.cache.near_hit"] is True
    assert not of_system(children, "sqlite")
    assert {span.name for span in children} <= {"EVALSHA"}

    root, children = trace_of(server, receiver, unknown)
    assert (root.name, status_code(root), root.status) == (
        "GET /api/v1/products/<product_id>",
        404,
        "STATUS_CODE_UNSET",
    )
    root, children = trace_of(server, receiver, unrouted)
    assert (root.name, status_code(root), children) == ("GET", 404, [])
    for result, response in refused.items():
        root, children = trace_of(server, receiver, response)
        assert root.attributes["catalog.auth.result"] == result
        assert root.attributes.get("catalog.client") == ("reader" if result == "forbidden" else None)

    failed = requests.get(f"{server.url}{FAILING_PATH}", timeout=10)
    assert failed.status_code == 500
    root, children = trace_of(server, receiver, failed)
    assert (root.name, status_code(root), root.status) == (f"GET {FAILING_PATH}", 500, "STATUS_CODE_ERROR")
    ((_name, exception),) = [event for event in root.events if event[0] == "exception"]
    assert exception["exception.type"].endswith("ForcedFailure")
    assert "Traceback" in exception["exception.stacktrace"]
    (error_line,) = [line for line in server.log_lines() if line["level"] == "ERROR"]
    assert (error_line["trace_id"], error_line["span_id"]) == (root.trace_id, root.span_id)

    lines = {line["request_id"]: line for line in server.log_lines() if line["logger"] == "catalog.access"}
    for response in (created, miss, hit, unknown, unrouted, failed):
        line = lines[response.headers["X-Request-ID"]]
        root = next(span for span in receiver.trace(line["trace_id"]) if span.span_id == line["span_id"])
        assert root.parent_span_id == "" and root.resource["service.name"] == "catalog"

    assert not [s for s in receiver.spans if not s.parent_span_id and s.kind != "SPAN_KIND_SERVER"]
    assert not [
        s for s in receiver.spans if s.attributes.get("http.route") in ("/readyz", "/livez", "/metrics")
    ]
    everything = json.dumps([(s.attributes, s.events, s.resource) for s in receiver.spans])
    for secret in (WRITER_KEY, READER_KEY, REDIS_PASSWORD):
        assert secret not in everything
    assert '"db.statement": "AUTH' not in everything


def test_each_worker_has_its_own_service_instance(traced: Any, receiver: OtlpReceiver) -> None:
    server = traced()

    def instances() -> dict[int, set[str]]:
        by_pid: dict[int, set[str]] = {}
        for span in list(receiver.spans):
            by_pid.setdefault(span.resource["process.pid"], set()).add(span.resource["service.instance.id"])
        return by_pid

    def both_workers_answered() -> bool:
        # New connections from several threads at once: the two workers take them in turn.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda _: requests.get(f"{server.url}/api/v1/products", headers=auth(), timeout=10),
                    range(16),
                )
            )
        return len(instances()) == 2

    receiver.wait_for(both_workers_answered, timeout=60)
    by_pid = instances()
    assert all(len(ids) == 1 for ids in by_pid.values()), by_pid
    assert len(set.union(*by_pid.values())) == 2


def test_parent_based_sampling_follows_the_callers_traceparent(traced: Any, receiver: OtlpReceiver) -> None:
    # Never sample a trace that starts here; follow the caller's decision for one that does not.
    server = traced(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
    url = f"{server.url}/api/v1/products"
    unsampled_trace = "a" * 32
    # One connection: one worker, whose exporter sends in order.
    with requests.Session() as session:
        own = session.get(url, headers=auth(), timeout=10)
        declined = session.get(
            url, headers={**auth(), "traceparent": f"00-{unsampled_trace}-{CALLER_SPAN}-00"}, timeout=10
        )
        sampled = session.get(
            url,
            headers={
                **auth(),
                "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
                "tracestate": "catalog-test=1",
            },
            timeout=10,
        )
    root, _children = trace_of(server, receiver, sampled)
    assert (root.trace_id, root.parent_span_id, root.trace_state) == (
        CALLER_TRACE,
        CALLER_SPAN,
        "catalog-test=1",
    )
    assert root.attributes["catalog.client"] == "writer"
    assert access_line(server, declined)["trace_id"] == unsampled_trace
    for response in (own, declined):
        assert not receiver.trace(access_line(server, response)["trace_id"])


def test_a_preloaded_app_traces_in_each_worker(traced: Any, receiver: OtlpReceiver) -> None:
    # The app is built in the master, before the fork; the provider and exporter only in the workers.
    server = traced("--preload")
    response = requests.get(f"{server.url}/api/v1/products", headers=auth(), timeout=10)
    root, children = trace_of(server, receiver, response)
    assert root.name == "GET /api/v1/products" and of_system(children, "sqlite")


def test_sigterm_exports_every_finished_span(traced: Any, receiver: OtlpReceiver) -> None:
    # No scheduled export during the test: only the flush at exit can deliver the spans.
    server = traced(OTEL_BSP_SCHEDULE_DELAY="600000")
    responses = [requests.get(f"{server.url}/api/v1/products", headers=auth(), timeout=10) for _ in range(20)]
    assert not receiver.spans
    assert server.stop() == 0
    for response in responses:
        line = access_line(server, response)
        assert any(span.span_id == line["span_id"] for span in receiver.trace(line["trace_id"]))


@pytest.fixture
def untraced(gunicorn: Any, database_url: str, keys_dir: SecretDir) -> Any:
    return gunicorn({"CATALOG_DATABASE_URL": database_url, "CATALOG_API_KEYS_DIR": str(keys_dir.path)})


@pytest.mark.parametrize(
    ("traceparent", "ids"),
    [
        (f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", (CALLER_TRACE, CALLER_SPAN)),
        (f"00-{CALLER_TRACE}-{CALLER_SPAN}-00", (CALLER_TRACE, CALLER_SPAN)),
        (f"cc-{CALLER_TRACE}-{CALLER_SPAN}-01-future", (CALLER_TRACE, CALLER_SPAN)),
        (None, None),
        (f"00-{'0' * 32}-{CALLER_SPAN}-01", None),
        (f"00-{CALLER_TRACE}-{'0' * 16}-01", None),
        (f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01", None),
        (f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01", None),
        ("garbage", None),
    ],
)
def test_with_tracing_off_log_lines_join_the_callers_trace(
    untraced: Any, traceparent: str | None, ids: tuple[str, str] | None
) -> None:
    headers = {**auth(), "traceparent": traceparent} if traceparent is not None else auth()
    response = requests.get(f"{untraced.url}/api/v1/products/{UNKNOWN_ID}", headers=headers, timeout=10)
    assert response.status_code == 404
    line = access_line(untraced, response)
    assert (line.get("trace_id"), line.get("span_id")) == (ids or (None, None))


def test_with_tracing_off_no_opentelemetry_code_runs_for_a_request(client: Any) -> None:
    created = client.post("/api/v1/products", json=product_body(), headers=auth())
    client.get(created.headers["Location"], headers=auth())  # the miss that fills the cache
    called: set[str] = set()

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if event == "call":
            called.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        hit = client.get(
            created.headers["Location"],
            headers={**auth(), "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        )
    finally:
        sys.setprofile(None)
    assert hit.headers["X-Cache"] == "HIT"
    assert any(name.endswith("catalog/tracing.py") for name in called)
    assert not [name for name in called if "opentelemetry" in name]


@pytest.mark.parametrize(
    ("env", "description"),
    [
        ({}, "ParentBased{root:AlwaysOnSampler,"),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, "AlwaysOffSampler"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            "TraceIdRatioBased{0.25}",
        ),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, "ParentBased{root:AlwaysOffSampler,"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}, "ParentBased{root:TraceIdRatioBased{1.0},"),
    ],
)
def test_the_sampler_is_the_one_the_variables_name(env: dict[str, str], description: str) -> None:
    from catalog.otel import RequestTracesOnly, configured_sampler

    sampler = RequestTracesOnly(configured_sampler(env))
    assert sampler.get_description().startswith(f"RequestTracesOnly{{{description}")
