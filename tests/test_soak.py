"""The soak under faults (bench/soak.py): its checks catch what they exist for (stale reads by class, reads
of versions nobody wrote, 503s while PostgreSQL was up, connection errors no fault explains), and the CI
version, 60 s at half the measured capacity with every kind of fault, runs clean."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench.soak import (
    DELETED,
    FAULT_KINDS,
    Fault,
    Product,
    Read,
    Record,
    Write,
    check_errors,
    check_reads,
)
from tests.conftest import ROOT
from tests.tools import require_tool, unavailable

# --- the checks, on records made by hand ----------------------------------------------------------------


def product_with_two_versions(
    record: Record, redis_outage: tuple[float, float, str | None] | None = None
) -> Product:
    """A product written v1 (answered at 1.0) and v2 (sent 1.9, answered at 2.0), both through pod-a#1."""
    product = Product("P1", "SKU-1", attempts=[1.9])
    product.writes = [Write(1, 0.9, 1.0, "pod-a", 1, "one"), Write(2, 1.9, 2.0, "pod-a", 1, "two")]
    record.products[product.id] = product
    if redis_outage:
        record.redis_outages.append(redis_outage)
    return product


def read(
    version: int, started: float, master: str = "pod-b", incarnation: int = 1, name: str = "one"
) -> Read:
    return Read("P1", version, started, started + 0.01, master, incarnation, name)


def test_a_read_that_starts_after_the_write_answered_on_the_writers_master_must_see_it() -> None:
    record = Record()
    product_with_two_versions(record)
    record.reads = [
        read(1, 1.99, master="pod-a"),  # started before v2 answered: never stale
        read(2, 2.001, master="pod-a", name="two"),
        read(1, 2.001, master="pod-a"),  # 1 ms after: stale on the writer's master
    ]
    worst = check_reads(record)
    assert record.violation_kinds == {"stale-writer": 1}, record.violations
    assert worst["writer"] == pytest.approx(0.001)


def test_elsewhere_an_old_version_may_be_read_up_to_100_ms_after_the_write_answered() -> None:
    record = Record()
    product_with_two_versions(record)
    record.reads = [
        read(1, 2.09),  # another pod, 90 ms after
        read(1, 2.05, master="pod-a", incarnation=2),  # the writer's master restarted: another process
        read(1, 2.25),  # 250 ms after: too late
    ]
    worst = check_reads(record)
    assert record.violation_kinds == {"stale-other-100ms": 1}, record.violations
    assert worst["other-100ms"] == pytest.approx(0.25)


def test_after_an_invalidation_redis_could_not_take_the_bound_is_5_s_from_redis_reachable_again() -> None:
    record = Record()
    product_with_two_versions(record, redis_outage=(1.5, 3.0, None))  # v2 written while Redis was down
    record.reads = [read(1, 7.5), read(1, 8.2)]  # 4.5 s and 5.2 s after Redis came back
    worst = check_reads(record)
    assert record.violation_kinds == {"stale-other-outage-5s": 1}, record.violations
    assert worst["other-outage-5s"] == pytest.approx(5.2)


def test_when_only_the_writer_was_cut_off_from_redis_the_bound_is_5_s_from_the_write() -> None:
    record = Record()
    product_with_two_versions(record, redis_outage=(1.5, 6.0, "pod-a"))  # pod-a, the writer, cut off
    record.reads = [read(1, 6.9), read(1, 7.2)]  # 4.9 s and 5.2 s after v2 answered
    worst = check_reads(record)
    assert record.violation_kinds == {"stale-other-outage-5s": 1}, record.violations
    assert worst["other-outage-5s"] == pytest.approx(5.2)


def test_another_pod_cut_off_from_redis_leaves_the_writer_bound_to_100_ms() -> None:
    record = Record()
    product_with_two_versions(record, redis_outage=(1.5, 6.0, "pod-b"))
    record.reads = [read(1, 2.3, master="pod-c")]
    check_reads(record)
    assert record.violation_kinds == {"stale-other-100ms": 1}, record.violations


def test_a_deleted_product_read_elsewhere_past_100_ms_is_stale_and_a_404_before_any_delete_too() -> None:
    record = Record()
    product = product_with_two_versions(record)
    product.writes.append(Write(DELETED, 2.9, 3.0, "pod-a", 1, None))
    record.reads = [read(DELETED, 3.01, master="pod-a"), read(2, 3.05, name="two"), read(2, 3.2, name="two")]
    record.reads.append(read(0, 1.5))  # a 404 half a second after the product was created: lost
    check_reads(record)
    assert record.violation_kinds == {"stale-other-100ms": 2}, record.violations


def test_a_version_nobody_wrote_or_another_versions_content_is_a_violation() -> None:
    record = Record()
    product_with_two_versions(record)
    record.reads = [read(3, 2.5, name="three"), read(2, 2.5, name="one")]
    check_reads(record)
    assert record.violation_kinds == {"phantom": 1, "content": 1}, record.violations


def test_503s_only_while_postgres_was_down_and_connection_errors_only_where_a_fault_explains_them() -> None:
    record = Record()
    record.postgres_down.append((10.0, 12.0))
    record.faults = [
        Fault("postgres-restart", 10.0, 12.0),
        Fault("worker-kill", 20.0, 20.0, "pod-a"),
        Fault("master-restart", 30.0, 35.0, "pod-b"),
    ]
    record.unavailable = [
        ("GET", "pod-a", 9.9, 10.1),  # sent before the stop, answered during it
        ("PUT", "pod-b", 12.5, 12.6),  # within the grace after `pg_ctl start` returned
        ("GET", "pod-a", 14.0, 14.1),  # PostgreSQL was up
    ]
    record.conn_errors = [
        ("reset", "pod-a", 20.3),  # the killed worker's request
        ("reset", "pod-b", 20.3),  # nothing happened to pod-b then
        ("refused", "pod-b", 31.0),  # pod-b restarting
        ("reset-idle", "pod-a", 50.0),  # an idle keep-alive connection closed as the request went out
        ("timeout", "pod-b", 33.0),  # a restart refuses or resets, it does not hang
    ]
    check_errors(record)
    assert record.violation_kinds == {"503": 1, "connection": 2}, record.violations


# --- the CI soak ----------------------------------------------------------------------------------------


def require_private_postgres() -> None:
    """bench/soak.py starts its own PostgreSQL: the server binaries, and runuser when running as root."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and shutil.which("initdb") is None:
        unavailable("the soak needs PostgreSQL's server binaries (/usr/lib/postgresql/<major>/bin)")
    if os.geteuid() == 0:
        require_tool("runuser")


@pytest.mark.slow
def test_the_ci_soak_runs_60_s_clean_through_every_kind_of_fault() -> None:
    """`bench/soak.py --seconds 60` with a fault every 2-3 s (each kind once, in random order): no 5xx but
    503s while PostgreSQL was restarting, no lost write, no stale read past the promise, nothing over 2 s."""
    require_tool("redis-server")
    require_private_postgres()
    began = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "soak.py"),
            *("--seconds", "60", "--gap", "2", "3", "--outage", "2", "3", "--probe-seconds", "3", "--json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    print(json.dumps({key: value for key, value in report.items() if key != "violations"}, indent=1))
    print(f"the CI soak took {time.monotonic() - began:.0f} s")
    assert report["clean"], report["violations"][:20]
    assert result.returncode == 0
    assert set(report["faults"]) == set(FAULT_KINDS), report["faults"]
    assert report["seconds"] >= 60
    # Under load throughout: at least a third of the measured capacity, every read and write checked.
    assert report["loaded_rps"] >= report["capacity_rps"] / 3, report
    assert (
        report["reads_checked"] > 10 * report["seconds"] and report["writes_answered"] > 2 * report["seconds"]
    )
