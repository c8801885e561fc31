"""Prometheus metrics, merged over all gunicorn workers (multiprocess mode), served at /metrics."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from catalog.config import ConfigError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Request latencies of this service are 1-100 ms; the buckets resolve that range and flag the tail.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UNTRACKED_PATHS = [r"^/livez$", r"^/healthz$", r"^/readyz$", r"^/metrics$"]

APP_INFO = Gauge(
    "catalog_app_info", "The running version of catalog (value 1)", ["version", "commit"], multiprocess_mode="max"
)
CACHE_REQUESTS = Counter("catalog_cache_requests_total", "Cache lookups by result", ["result"])
CACHE_CIRCUIT_OPEN = Gauge(
    "catalog_cache_circuit_open", "1 while the Redis circuit breaker is open", multiprocess_mode="livemax"
)
AUTH_FAILURES = Counter("catalog_auth_failures_total", "Rejected API requests by reason", ["reason"])
API_KEYS_LOADED = Gauge(
    "catalog_api_keys_loaded", "Valid API keys loaded from the mounted Secret", multiprocess_mode="livemax"
)
DB_QUERIES = Counter("catalog_db_queries_total", "Database statements by operation", ["operation"])
RATE_LIMITED = Counter("catalog_rate_limited_total", "Requests answered 429 by client", ["client"])


class WorkerFilesCollector(multiprocess.MultiProcessCollector):  # type: ignore[misc]
    """Merges the workers' metric files; a file folded away mid-read (a worker restart) is read again."""

    def collect(self) -> Iterator[Metric]:
        for _attempt in range(3):
            try:
                return iter(list(super().collect()))
            except FileNotFoundError:
                continue
        return iter(list(super().collect()))


def serve_metrics() -> Response:
    """The Prometheus text (or OpenMetrics, if asked) of all workers merged."""
    registry = CollectorRegistry()
    WorkerFilesCollector(registry)
    encoder, content_type = choose_encoder(request.headers.get("Accept"))
    return Response(encoder(registry), content_type=content_type)


def check_multiprocess_dir() -> None:
    """The workers' metric files need a directory that exists (the start command empties it)."""
    if not os.path.isdir(os.environ.get(MULTIPROC_ENV, "")):
        raise ConfigError(MULTIPROC_ENV, "must name an existing, writable directory")


def init_app(app: Flask) -> None:
    """Export the request metrics by URL rule (probes and /metrics untracked) and serve /metrics."""
    check_multiprocess_dir()
    exporter = GunicornInternalPrometheusMetrics.for_app_factory(
        path=None, group_by="url_rule", buckets=REQUEST_BUCKETS, excluded_paths=UNTRACKED_PATHS
    )
    exporter.init_app(app)
    app.add_url_rule("/metrics", "metrics", serve_metrics)
    settings = app.config["SETTINGS"]
    APP_INFO.labels(version=settings.version, commit=settings.commit).set(1)


# How a dead worker's gauge values combine with the archive's, by multiprocess mode.
GAUGE_FOLDS = {"max": max, "min": min, "sum": lambda a, b: a + b}


def fold_dead_worker(pid: int, directory: str | None = None) -> None:
    """gunicorn child_exit: add a dead worker's counters and histograms to one archive file per type,
    combine its max/min/sum gauges likewise, and drop its live gauges; restarts then lose no counts and
    the number of files stays bounded."""
    directory = directory or os.environ[MULTIPROC_ENV]
    multiprocess.mark_process_dead(pid, directory)
    for path in glob.glob(os.path.join(directory, f"*_{pid}.db")):
        kind = os.path.basename(path)[: -len(f"_{pid}.db")]
        mode = kind.removeprefix("gauge_") if kind.startswith("gauge_") else None
        if mode is not None and mode not in GAUGE_FOLDS:
            os.remove(path)
            continue
        archive = MmapedDict(os.path.join(directory, f"{kind}_archive.db"))
        try:
            for key, value, timestamp, _position in MmapedDict.read_all_values_from_file(path):
                if mode is None:
                    archived, _ = archive.read_value(key)
                    archive.write_value(key, archived + value, timestamp)
                else:
                    known = key in archive._positions
                    archived, _ = archive.read_value(key)
                    archive.write_value(key, GAUGE_FOLDS[mode](archived, value) if known else value, timestamp)
        finally:
            archive.close()
        os.remove(path)
