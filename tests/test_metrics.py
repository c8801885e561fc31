"""Metrics in multiprocess mode: exact sums over real gunicorn workers, across worker restarts, with bounded
labels and files; the fold of a dead worker's files against concurrent scrapes."""

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from tests.conftest import READER_KEY, WRITER_KEY, auth, product_body, worker_pids

from catalog.metrics import (
    DB_OPERATIONS,
    OTHER_METHOD,
    REQUEST_BUCKETS,
    STANDARD_METHODS,
    WorkerFilesCollector,
    fold_dead_worker,
    read_fold_sequence,
    read_samples,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

BAD_KEY = "not-a-key-of-anyone-0123456789"
REQUESTS_TOTAL = "flask_http_request_total"
DURATION_BUCKET = "flask_http_request_duration_seconds_bucket"
PRODUCT_RULE = "/api/v1/products/<product_id>"


# --- helpers -----------------------------------------------------------------------------------------------


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> Samples:
    """One scrape of the service's /metrics."""
    response = requests.get(f"{url}/metrics", timeout=15)
    assert response.status_code == 200, response.text
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, sample_labels), v in samples.items() if n == name and wanted <= sample_labels)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    """The values one label takes among the samples of `name`."""
    return {v for (n, labels), _ in samples.items() if n == name for k, v in labels if k == label}


def collect(directory: Path, collector: Callable[..., Any] = WorkerFilesCollector) -> Samples:
    """What a scrape of `directory` would show, read in this process."""
    registry = CollectorRegistry()
    collector(registry, str(directory))
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def file_owners(directory: Path) -> set[int]:
    """The pids that metric files in `directory` belong to (archives excluded)."""
    owners = set()
    for path in directory.glob("*.db"):
        suffix = path.stem.rsplit("_", 1)[1]
        if suffix.isdigit():
            owners.add(int(suffix))
    return owners


def answered_reads(histogram_file: Path) -> float:
    """How many product reads (GET 200) one worker recorded in its own histogram file."""
    if not histogram_file.exists():
        return 0.0
    count = 0.0
    for key, (sample, _timestamp) in read_samples(str(histogram_file)).items():
        _metric, name, labels, _help = json.loads(key)
        wanted = {"method": "GET", "status": "200", "url_rule": PRODUCT_RULE}
        if name == DURATION_BUCKET and wanted.items() <= labels.items():
            count += sample  # files hold each bucket's own count: they add up to the total
    return count


def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until `condition()` holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def send(requests_to_send: Iterable[Callable[[], requests.Response]], parallel: int = 6) -> list[int]:
    """Send requests (each on a new connection) from `parallel` threads; their status codes."""
    with ThreadPoolExecutor(parallel) as pool:
        return [response.status_code for response in pool.map(lambda call: call(), requests_to_send)]


def dead_worker_files(directory: Path, n: int) -> int:
    """Run WORKER_SCRIPT with `n` in a real process writing metric files to `directory`; its (dead) pid."""
    process = subprocess.run(
        [sys.executable, "-c", f"import os\n{WORKER_SCRIPT}\nprint(os.getpid())"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "N": str(n)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(process.stdout.split()[-1])


WORKER_SCRIPT = """
from prometheus_client import Counter, Gauge, Histogram, Summary
n = int(os.environ["N"])
jobs = Counter("jobs_total", "c", ["kind"])
jobs.labels("a").inc(n)
jobs.labels("b").inc(2 * n)
histogram = Histogram("latency_seconds", "h", ["route"], buckets=(0.001, 0.01, 0.1))
for seconds in (0.0005, 0.005, 0.05 * n, 7):
    histogram.labels("/x").observe(seconds)
Summary("sizes", "s").observe(n)
Gauge("peak", "g", multiprocess_mode="max").set(n)
Gauge("low", "g", multiprocess_mode="min").set(n)
Gauge("added", "g", multiprocess_mode="sum").set(n)
Gauge("latest", "g", multiprocess_mode="mostrecent").set(n)
Gauge("live", "g", multiprocess_mode="livesum").set(n)
Gauge("each", "g", multiprocess_mode="all").set(n)
"""


# --- the fold, against real processes' files --------------------------------------------------------------


def test_fold_keeps_every_count_and_leaves_one_archive_per_kind(tmp_path: Path) -> None:
    """Folding dead workers one by one changes no counter, histogram bucket or max/min/sum/mostrecent gauge
    of a scrape, drops live and per-pid gauges, and leaves only the archives."""
    pids = [dead_worker_files(tmp_path, n) for n in (1, 2, 3)]
    before = collect(tmp_path, MultiProcessCollector)
    # The truth, computed by hand: the library's own merge of the unfolded files must agree with it.
    assert value(before, "jobs_total", kind="a") == 6
    assert value(before, "jobs_total", kind="b") == 12
    assert value(before, "latency_seconds_bucket", route="/x", le="0.001") == 3
    assert value(before, "latency_seconds_bucket", route="/x", le="0.01") == 6
    assert value(before, "latency_seconds_bucket", route="/x", le="0.1") == 8  # 0.05 and 0.1, not 0.15
    assert value(before, "latency_seconds_bucket", route="/x", le="+Inf") == 12
    assert value(before, "latency_seconds_count", route="/x") == 12
    assert value(before, "sizes_count") == 3

    for folded, pid in enumerate(pids, start=1):
        fold_dead_worker(pid, str(tmp_path))
        after = collect(tmp_path)
        kept = {key: v for key, v in before.items() if key[0] not in ("live", "each")}
        assert kept.keys() <= after.keys()
        assert {key: after[key] for key in kept} == pytest.approx(kept), f"after folding {folded}"
        assert value(after, "peak") == 3
        assert value(after, "low") == 1
        assert value(after, "added") == 6
        assert value(after, "latest") == 3
        assert value(after, "live") == sum(range(folded + 1, 4))
        assert file_owners(tmp_path) == set(pids[folded:])

    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".fold.seq",
        "counter_archive.db",
        "gauge_max_archive.db",
        "gauge_min_archive.db",
        "gauge_mostrecent_archive.db",
        "gauge_sum_archive.db",
        "histogram_archive.db",
        "summary_archive.db",
    ]


def test_scrapes_during_folds_count_each_dead_worker_exactly_once(tmp_path: Path) -> None:
    """Scrapes running while dead workers are folded never see a worker twice (archive and own file) nor
    not at all: every scrape shows the same totals."""
    pid = dead_worker_files(tmp_path, 1)
    workers = 60
    for fake_pid in range(1, workers):  # copies of a real worker's files, as if 60 workers had died
        for path in tmp_path.glob(f"*_{pid}.db"):
            (tmp_path / path.name.replace(f"_{pid}.db", f"_{9_000_000 + fake_pid}.db")).write_bytes(
                path.read_bytes()
            )
    seen: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    folding = threading.Event()
    folding.set()

    def scrape_in_loop() -> None:
        try:
            while folding.is_set():
                samples = collect(tmp_path)
                seen.append(
                    (
                        value(samples, "jobs_total", kind="a"),
                        value(samples, "latency_seconds_count", route="/x"),
                    )
                )
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    scrapers = [threading.Thread(target=scrape_in_loop) for _ in range(3)]
    for scraper in scrapers:
        scraper.start()
    try:
        for fake_pid in [pid, *(9_000_000 + n for n in range(1, workers))]:
            scraped = len(seen)
            fold_dead_worker(fake_pid, str(tmp_path))
            # Workers die apart from each other: a scrape ends after each fold (however slow the machine),
            # while the other two scrapers are anywhere in theirs.
            deadline = time.monotonic() + 30
            while len(seen) == scraped and not errors and time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        folding.clear()
        for scraper in scrapers:
            scraper.join(30)
    assert not errors, errors
    assert len(seen) >= workers  # a scrape ended after every fold
    assert set(seen) == {(workers * 1.0, workers * 4.0)}
    assert file_owners(tmp_path) == set()


def test_a_fold_that_fails_leaves_the_files_and_does_not_raise(tmp_path: Path, caplog: Any) -> None:
    """A dead worker's file that cannot be read is left as it is, with an error logged: child_exit never
    raises (that would stop gunicorn's master) and scrapes are not left waiting for the fold to end."""
    broken = tmp_path / "counter_4242.db"
    broken.write_bytes((1 << 20).to_bytes(4, "little") + bytes(60))  # claims 1 MiB used, holds 64 bytes
    fold_dead_worker(4242, str(tmp_path))
    assert broken.exists()
    assert "folding the metric files of a dead worker failed" in caplog.text
    assert read_fold_sequence(str(tmp_path)) % 2 == 0


# --- real gunicorn -----------------------------------------------------------------------------------------


def server_env(sqlite_url: str, keys_dir: Any, **extra: str) -> dict[str, str]:
    """The environment of a gunicorn under test: the test database and keys, no auth-failure limit."""
    return {
        "CATALOG_DATABASE_URL": sqlite_url,
        "CATALOG_API_KEYS_DIR": str(keys_dir.path),
        "CATALOG_AUTH_FAILURE_LIMIT": "100000/minute",
        **extra,
    }


@pytest.mark.slow
def test_one_scrape_sums_the_counts_of_all_three_workers(
    gunicorn: Any, sqlite_url: str, keys_dir: Any
) -> None:
    """Requests spread over 3 workers; one scrape shows each counter summed over all of them, exactly."""
    server = gunicorn(server_env(sqlite_url, keys_dir, WEB_CONCURRENCY="3"))
    metrics_dir = Path(server.env["PROMETHEUS_MULTIPROC_DIR"])
    created = requests.post(f"{server.url}/api/v1/products", json=product_body(), headers=auth(), timeout=15)
    assert created.status_code == 201, created.text
    product = f"{server.url}/api/v1/products/{created.json()['id']}"
    before = scrape(server.url)

    def get_product() -> requests.Response:
        return requests.get(product, headers=auth(READER_KEY), timeout=30)

    def reads_by_worker() -> dict[int, float]:
        """Each worker's own count of product reads answered, from its histogram file."""
        return {
            pid: answered_reads(metrics_dir / f"histogram_{pid}.db")
            for pid in worker_pids(server.process.pid)
        }

    def every_worker_read() -> bool:
        by_worker = reads_by_worker()
        return len(by_worker) == 3 and all(by_worker.values())

    statuses: list[int] = []
    while len(statuses) < 600 and not every_worker_read():
        statuses += send([get_product] * 30)
    reads = len(statuses)
    assert statuses == [200] * reads
    by_worker = reads_by_worker()
    assert len(by_worker) == 3 and all(by_worker.values()), f"reads by worker: {by_worker}"
    assert sum(by_worker.values()) == reads

    invalid, missing, forbidden = 7, 5, 4
    statuses = send(
        [lambda: requests.get(product, headers=auth(BAD_KEY), timeout=30)] * invalid
        + [lambda: requests.get(product, timeout=30)] * missing
        + [
            lambda: requests.post(
                f"{server.url}/api/v1/products", json=product_body(), headers=auth(READER_KEY), timeout=30
            )
        ]
        * forbidden
    )
    assert sorted(statuses) == [401] * (invalid + missing) + [403] * forbidden

    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(REQUESTS_TOTAL, method="GET", status="200") == reads
    assert delta(REQUESTS_TOTAL, method="GET", status="401") == invalid + missing
    assert delta(REQUESTS_TOTAL, method="POST", status="403") == forbidden
    assert (
        delta(
            "flask_http_request_duration_seconds_count",
            method="GET",
            status="200",
            url_rule=PRODUCT_RULE,
        )
        == reads
    )
    assert delta("catalog_auth_failures_total", reason="invalid") == invalid
    assert delta("catalog_auth_failures_total", reason="missing") == missing
    assert delta("catalog_auth_failures_total", reason="forbidden") == forbidden
    misses = delta("catalog_cache_requests_total", result="miss")
    assert 1 <= misses <= 3  # the in-process cache of each worker fills once
    assert delta("catalog_cache_requests_total", result="hit") == reads - misses
    assert delta("catalog_db_queries_total", operation="get_product") == misses
    assert value(after, "catalog_api_keys_loaded") == 2
    assert total(after, "catalog_app_info") == 1


@pytest.mark.slow
def test_worker_restarts_lose_no_counts_and_leave_no_files_behind(
    gunicorn: Any, sqlite_url: str, keys_dir: Any
) -> None:
    """With a restart every 5 requests, every scrape still shows the exact number of requests answered, and
    the metrics directory holds files of live processes and the archives only."""
    server = gunicorn(
        server_env(sqlite_url, keys_dir, WEB_CONCURRENCY="3"),
        arguments=("--max-requests", "5", "--max-requests-jitter", "0"),
    )
    metrics_dir = Path(server.env["PROMETHEUS_MULTIPROC_DIR"])
    answered = 0
    for _ in range(6):
        for _ in range(10):
            assert requests.get(f"{server.url}/version", timeout=30).status_code == 200
            answered += 1
        samples = scrape(server.url)
        assert value(samples, REQUESTS_TOTAL, method="GET", status="200") == answered
        assert (
            value(
                samples,
                "flask_http_request_duration_seconds_count",
                method="GET",
                status="200",
                url_rule="/version",
            )
            == answered
        )

    lines = server.log_lines()
    assert len([line for line in lines if line["message"].startswith("Booting worker")]) >= 3 + 10, "restarts"
    assert not [line for line in lines if line["message"].startswith("folding the metric files")]

    # Per live worker: counter, histogram, max and livemax gauges; the master's livemax gauges; the
    # archives of counters, histograms and max gauges; the fold sequence.
    bound = 3 * 4 + 1 + 3 + 1

    def only_live_files() -> bool:
        # A worker that served the last scrape may still be restarting: its files and its successor's then
        # exist together until the master folds them, so both conditions are awaited at once.
        live = worker_pids(server.process.pid) | {server.process.pid}
        return file_owners(metrics_dir) <= live and len(list(metrics_dir.iterdir())) <= bound

    poll(only_live_files, 30, "the files of dead workers to be folded")
    assert value(scrape(server.url), REQUESTS_TOTAL, method="GET", status="200") == answered


@pytest.mark.slow
def test_labels_stay_bounded_and_buckets_are_the_declared_ones(
    gunicorn: Any, sqlite_url: str, keys_dir: Any
) -> None:
    """Probes and /metrics are not counted; unknown paths share one url_rule value; made-up methods one
    method value (while the access log keeps the real one); the latency buckets are REQUEST_BUCKETS."""
    server = gunicorn(server_env(sqlite_url, keys_dir, WEB_CONCURRENCY="1"))
    assert requests.get(f"{server.url}/version", timeout=15).status_code == 200
    before = scrape(server.url)

    for path in ("/livez", "/healthz", "/readyz", "/metrics") * 3:
        assert requests.get(f"{server.url}{path}", timeout=15).status_code == 200
    after_probes = scrape(server.url)
    assert total(after_probes, REQUESTS_TOTAL) == total(before, REQUESTS_TOTAL) == 1
    assert label_values(after_probes, DURATION_BUCKET, "url_rule") == {"/version"}

    unknown_paths = [f"/{uuid.uuid4().hex}" for _ in range(10)] + [
        f"/api/v1/{uuid.uuid4().hex}" for _ in range(10)
    ]
    for path in unknown_paths:
        assert requests.get(f"{server.url}{path}", headers=auth(WRITER_KEY), timeout=15).status_code == 404
    made_up_methods = [f"M{uuid.uuid4().hex[:8].upper()}" for _ in range(10)]
    for method in made_up_methods:
        assert requests.request(method, f"{server.url}/version", timeout=15).status_code == 405
    samples = scrape(server.url)

    assert label_values(samples, DURATION_BUCKET, "url_rule") == {"/version", "None"}
    assert value(samples, REQUESTS_TOTAL, method="GET", status="404") == len(unknown_paths)
    assert label_values(samples, REQUESTS_TOTAL, "method") == {"GET", OTHER_METHOD}
    assert label_values(samples, DURATION_BUCKET, "method") <= STANDARD_METHODS | {OTHER_METHOD}
    assert value(samples, REQUESTS_TOTAL, method=OTHER_METHOD, status="405") == len(made_up_methods)
    logged_methods = {line.get("method") for line in server.log_lines()}
    assert set(made_up_methods) <= logged_methods

    declared = {floatToGoString(bucket) for bucket in REQUEST_BUCKETS} | {"+Inf"}
    assert label_values(samples, DURATION_BUCKET, "le") == declared
    assert {"0.001", "0.1"} <= declared  # the 1-100 ms a request of this service takes are resolved


@pytest.mark.slow
def test_every_known_label_value_is_exported_as_zero_before_its_first_event(
    gunicorn: Any, sqlite_url: str, keys_dir: Any
) -> None:
    """The first scrape of a fresh server already has each catalog_* counter's known series, at 0 (so rate()
    and ratios work at once); counting then moves exactly the series of what happened."""
    server = gunicorn(server_env(sqlite_url, keys_dir, WEB_CONCURRENCY="2"))
    first = scrape(server.url)
    known = {
        "catalog_cache_requests_total": ("result", {"hit", "miss", "bypass", "error"}),
        "catalog_auth_failures_total": ("reason", {"missing", "invalid", "forbidden"}),
        "catalog_db_queries_total": ("operation", set(DB_OPERATIONS)),
        "catalog_rate_limited_total": ("client", {"anonymous", "writer", "reader"}),
    }
    for name, (label, values) in known.items():
        assert label_values(first, name, label) == values, name
        assert all(value(first, name, **{label: v}) == 0 for v in values), name
    for gauge in ("catalog_cache_circuit_open", "catalog_api_keys_loaded"):
        assert (gauge, frozenset()) in first, gauge

    assert requests.get(f"{server.url}/api/v1/products", timeout=15).status_code == 401
    after = scrape(server.url)
    assert value(after, "catalog_auth_failures_total", reason="missing") == 1
    assert value(after, "catalog_auth_failures_total", reason="invalid") == 0


def test_the_store_counts_only_declared_operations() -> None:
    """Every `operation` the store counts is one exported from the start (a new query needs declaring)."""
    source = (Path(__file__).resolve().parent.parent / "src" / "catalog" / "db.py").read_text()
    counted = set(re.findall(r'DB_QUERIES\.labels\(operation="([^"]+)"\)', source))
    assert counted == set(DB_OPERATIONS)
    assert source.count("DB_QUERIES.labels(") == len(re.findall(r'DB_QUERIES\.labels\(operation="', source))
