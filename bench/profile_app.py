#!/usr/bin/env python3
"""Where a request's time goes inside the app: CPU microseconds per request and a cProfile summary.

Calls the WSGI app directly (no gunicorn, no sockets, one thread) with a prepared environ, so the figures
are the Python cost of catalog's own request path and of the bare Flask app beside it; gunicorn's part is
the same for both and measured by bench/run.py. Starts a redis-server of its own on a free port.

    .venv/bin/python bench/profile_app.py [--requests 5000] [--rounds 5] [--profile SCENARIO]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import PRODUCT, redis_server  # noqa: E402


def environ(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> dict[str, Any]:
    """A WSGI environ as gunicorn builds it for this request."""
    route, _, query = path.partition("?")
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": route,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "RAW_URI": path,
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
        "CONTENT_LENGTH": str(len(body)) if body else "",
    }
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        if key == "CONTENT_TYPE":
            env["CONTENT_TYPE"] = value
        else:
            env[f"HTTP_{key}"] = value
    return env


def caller(app: Callable[..., Any], make_environ: Callable[[], dict[str, Any]]) -> Callable[[], int]:
    """One request through the app, its body consumed; returns the status code."""
    status: list[str] = []

    def start_response(line: str, _headers: Any, _exc: Any = None) -> None:
        status.append(line)

    def call() -> int:
        status.clear()
        body = app(make_environ(), start_response)
        for _chunk in body:
            pass
        if hasattr(body, "close"):
            body.close()
        return int(status[0].split()[0])

    return call


def measure(call: Callable[[], int], count: int, expect: int) -> float:
    """CPU microseconds per call after a warm-up."""
    for _ in range(200):
        status = call()
        assert status == expect, status
    started = time.process_time()
    for _ in range(count):
        call()
    return (time.process_time() - started) / count * 1e6


@contextlib.contextmanager
def catalog_app(tmp: Path, redis_port: int) -> Iterator[tuple[Any, str, str]]:
    """catalog's app (Redis cache and limits on, access log to /dev/null), its API key and a product id."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "metrics")
    (tmp / "metrics").mkdir()
    (tmp / "keys").mkdir()
    api_key = secrets.token_hex(16)
    (tmp / "keys" / "bench").write_text(api_key)
    from catalog import create_app
    from catalog.cli import upgrade
    from catalog.config import Settings

    settings = Settings(
        database_url=f"sqlite:///{tmp / 'catalog.db'}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        api_keys_dir=str(tmp / "keys"),
        rate_limit="1000000/second",
    )
    upgrade(settings)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        app = create_app(settings)
        client = app.test_client()
        ids = []
        for index in range(20):  # a full first page
            body = {**PRODUCT, "sku": f"BENCH-{index}"}
            created = client.post("/api/v1/products", json=body, headers={"X-Api-Key": api_key})
            assert created.status_code == 201, created.get_data()
            ids.append(created.get_json()["id"])
        time.sleep(0.5)  # the invalidation listener subscribes
        try:
            yield app, api_key, ids[0]
        finally:
            app.extensions["catalog.background"].stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5000, help="per scenario and round")
    parser.add_argument("--rounds", type=int, default=5, help="the least of these rounds is shown")
    parser.add_argument("--profile", help="profile one scenario and print the top functions")
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative)")
    parser.add_argument("--top", type=int, default=35)
    args = parser.parse_args()
    import bare_app

    with tempfile.TemporaryDirectory(prefix="catalog-profile-") as directory:
        tmp = Path(directory)
        with redis_server(tmp) as (redis_port, _redis), catalog_app(tmp, redis_port) as (app, key, product):
            headers = {"X-Api-Key": key, "Accept": "application/json"}
            patch_body = json.dumps({"price_cents": 1300}).encode()
            scenarios: dict[str, tuple[Any, Callable[[], dict[str, Any]], int]] = {
                "bare": (bare_app.app, lambda: environ("GET", "/api/v1/products/bench", {}), 200),
                "bare-list": (bare_app.app, lambda: environ("GET", "/api/v1/products?limit=20", {}), 200),
                "livez": (app, lambda: environ("GET", "/livez", {}), 200),
                "get": (app, lambda: environ("GET", f"/api/v1/products/{product}", headers), 200),
                "list": (app, lambda: environ("GET", "/api/v1/products?limit=20", headers), 200),
                "patch": (
                    app,
                    lambda: environ(
                        "PATCH",
                        f"/api/v1/products/{product}",
                        {**headers, "Content-Type": "application/merge-patch+json"},
                        patch_body,
                    ),
                    200,
                ),
            }
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                if args.profile:
                    wsgi, make, expect = scenarios[args.profile]
                    call = caller(wsgi, make)
                    measure(call, 200, expect)
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(args.requests):
                        call()
                    profiler.disable()
                    out = io.StringIO()
                    pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
                    print(out.getvalue(), file=sys.stderr)
                    return 0
                # Rounds interleaved, the least of each scenario kept: other load only ever adds time.
                figures: dict[str, float] = {}
                for _round in range(args.rounds):
                    for name, (wsgi, make, expect) in scenarios.items():
                        count = args.requests // (5 if name == "patch" else 1)
                        value = measure(caller(wsgi, make), count, expect)
                        figures[name] = min(figures.get(name, value), value)
    for name, value in figures.items():
        print(f"{name:<10} {value:8.1f} CPU us/request", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
