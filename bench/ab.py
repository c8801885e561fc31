#!/usr/bin/env python3
"""Compare two versions of catalog's cached read side by side: is B cheaper than A, and by how much?

Between `make bench` runs the machine drifts by several per cent (the floor's CPU per request moved between
288 and 308 us in runs a quarter of an hour apart), more than most single changes save. This script runs both
versions at once instead: the floor (bench/bare_app.py), catalog from tree A and catalog from tree B are
started together on one Redis and one SQLite database, with bench/run.py's gunicorn settings, and loaded one
after the other in rounds (the order reversed every other round). Each round pairs B with the A measured
beside it, so the machine's drift cancels out of the ratio B/A; the median and the spread of those ratios
are printed, with each server's median requests/s, CPU us/request (gunicorn's processes and Redis, from
/proc), p50 and p99.

A tree is a directory holding catalog's `src/` and `gunicorn.conf.py` (the working tree, a `git worktree`),
or a git revision, checked out for the run into a temporary worktree. Each server imports catalog from its
own tree: PYTHONPATH puts the tree's `src/` ahead of the editable install of the venv, which gunicorn.conf.py
would otherwise import before `--pythonpath` applies.

    .venv-bench/bin/python bench/ab.py HEAD .              # the working tree's changes against HEAD
    .venv-bench/bin/python bench/ab.py HEAD~3 HEAD --rounds 10 --scenario list
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import (  # noqa: E402
    LIST_SIZE,
    ROOT,
    BenchError,
    Context,
    Settings,
    Target,
    catalog_env,
    free_port,
    gunicorn_args,
    load,
    log,
    redis_server,
    running,
    seed_products,
    setup_step,
    start_floor,
    wait_http,
    x_cache,
)

FLOORS = {"get": "floor", "list": "floor-list"}


@contextlib.contextmanager
def source_tree(spec: str, tmp: Path, name: str) -> Iterator[Path]:
    """The directory `spec` names, or a temporary git worktree of the revision it names."""
    path = Path(spec)
    if (path / "src" / "catalog").is_dir():
        yield path.resolve()
        return
    checkout = tmp / f"tree-{name}"
    done = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(checkout), spec],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"{spec!r} is neither a source tree nor a git revision: {done.stderr.strip()}")
    try:
        yield checkout
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)], check=False)


def start_version(ctx: Context, name: str, tree: Path, scenario: str, product_id: str | None) -> Target:
    """catalog from `tree` (cache TTL 60), its cache warmed; creates the products if `product_id` is None."""
    port = free_port()
    env = catalog_env(ctx, port, 60, name)
    env["PYTHONPATH"] = str(tree / "src")
    venv = ctx.catalog_venv
    if product_id is None:
        setup_step("catalog db upgrade", [str(venv / "bin" / "catalog"), "db", "upgrade"], tree, env)
    args = gunicorn_args(port)
    args[args.index("--pythonpath") + 1] = str(tree / "src")
    process = ctx.stack.enter_context(
        running(name, [str(venv / "bin" / "gunicorn"), *args], env, tree, ctx.tmp)
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(process, base + "/livez")
    if product_id is None:
        product_id = seed_products(ctx, base)[0]
    path = f"/api/v1/products/{product_id}" if scenario == "get" else f"/api/v1/products?limit={LIST_SIZE}"
    target = Target(name, base, path, ctx.api_key, "HIT", [process, ctx.redis])
    time.sleep(1)  # the near-cache's invalidation listeners have subscribed
    x_cache(target)
    return target


def measure(target: Target, settings: Settings) -> dict[str, float]:
    """One round (`run.load`: `settings.warmup` seconds unmeasured, then `settings.duration` measured)."""
    load(target, settings, warmup=True)
    data = target.runs[-1]
    if data["errors"]["status"] or target.seen_cache != target.expect_cache:
        raise BenchError(
            f"{target.name}: {data['errors']['status']} non-2xx answers, X-Cache {target.seen_cache}"
        )
    return {
        "rps": data["requests"] / (data["duration_us"] / 1e6),
        "cpu_us": data["server_cpu_s"] / max(data["requests"], 1) * 1e6,
        "p50_ms": data["latency_us"]["p50"] / 1000,
        "p99_ms": data["latency_us"]["p99"] / 1000,
    }


def paired(rounds: dict[str, list[dict[str, float]]], b: str, a: str, key: str) -> list[float]:
    return sorted(x[key] / y[key] for x, y in zip(rounds[b], rounds[a], strict=True))


def report(rounds: dict[str, list[dict[str, float]]], floor: str) -> str:
    lines = [f"{'server':<11} {'req/s':>7} {'CPU us/req':>11} {'p50 ms':>7} {'p99 ms':>7}   (medians)"]
    for name, runs in rounds.items():
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        lines.append(
            f"{name:<11} {medians['rps']:7.0f} {medians['cpu_us']:11.0f} {medians['p50_ms']:7.2f} "
            f"{medians['p99_ms']:7.2f}"
        )
    lines.append("")
    for b, a in (("A", floor), ("B", floor), ("B", "A")):
        for key, label in (("rps", "req/s"), ("cpu_us", "CPU us/request"), ("p99_ms", "p99")):
            ratios = paired(rounds, b, a, key)
            lines.append(
                f"{b}/{a:<10} {label:<15} median {statistics.median(ratios):.3f}  "
                f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", help="version A: a source tree or a git revision")
    parser.add_argument("b", help="version B: a source tree or a git revision")
    parser.add_argument("--scenario", choices=sorted(FLOORS), default="get", help="the cached read (get)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of floor, A and B (8)")
    parser.add_argument("--duration", type=int, default=5, help="seconds measured per server and round (5)")
    parser.add_argument("--catalog-venv", type=Path, default=ROOT / ".venv", help="venv with catalog's deps")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the bare app")
    args = parser.parse_args(argv)
    settings = Settings(args.duration, 16, 2, 1, 1)
    with tempfile.TemporaryDirectory(prefix="catalog-ab-") as directory, contextlib.ExitStack() as stack:
        tmp = Path(directory)
        (tmp / "api-keys").mkdir()
        api_key = secrets.token_hex(16)
        (tmp / "api-keys" / "bench").write_text(api_key + "\n")
        try:
            trees = {
                name: stack.enter_context(source_tree(spec, tmp, name))
                for name, spec in (("A", args.a), ("B", args.b))
            }
            redis_port, redis = stack.enter_context(redis_server(tmp))
            ctx = Context(
                tmp, settings, stack, args.python, args.catalog_venv.resolve(), redis_port, redis, api_key, ""
            )
            floor_name = FLOORS[args.scenario]
            targets = [target for target in start_floor(ctx) if target.name == floor_name]
            for name, tree in trees.items():
                log(f"starting {name} from {tree}")
                product = ctx.product_ids[0] if ctx.product_ids else None
                targets.append(start_version(ctx, name, tree, args.scenario, product))
            rounds: dict[str, list[dict[str, float]]] = {target.name: [] for target in targets}
            for index in range(args.rounds):
                for target in targets if index % 2 == 0 else reversed(targets):
                    rounds[target.name].append(measure(target, settings))
                log(
                    f"round {index + 1}: "
                    + ", ".join(f"{n} {r[-1]['cpu_us']:.0f} us/req" for n, r in rounds.items())
                )
        except BenchError as error:
            log(str(error))
            return 1
    print(
        f"{args.scenario}: {args.rounds} rounds of {args.duration} s each; A = {args.a}, B = {args.b}; "
        f"wrk {settings.threads} threads, {settings.connections} connections\n"
    )
    print(report(rounds, floor_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
