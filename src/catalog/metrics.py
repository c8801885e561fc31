"""Prometheus metrics, merged over all gunicorn workers (multiprocess mode), served at /metrics."""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, Request, Response, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from catalog.config import ConfigError

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Request latencies of this service are 1-100 ms; the buckets resolve that range and flag the tail.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Probes and /metrics are left out of the request metrics.
UNTRACKED = re.compile(r"^/(?:livez|healthz|readyz|metrics)$")
# Any token is a valid HTTP method: the request metrics name the standard ones and count every other
# as `_OTHER` (OpenTelemetry's convention), so clients cannot mint label values with made-up methods.
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
OTHER_METHOD = "_OTHER"

# Bumped by the gunicorn master before and after it folds a dead worker's files into the archives (odd
# while folding). A scrape whose read overlapped a fold reads again, so it counts every worker exactly
# once: from its own files or from the archive. The master never waits for scrapes.
FOLD_SEQUENCE_FILE = ".fold.seq"
# A scrape keeps trying this long for a read no fold overlapped, then fails rather than show wrong sums.
CONSISTENT_READ_SECONDS = 5.0

APP_INFO = Gauge(
    "catalog_app_info",
    "The running version of catalog (value 1)",
    ["version", "commit"],
    multiprocess_mode="max",
)
# Each counter with its known label values: all are exported as 0 from the start (and each client's as its
# key loads), so rate() and ratios work from the first scrape instead of from the first event.
CACHE_RESULTS = ("hit", "miss", "bypass", "error")
CACHE_REQUESTS = Counter("catalog_cache_requests_total", "Cache lookups by result", ["result"])
# Children bound once: a `labels()` call per lookup costs a lock and a dict lookup.
CACHE_HIT = CACHE_REQUESTS.labels(result="hit")
CACHE_MISS = CACHE_REQUESTS.labels(result="miss")
CACHE_BYPASS = CACHE_REQUESTS.labels(result="bypass")
CACHE_ERROR = CACHE_REQUESTS.labels(result="error")
CACHE_CIRCUIT_OPEN = Gauge(
    "catalog_cache_circuit_open", "1 while the Redis circuit breaker is open", multiprocess_mode="livemax"
)
AUTH_FAILURE_REASONS = ("missing", "invalid", "forbidden")
AUTH_FAILURES = Counter("catalog_auth_failures_total", "Rejected API requests by reason", ["reason"])
API_KEYS_LOADED = Gauge(
    "catalog_api_keys_loaded", "Valid API keys loaded from the mounted Secret", multiprocess_mode="livemax"
)
DB_OPERATIONS = (
    "ping",
    "get_product",
    "list_products",
    "insert_product",
    "update_product",
    "delete_product",
    "get_idempotency_key",
    "store_idempotency_key",
    "record_invalidation",
    "pending_invalidations",
    "delete_invalidations",
)
DB_QUERIES = Counter("catalog_db_queries_total", "Database statements by operation", ["operation"])
# Failed authentications count under this client; API clients under their names (added as keys load).
ANONYMOUS_CLIENT = "anonymous"
RATE_LIMITED = Counter("catalog_rate_limited_total", "Requests answered 429 by client", ["client"])
KNOWN_LABEL_VALUES: tuple[tuple[Counter, tuple[str, ...]], ...] = (
    (CACHE_REQUESTS, CACHE_RESULTS),
    (AUTH_FAILURES, AUTH_FAILURE_REASONS),
    (DB_QUERIES, DB_OPERATIONS),
    (RATE_LIMITED, (ANONYMOUS_CLIENT,)),
)


def export_known_label_values() -> None:
    """Create every known child of the catalog_* counters (at 0) in this process's metric files."""
    for counter, values in KNOWN_LABEL_VALUES:
        for label_value in values:
            counter.labels(label_value)


def export_clients(names: Iterable[str]) -> None:
    """API clients are label values too: exported at 0 as their keys load."""
    for name in names:
        RATE_LIMITED.labels(client=name)


def read_fold_sequence(directory: str) -> int:
    """How many times a fold started or ended in `directory` (odd: one is running)."""
    try:
        with open(os.path.join(directory, FOLD_SEQUENCE_FILE)) as sequence_file:
            return int(sequence_file.read())
    except FileNotFoundError:
        return 0


def write_fold_sequence(directory: str, sequence: int) -> None:
    """Replace the sequence atomically (readers never see a half-written number)."""
    path = os.path.join(directory, FOLD_SEQUENCE_FILE)
    with open(f"{path}.tmp", "w") as sequence_file:
        sequence_file.write(str(sequence))
    os.replace(f"{path}.tmp", path)


class InconsistentRead(RuntimeError):
    """Folds kept overlapping the reads of a scrape."""


class WorkerFilesCollector(multiprocess.MultiProcessCollector):
    """Merges the workers' metric files; a read that a fold overlapped (the sequence moved, or a file was
    folded away mid-read) is done again."""

    def __init__(self, registry: CollectorRegistry, directory: str) -> None:
        super().__init__(registry, path=directory)  # type: ignore[no-untyped-call]
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        deadline = time.monotonic() + CONSISTENT_READ_SECONDS
        while time.monotonic() < deadline:
            sequence = read_fold_sequence(self.directory)
            if sequence % 2:
                time.sleep(0.002)
                continue
            try:
                metrics = list(super().collect())  # type: ignore[no-untyped-call]
            except FileNotFoundError:
                continue
            if read_fold_sequence(self.directory) == sequence:
                return iter(metrics)
        raise InconsistentRead(f"metric files kept changing for {CONSISTENT_READ_SECONDS} s")


def serve_metrics() -> Response:
    """The Prometheus text (or OpenMetrics, if asked) of all workers merged."""
    registry = CollectorRegistry()
    WorkerFilesCollector(registry, os.environ[MULTIPROC_ENV])
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(registry), content_type=content_type)


def check_multiprocess_dir() -> None:
    """The workers' metric files need a directory that exists (the start command empties it)."""
    directory = os.environ.get(MULTIPROC_ENV, "")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(MULTIPROC_ENV, "must name an existing, writable directory")


class RequestMetrics(GunicornInternalPrometheusMetrics):  # type: ignore[misc]
    """prometheus-flask-exporter in gunicorn multiprocess mode, with its default request metrics (same
    names, labels and help; not its exceptions counter, which errors.py's handler of every exception left
    at 0) recorded by `record`, which the pipeline calls once per answer, instead of by
    the exporter's own hooks: those probe the request proxy four times and look each metric's child up by
    `labels(**kwargs)` on every request, about 70 us of CPU per request (bench/profile_app.py), a third of
    a cached read. Here each (method, URL rule, status) binds its two children once."""

    def export_defaults(
        self,
        buckets: tuple[float, ...] = REQUEST_BUCKETS,
        group_by: str = "path",
        latency_as_histogram: bool = True,
        prefix: str = "flask",
        app: Flask | None = None,
        **kwargs: Any,
    ) -> None:
        """The exporter's default metrics, without its hooks."""
        self.info(
            f"{prefix}_exporter_info", "Information about the Prometheus Flask exporter", version=self.version
        )
        self.duration = Histogram(
            f"{prefix}_http_request_duration_seconds",
            "Flask HTTP request duration in seconds",
            ("method", group_by, "status"),
            registry=self.registry,
            buckets=buckets,
        )
        self.total = Counter(
            f"{prefix}_http_request_total",
            "Total number of HTTP requests",
            ("method", "status"),
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def record(self, request: Request, status: int, started: float) -> None:
        """One answered request (probes and /metrics excepted), `started` by time.perf_counter()."""
        if UNTRACKED.match(request.path):
            return
        method = request.method if request.method in STANDARD_METHODS else OTHER_METHOD
        rule = request.url_rule
        key = (method, rule.rule if rule is not None else "None", status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.duration.labels(method, key[1], status),
                self.total.labels(method, status),
            )
        children[0].observe(max(time.perf_counter() - started, 0.0))
        children[1].inc()


def init_app(app: Flask) -> None:
    """Export the request metrics by URL rule (probes and /metrics untracked) and serve /metrics."""
    check_multiprocess_dir()
    exporter = RequestMetrics.for_app_factory(path=None, group_by="url_rule", buckets=REQUEST_BUCKETS)
    exporter.init_app(app)
    app.extensions["catalog.request_metrics"] = exporter
    app.add_url_rule("/metrics", "metrics", serve_metrics)
    settings = app.config["SETTINGS"]
    APP_INFO.labels(version=settings.version, commit=settings.commit).set(1)
    export_known_label_values()


Sample = tuple[float, float]  # (value, timestamp) as the metric files hold them


def _add(archived: Sample, dead: Sample) -> Sample:
    """Counts add up."""
    return archived[0] + dead[0], dead[1]


def _larger(archived: Sample, dead: Sample) -> Sample:
    """A max gauge keeps the larger value."""
    return dead if dead[0] > archived[0] else archived


def _smaller(archived: Sample, dead: Sample) -> Sample:
    """A min gauge keeps the smaller value."""
    return dead if dead[0] < archived[0] else archived


def _newer(archived: Sample, dead: Sample) -> Sample:
    """A mostrecent gauge keeps the value set last."""
    return dead if dead[1] >= archived[1] else archived


# How a dead worker's samples combine with the archive's, by file kind. Histogram files hold each bucket's
# own count (the collector accumulates them), so buckets add like counters. Live gauges are dropped
# (mark_process_dead), and so are `all` gauges (a series per pid would keep every dead pid).
FOLDS: dict[str, Callable[[Sample, Sample], Sample]] = {
    "counter": _add,
    "histogram": _add,
    "summary": _add,
    "gauge_sum": _add,
    "gauge_max": _larger,
    "gauge_min": _smaller,
    "gauge_mostrecent": _newer,
}


def read_samples(path: str) -> dict[str, Sample]:
    """Every sample of a metric file by its key."""
    samples = MmapedDict.read_all_values_from_file(path)  # type: ignore[no-untyped-call]
    return {key: (value, timestamp) for key, value, timestamp, _position in samples}


def write_samples(path: str, samples: dict[str, Sample]) -> None:
    """A new metric file holding `samples`."""
    if os.path.exists(path):
        os.remove(path)
    mapped: Any = MmapedDict(path)  # type: ignore[no-untyped-call]
    try:
        for key, (value, timestamp) in samples.items():
            mapped.write_value(key, value, timestamp)
    finally:
        mapped.close()


def fold_into_archive(path: str, archive: str, fold: Callable[[Sample, Sample], Sample]) -> None:
    """Write archive + dead file to a new file and rename it over the archive (never half-written)."""
    merged = read_samples(archive) if os.path.exists(archive) else {}
    for key, sample in read_samples(path).items():
        merged[key] = fold(merged[key], sample) if key in merged else sample
    # Not *.db: the collector never reads it.
    temporary = os.path.join(os.path.dirname(archive), f".{os.path.basename(archive)}.tmp")
    write_samples(temporary, merged)
    os.replace(temporary, archive)


def fold_dead_worker(pid: int, directory: str | None = None) -> None:
    """gunicorn child_exit: add a dead worker's counters and histograms to one archive file per type,
    combine its max/min/sum/mostrecent gauges likewise, and drop its other gauges; restarts then lose no
    counts and the number of files stays bounded. Only one process (the master) may fold in a directory.
    Never raises: an exception here would stop the master."""
    try:
        directory = directory or os.environ[MULTIPROC_ENV]
        running = read_fold_sequence(directory) // 2 * 2 + 1
        write_fold_sequence(directory, running)
        try:
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
            for path in sorted(glob.glob(os.path.join(directory, f"*_{pid}.db"))):
                kind = os.path.basename(path)[: -len(f"_{pid}.db")]
                fold = FOLDS.get(kind)
                if fold is not None:
                    fold_into_archive(path, os.path.join(directory, f"{kind}_archive.db"), fold)
                os.remove(path)
        finally:
            write_fold_sequence(directory, running + 1)
    except Exception:
        # What was not folded stays in the dead worker's files: still counted, once.
        log.exception("folding the metric files of a dead worker failed", extra={"pid": pid})
