"""The real gunicorn: several workers, graceful SIGTERM, and protocol errors as problem bodies."""

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from tests.conftest import WRITER_KEY, SecretDir, auth, product_body


@pytest.fixture
def server(gunicorn: Any, database_url: str, keys_dir: SecretDir) -> Any:
    return gunicorn({"CATALOG_DATABASE_URL": database_url, "CATALOG_API_KEYS_DIR": str(keys_dir.path)})


def raw_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(payload)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_two_workers_serve_the_whole_api(server: Any) -> None:
    created = requests.post(f"{server.url}/api/v1/products", json=product_body(), headers=auth(), timeout=10)
    assert created.status_code == 201
    location = created.headers["Location"]
    statuses = {
        requests.get(f"{server.url}{location}", headers=auth(), timeout=10).status_code for _ in range(20)
    }
    assert statuses == {200}
    booted = [line for line in server.log_lines() if line["message"] == "catalog app ready"]
    assert len({line["pid"] for line in booted}) == 2


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"GET /livez?q=" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"NOT HTTP\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ],
)
def test_protocol_errors_are_problem_bodies(server: Any, payload: bytes, status: int) -> None:
    head, _, body = raw_exchange(server.port, payload).partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode()
    assert b"Content-Type: application/problem+json" in head
    problem = json.loads(body)
    assert problem["status"] == status and problem["request_id"]
    assert b"aaaa" not in body


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(server: Any) -> None:
    body = json.dumps(product_body()).encode()
    head = (
        f"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nX-Api-Key: {WRITER_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    connection.sendall(head + body[:10])
    time.sleep(0.5)
    signalled = time.monotonic()
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    deadline = time.monotonic() + 10
    refused = False
    while time.monotonic() < deadline and not refused:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            time.sleep(0.1)
        except ConnectionRefusedError:
            refused = True
    assert refused, "the listening socket stayed open after SIGTERM"
    connection.sendall(body[10:])
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    connection.close()
    head_in, _, body_in = answer.partition(b"\r\n\r\n")
    assert head_in.startswith(b"HTTP/1.1 201")
    assert json.loads(body_in)["sku"] == json.loads(body)["sku"]
    stopper.join(40)
    assert server.process.returncode == 0
    assert time.monotonic() - signalled < 30 + 5


def test_a_preloaded_app_gets_fresh_connections_in_each_worker(
    gunicorn: Any, postgresql_url: str, keys_dir: SecretDir, tmp_path: Path
) -> None:
    preloaded = gunicorn(
        {"CATALOG_DATABASE_URL": postgresql_url, "CATALOG_API_KEYS_DIR": str(keys_dir.path)}, ("--preload",)
    )
    requests.get(f"{preloaded.url}/readyz", timeout=10)
    answers = [
        requests.post(f"{preloaded.url}/api/v1/products", json=product_body(), headers=auth(), timeout=10)
        for _ in range(20)
    ]
    assert {a.status_code for a in answers} == {201}
    assert all(line["level"] != "ERROR" for line in preloaded.log_lines())


def test_an_embedded_sqlite_database_gets_its_schema_at_start(
    gunicorn: Any, tmp_path: Path, keys_dir: SecretDir
) -> None:
    fresh = gunicorn(
        {
            "CATALOG_DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}",
            "CATALOG_API_KEYS_DIR": str(keys_dir.path),
        }
    )
    response = requests.post(f"{fresh.url}/api/v1/products", json=product_body(), headers=auth(), timeout=10)
    assert response.status_code == 201
