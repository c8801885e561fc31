"""The `catalog` command: migrations safe to run from many replicas at once, and the demo seed."""

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from tests.conftest import SecretDir, free_port


def run_cli(*arguments: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "CATALOG_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "catalog.cli", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def empty_postgres_schema(postgresql_url: str) -> Iterator[str]:
    """A schema with nothing in it yet, on the test PostgreSQL."""
    base = postgresql_url.split("?")[0]
    schema = f"catalog_cli_{uuid.uuid4().hex[:8]}"
    engine = create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{base}?options=-csearch_path%3D{schema}"
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def test_replicas_migrating_at_once_all_succeed(empty_postgres_schema: str) -> None:
    env = {"PATH": os.environ["PATH"], "CATALOG_DATABASE_URL": empty_postgres_schema}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "catalog.cli", "db", "upgrade"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0, 0], outputs
    engine = create_engine(empty_postgres_schema.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0002"]
        assert connection.execute(text("SELECT count(*) FROM products")).scalar_one() == 0
    engine.dispose()


def test_upgrade_is_idempotent_and_seed_fills_an_empty_catalog_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    for _ in range(2):
        assert run_cli("db", "upgrade", database_url=url).returncode == 0
    first = run_cli("db", "seed", database_url=url)
    second = run_cli("db", "seed", database_url=url)
    assert first.returncode == second.returncode == 0
    assert '"count": 36' in first.stdout and "seed skipped" in second.stdout
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM products")).scalar_one() == 36
        assert connection.execute(text("SELECT count(DISTINCT sku) FROM products")).scalar_one() == 36
    engine.dispose()


def test_the_cli_writes_no_metric_files(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "CATALOG_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    for command in (["db", "upgrade"], ["db", "seed"]):
        result = subprocess.run(
            [sys.executable, "-m", "catalog.cli", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert list(metrics_dir.iterdir()) == []


def run_dev_keys(keys_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "CATALOG_API_KEYS_DIR": str(keys_dir)}
    return subprocess.run(
        [sys.executable, "-m", "catalog.cli", "dev-keys"], env=env, capture_output=True, text=True, timeout=60
    )


def listing(directory: Path) -> dict[str, str]:
    """Every entry below `directory` (links as their target) with its content: what a run may not change."""
    return {
        str(path.relative_to(directory)): os.readlink(path) if path.is_symlink() else path.read_text()
        for path in sorted(directory.rglob("*"))
        if path.is_symlink() or path.is_file()
    }


@pytest.mark.parametrize("exists", [False, True], ids=["new directory", "empty directory"])
def test_dev_keys_makes_its_key_in_a_new_or_empty_directory_and_keeps_it(
    tmp_path: Path, exists: bool
) -> None:
    keys_dir = tmp_path / "api-keys"
    if exists:
        keys_dir.mkdir()
    first = run_dev_keys(keys_dir)
    assert first.returncode == 0, first.stderr
    key = (keys_dir / "dev").read_text()
    assert run_dev_keys(keys_dir).returncode == 0
    assert (keys_dir / "dev").read_text() == key
    assert [path.name for path in keys_dir.iterdir() if not path.name.startswith(".")] == ["dev"]
    assert f"{keys_dir / 'dev'}" in first.stderr


def test_dev_keys_adds_nothing_to_a_mounted_secret_and_names_the_key_to_use(tmp_path: Path) -> None:
    secret = SecretDir(tmp_path / "api-keys")
    secret.write({"team-a": "team-a-key-0123456789", "hashed": "sha256:" + "0" * 64})
    before = listing(secret.path)
    result = run_dev_keys(secret.path)
    assert result.returncode == 0, result.stderr
    assert listing(secret.path) == before
    assert f"{secret.path / 'team-a'}" in result.stderr and f"{secret.path / 'hashed'}" in result.stderr
    [curl_line] = [line for line in result.stderr.splitlines() if line.startswith("Try: ")]
    assert f"$(cat {secret.path / 'team-a'})" in curl_line
    assert "team-a-key-0123456789" not in result.stderr


def test_dev_keys_adds_nothing_beside_keys_it_did_not_make(tmp_path: Path) -> None:
    keys_dir = tmp_path / "api-keys"
    keys_dir.mkdir()
    (keys_dir / "ops").write_text(json.dumps({"sha256": "1" * 64, "scopes": ["read"]}))
    result = run_dev_keys(keys_dir)
    assert result.returncode == 0, result.stderr
    assert listing(keys_dir) == {"ops": (keys_dir / "ops").read_text()}
    assert f"{keys_dir / 'ops'}" in result.stderr
    assert "None of them holds a bare key" in result.stderr and "Try: " not in result.stderr


def _cli_lines(output: str) -> list[dict[str, Any]]:
    """The command's own log lines (every line must be JSON; alembic's are left out)."""
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    return [r for r in records if r["logger"] == "catalog.cli"]


def test_upgrade_waits_for_a_postgresql_that_comes_up_late(private_postgres: Any) -> None:
    """`db upgrade --wait` retries with growing pauses, one JSON line per failed attempt, until the server
    (started only after the command has failed twice) answers; then it migrates."""
    server = private_postgres()
    env = {"PATH": os.environ["PATH"], "CATALOG_DATABASE_URL": server.url()}
    lines = []
    with subprocess.Popen(
        [sys.executable, "-m", "catalog.cli", "db", "upgrade", "--wait", "90"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        assert process.stdout is not None
        try:
            for line in process.stdout:  # the server stays down until two attempts have failed
                lines.append(line)
                if sum("not reachable yet" in seen for seen in lines) == 2:
                    break
            server.start()
            lines += process.stdout.readlines()
            assert process.wait(timeout=120) == 0, "".join(lines)
        finally:
            process.kill()
    records = _cli_lines("".join(lines))
    failed = [r for r in records if r["message"] == "database not reachable yet"]
    assert len(failed) >= 2
    assert [r["attempt"] for r in failed] == list(range(1, len(failed) + 1))
    assert all(r["level"] == "WARNING" and r["error_type"] == "OperationalError" for r in failed)
    assert all("refused" in r["error"] or "connect" in r["error"] for r in failed), failed
    pauses = [r["retry_in_seconds"] for r in failed]
    assert pauses == sorted(pauses) and pauses[1] > pauses[0], "the pause grows (backoff)"
    assert {"attempt": len(failed) + 1}.items() <= next(
        r for r in records if r["message"] == "database reachable"
    ).items()
    assert records[-1]["message"] == "database schema is up to date"
    assert server.psql("-At", "-c", "SELECT version_num FROM alembic_version").split() == ["0002"]


def test_upgrade_gives_up_after_its_wait_with_one_line_per_attempt(tmp_path: Path) -> None:
    url = f"postgresql://catalog@127.0.0.1:{free_port()}/catalog"  # nothing listens there
    result = run_cli("db", "upgrade", "--wait", "1.5", database_url=url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    records = _cli_lines(result.stdout)
    *retries, last = records
    assert len(retries) >= 2
    assert all(r["message"] == "database not reachable yet" for r in retries)
    assert last["level"] == "ERROR"
    assert last["message"] == "database not reachable: giving up"
    assert last["error_type"] == "OperationalError"
    assert last["attempt"] == len(retries) + 1
    assert last["wait_seconds"] == 1.5


def test_upgrade_without_wait_tries_once() -> None:
    url = f"postgresql://catalog@127.0.0.1:{free_port()}/catalog"
    result = run_cli("db", "upgrade", database_url=url)
    assert result.returncode == 1
    (record,) = _cli_lines(result.stdout)
    assert (record["message"], record["attempt"]) == ("database not reachable: giving up", 1)


def test_upgrade_refuses_a_bad_wait() -> None:
    result = run_cli("db", "upgrade", "--wait", "soon", database_url="sqlite://")
    assert result.returncode == 2
    assert "not a number of seconds" in result.stderr
