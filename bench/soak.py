#!/usr/bin/env python3
"""Soak under faults: catalog under steady load while its dependencies and processes fail, answers checked.

It starts a private PostgreSQL (initdb + pg_ctl, as the `postgres` user when run as root), a redis-server, a
kubelet-style API-keys directory and two gunicorn masters (two "pods": 2 workers x 4 threads each) on free
loopback ports; measures the capacity of that set-up with its own load generator (closed loop), then loads it
at about half of that (open loop, paced) with reads and writes through both masters, and every `--gap`
seconds injects one fault:

  redis-kill       redis-server SIGKILLed, down for a few seconds, started again (empty)
  redis-pause      redis-server SIGSTOPped for a few seconds (connections hang), then SIGCONT
  redis-restart    redis-server SIGKILLed and started again at once (empty)
  redis-partition  one master's path to Redis cut for a few seconds (each master reaches Redis through a TCP
                   proxy of its own, a child process; cut = every connection and every new one reset)
  postgres-restart PostgreSQL stopped at once (`pg_ctl stop -m immediate`: every backend dies) and started
  key-rotation     a new key added to the Secret, the clients moved to it once it works, the old key removed
  worker-kill      one gunicorn worker SIGKILLed (its master starts a new one)
  master-restart   one gunicorn master SIGTERMed (graceful) and started again on the same port; as the
                   chart's preStop sleep and readiness probe make a Service do, the clients send its
                   requests to the other master from PRE_STOP_SECONDS before the SIGTERM until its /readyz
                   answers 200 (gunicorn listens before its workers are ready: a request sent then waits)

Every answer is checked (status, body, ETag, timing), and at the end the database itself. It fails on:

- a 5xx other than 503, a 503 while PostgreSQL was up (plus POSTGRES_GRACE_SECONDS after it came back),
  any other unexpected status (401 during a rotation, 429, ...);
- a lost write: every write answered 2xx is in the database afterwards with the answered version (or a later
  one), with the answered content when the version is the same; a 204-answered delete is gone; no sku twice;
- a stale read past the consistency promise (CONTRACT, Caching): through the writer's master (same
  incarnation) a read that starts after the write answered shows that version or later; elsewhere at most
  100 ms later while Redis was reachable; when the write met a Redis outage, at most 5 s after the write
  answered (only the writer was cut off) or after Redis was reachable again (nobody could reach it); and,
  5 s after the load stops, every product reads the database's version through both masters;
- a read of a version no write could have made, or with another version's content;
- a request slower than 2 s;
- a connection error (refused, reset, timeout) not explained by a worker killed or a master restarting;
- an ERROR line in the servers' logs, but gunicorn's own about a worker the soak killed.

Writes that got a 503, a reset or a timeout are "unknown": they may or may not have committed, so they
are never required and never make a read stale; an unknown create is retried with its Idempotency-Key.
Times are the client's own (time.monotonic): a read "starts" when its request is sent and a write
"answered" when its response was read, so a measured stale window is never longer than the real one.

    python bench/soak.py --seconds 300            # `make soak`
    python bench/soak.py --seconds 60 --gap 2 3 --outage 2 3 --probe-seconds 3   # CI (tests/test_soak.py)

Prints a report (requests, faults by kind, errors by kind, the worst stale window per class, the slowest
request) and exits 1 when anything above was found (`--json` prints the report as JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WORKERS, THREADS = 2, 4
SLOW_SECONDS = 2.0
OTHER_POD_SECONDS = 0.1  # the contract: other pods that can reach Redis drop the old value within 100 ms
OUTAGE_SECONDS = 5.0  # ... and within 5 s of an invalidation Redis could not take
# After Redis is back, a pod's circuit breaker may stay open this long (3 s + a probe), so an invalidation
# of a write answered this soon after an outage may still be one Redis could not take.
BREAKER_SECONDS = 3.5
# 503s are allowed while PostgreSQL is down, and this long after `pg_ctl start -w` returned (pooled
# connections the restart killed are found dead by the pool's pre-ping, or by the statement, once each).
POSTGRES_GRACE_SECONDS = 1.0
# A connection reset within this long after a worker was SIGKILLed is that worker's in-flight request.
KILL_GRACE_SECONDS = 1.0
# gunicorn closes a keep-alive connection idle for 5 s (gunicorn.conf.py): a request sent on one idle
# about that long may cross the server's close; any client sees that as a reset.
IDLE_RACE_SECONDS = 4.5
DELETED = 1 << 30  # the "version" of a deleted product
PRODUCTS_PER_WRITER = 12
FAULT_KINDS = (
    "redis-kill",
    "redis-pause",
    "redis-restart",
    "redis-partition",
    "postgres-restart",
    "key-rotation",
    "worker-kill",
    "master-restart",
)
# As the chart's preStop sleep does, a master leaves the Service's endpoints this long before its SIGTERM.
PRE_STOP_SECONDS = 0.5


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def now() -> float:
    return time.monotonic()


# --- the servers ---------------------------------------------------------------------------------------


class Postgres:
    """A private PostgreSQL on a free port, its socket in its own directory, stopped and started at will."""

    def __init__(self, root: Path) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
        found = shutil.which("initdb")
        if not versions and not found:
            raise SystemExit("soak: PostgreSQL server binaries not found (/usr/lib/postgresql/<major>/bin)")
        self.bin = versions[-1].parent if versions else Path(str(found)).parent
        self.root = root / "postgres"
        self.root.mkdir()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def _run(self, tool: str, *arguments: str) -> None:
        command = [str(self.bin / tool), *arguments]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=self.root, timeout=120, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed:\n{result.stdout}{result.stderr}")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def start(self) -> None:
        # fsync=off: WAL is still written to the kernel before a commit answers, so a crash of PostgreSQL
        # (`pg_ctl stop -m immediate`, the fault here) loses no committed write; only the disk's flush
        # latency, which on a shared machine stalled commits for seconds and is nothing catalog can change,
        # stays out of the measurement.
        options = (
            f"-c listen_addresses={HOST} -p {self.port} -k {self.root} -c max_connections=200 -c fsync=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


class Redis:
    """A redis-server on a free port that can be killed, paused and started again (empty)."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("soak: redis-server is not on PATH")
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.root), "--loglevel", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = now() + 10
        while now() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        assert self.process
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process
        self.process.send_signal(signal.SIGCONT)


class Proxy:
    """A TCP proxy between one master and Redis, in a child process of its own (`soak.py proxy PORT TARGET`)
    so that forwarding does not compete with the load generator for this interpreter; SIGUSR1 cuts the
    path, SIGUSR2 restores it."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, __file__, "proxy", str(self.port), str(target_port)])
        deadline = now() + 10
        while now() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1):
                return
            time.sleep(0.02)
        raise RuntimeError("the Redis proxy did not start")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def cut(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    def restore(self) -> None:
        self.process.send_signal(signal.SIGUSR2)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def run_proxy(port: int, target: int) -> None:
    """The proxy's body: forward 127.0.0.1:port to 127.0.0.1:target, two threads per connection."""
    lock = threading.Lock()
    connections: list[socket.socket] = []
    state = {"cut": False}

    def reset(connection: socket.socket) -> None:
        with contextlib.suppress(OSError):  # RST, not FIN: the peer's next call fails at once
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            connection.close()

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        reset(source)
        reset(sink)

    def switch(cut: bool) -> None:
        with lock:
            state["cut"] = cut
            dropped, connections[:] = list(connections), []
        if cut:
            for connection in dropped:
                reset(connection)

    signal.signal(signal.SIGUSR1, lambda *_: switch(True))
    signal.signal(signal.SIGUSR2, lambda *_: switch(False))
    listener = socket.create_server((HOST, port))
    while True:
        try:
            client, _address = listener.accept()
        except InterruptedError:
            continue
        if state["cut"]:
            reset(client)
            continue
        try:
            upstream = socket.create_connection((HOST, target), timeout=1)
        except OSError:
            reset(client)
            continue
        upstream.settimeout(None)
        with lock:
            connections.extend((client, upstream))
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


class SecretDir:
    """An API-keys directory laid out and updated as the kubelet does (`..data` symlink swap)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()

    def write(self, entries: dict[str, str]) -> None:
        stamp = datetime.now(UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
        (self.path / stamp).mkdir()
        for name, content in entries.items():
            (self.path / stamp / name).write_text(content)
        data = self.path / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        os.symlink(stamp, self.path / "..data_tmp")
        os.rename(self.path / "..data_tmp", data)
        for name in entries:
            if not (self.path / name).is_symlink():
                os.symlink(f"..data/{name}", self.path / name)
        for link in self.path.iterdir():
            if not link.name.startswith(".") and link.name not in entries:
                link.unlink()
        if old:
            shutil.rmtree(self.path / old)


class Master:
    """One gunicorn master ("pod") on a fixed port; `incarnation` counts its starts."""

    def __init__(self, name: str, root: Path, env: dict[str, str], proxy: Proxy) -> None:
        self.name = name
        self.port = free_port()
        self.root = root
        self.proxy = proxy  # this master's path to Redis
        self.env = {**env, "PORT": str(self.port), "CATALOG_REDIS_URL": proxy.url}
        self.incarnation = 0
        self.ready = False  # in the Service's endpoints: started and /readyz answered 200
        self.process: subprocess.Popen[bytes] | None = None
        self.log_paths: list[Path] = []

    def start(self) -> None:
        metrics = self.root / f"metrics-{self.name}"
        shutil.rmtree(metrics, ignore_errors=True)
        metrics.mkdir()
        self.incarnation += 1
        log_path = self.root / f"gunicorn-{self.name}-{self.incarnation}.log"
        self.log_paths.append(log_path)
        with log_path.open("wb") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-c",
                    str(ROOT / "gunicorn.conf.py"),
                    "--bind",
                    f"{HOST}:{self.port}",
                ],
                cwd=self.root,
                env={**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = now() + 60
        while now() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn {self.name} exited:\n{log_path.read_text()[-3000:]}")
            if log_path.read_text(errors="replace").count('"catalog app ready"') >= WORKERS:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    connection = http.client.HTTPConnection(HOST, self.port, timeout=2)
                    connection.request("GET", "/readyz")
                    if connection.getresponse().status == 200:
                        connection.close()
                        self.ready = True
                        return
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn {self.name} did not become ready")

    def stop(self, timeout: float = 40) -> None:
        self.ready = False
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def worker_pids(self) -> list[int]:
        assert self.process
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    pids.append(int(stat.parent.name))
        return pids

    def error_lines(self, killed: list[int]) -> list[str]:
        """Log lines at ERROR or worse (unhandled exceptions, crashed workers), but gunicorn's word on the
        workers the soak killed."""
        expected = {f"Worker (pid:{pid}) was sent SIGKILL!" for pid in killed}
        found = []
        for path in self.log_paths:
            for line in path.read_text(errors="replace").splitlines():
                if not ('"level": "ERROR"' in line or '"level": "CRITICAL"' in line):
                    continue
                if not any(message in line for message in expected):
                    found.append(line[:400])
        return found


# --- what the load saw ----------------------------------------------------------------------------------


@dataclass
class Write:
    """A write answered 2xx: the version it made, when it was sent and answered, through which master."""

    version: int
    sent: float
    answered: float
    master: str
    incarnation: int
    name: str | None  # the product's name at that version (None for a delete)


@dataclass
class Product:
    id: str
    sku: str
    writes: list[Write] = field(default_factory=list)
    attempts: list[float] = field(default_factory=list)  # when each update or delete was sent
    delete_sent: float | None = None


@dataclass
class Read:
    product: str
    version: int  # 0 = 404, DELETED = 404 after a delete was sent
    started: float
    ended: float
    master: str
    incarnation: int
    name: str | None


@dataclass
class Fault:
    kind: str
    started: float
    ended: float
    master: str | None = None


class Record:
    """Everything the load generator and the fault injector observed (thread-safe appends)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.products: dict[str, Product] = {}
        self.reads: list[Read] = []
        self.statuses: Counter[str] = Counter()
        self.requests = 0
        self.violations: list[str] = []
        self.violation_kinds: Counter[str] = Counter()
        self.conn_errors: list[tuple[str, str, float]] = []  # kind, master, when
        self.unavailable: list[tuple[str, str, float, float]] = []  # method, master, sent, answered (503s)
        self.killed: list[int] = []  # worker pids the soak SIGKILLed
        self.slowest = (0.0, "")
        self.slow: list[str] = []
        self.faults: list[Fault] = []
        # Redis unreachable: (start, end, None) for every master, (start, end, master) for one (a partition)
        self.redis_outages: list[tuple[float, float, str | None]] = []
        self.postgres_down: list[tuple[float, float]] = []
        self.reconnects = 0
        self.rerouted = 0
        self.began = now()  # times in messages and the fault timeline count from here

    def violation(self, kind: str, detail: str) -> None:
        with self.lock:
            self.violation_kinds[kind] += 1
            if len(self.violations) < 200:
                self.violations.append(f"{kind}: {detail}")


# --- the load -------------------------------------------------------------------------------------------


class ConnectionFailed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Client:
    """One keep-alive connection to one master (http.client); reconnects when the server closed it idle."""

    def __init__(self, master: Master, record: Record, keys: dict[str, str]) -> None:
        self.master = master
        self.record = record
        self.keys = keys  # {"key": current key}, swapped by the rotation
        self.connection: http.client.HTTPConnection | None = None
        self.used = 0.0  # when the connection last finished a request
        self.fallback: Client | None = None  # the other master's client

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.connection is not None and self.connection.sock is not None:
            readable, _, _ = select.select([self.connection.sock], [], [], 0)
            if readable:  # closed by the server while idle (EOF), as keep-alive clients expect
                self.close()
                with self.record.lock:
                    self.record.reconnects += 1
        if self.connection is None:
            self.connection = http.client.HTTPConnection(HOST, self.master.port, timeout=10)
        return self.connection

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPResponse, bytes, float, float, str, int]:
        """(status, response, body, sent, answered, master, incarnation) or ConnectionFailed(kind). While
        this client's master is not ready (restarting), through the other master, as a Service routes."""
        if not self.master.ready and self.fallback is not None and self.fallback.master.ready:
            with self.record.lock:
                self.record.rerouted += 1
            return self.fallback.call(method, path, body, headers)
        all_headers = {"X-Api-Key": self.keys["key"], **(headers or {})}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        incarnation = self.master.incarnation
        connection = self._connection()
        reused_idle = connection.sock is not None and now() - self.used > IDLE_RACE_SECONDS
        sent = now()
        try:
            connection.request(method, path, payload, all_headers)
            response = connection.getresponse()
            data = response.read()
        except TimeoutError:
            kind = "timeout"
        except ConnectionRefusedError:
            kind = "refused"
        except (ConnectionError, http.client.HTTPException, OSError):
            kind = "reset"
        else:
            answered = self.used = now()
            self._account(method, path, response.status, sent, answered)
            if response.will_close:
                self.close()
            return response.status, response, data, sent, answered, self.master.name, incarnation
        self.close()
        answered = now()
        if kind == "reset" and reused_idle:
            kind = "reset-idle"  # gunicorn closed the idle keep-alive connection as the request went out
        with self.record.lock:
            self.record.requests += 1
            self.record.conn_errors.append((kind, self.master.name, answered))
        if answered - sent > SLOW_SECONDS and kind != "refused":
            self._slow(method, path, kind, sent, answered)
        raise ConnectionFailed(kind)

    def _account(self, method: str, path: str, status: int, sent: float, answered: float) -> None:
        record = self.record
        with record.lock:
            record.requests += 1
            record.statuses[f"{method} {status}"] += 1
            if answered - sent > record.slowest[0]:
                record.slowest = (answered - sent, f"{method} {path} {status} on {self.master.name}")
        if answered - sent > SLOW_SECONDS:
            self._slow(method, path, str(status), sent, answered)
        if status == 503:
            with record.lock:
                record.unavailable.append((method, self.master.name, sent, answered))
        elif status >= 500:
            record.violation("5xx", f"{method} {path} answered {status} on {self.master.name}")

    def _slow(self, method: str, path: str, outcome: str, sent: float, answered: float) -> None:
        self.record.violation(
            "slow",
            f"{method} {path} -> {outcome} on {self.master.name} took {answered - sent:.2f} s "
            f"(sent at +{sent - self.record.began:.1f} s)",
        )


def product_body(sku: str) -> dict[str, Any]:
    return {
        "sku": sku,
        "name": f"soak {uuid.uuid4().hex[:12]}",
        "description": "made by bench/soak.py",
        "price_cents": random.randint(0, 10**6),
        "currency": "EUR",
        "tags": ["soak"],
    }


class Load:
    """Reader and writer threads, paced to `rate` requests/s in total (None: as fast as they can)."""

    def __init__(
        self, masters: list[Master], record: Record, keys: dict[str, str], readers: int, writers: int
    ) -> None:
        self.masters = masters
        self.record = record
        self.keys = keys
        self.readers = readers
        self.writers = writers
        self.rate: float | None = None
        self._slot_lock = threading.Lock()
        self._next_slot = 0.0
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.owned: list[list[str]] = [[] for _ in range(writers)]
        self.live: list[str] = []

    # -- set-up

    def seed(self) -> None:
        """PRODUCTS_PER_WRITER products per writer, created through the first master."""
        client = Client(self.masters[0], self.record, self.keys)
        for index in range(self.writers):
            for _ in range(PRODUCTS_PER_WRITER):
                product = self._create(client, f"SEED-{uuid.uuid4().hex[:12].upper()}")
                if product is None:
                    raise RuntimeError("could not seed products")
                self.owned[index].append(product)
        client.close()

    # -- threads

    def start(self) -> None:
        for index in range(self.readers):
            self.threads.append(threading.Thread(target=self._reader, args=(index,), daemon=True))
        for index in range(self.writers):
            self.threads.append(threading.Thread(target=self._writer, args=(index,), daemon=True))
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        self.threads = []
        self.stop = threading.Event()

    def _clients(self) -> list[Client]:
        """One client per master, each falling back on the other while its master is not ready."""
        clients = [Client(master, self.record, self.keys) for master in self.masters]
        clients[0].fallback, clients[1].fallback = clients[1], clients[0]
        return clients

    def _pace(self) -> None:
        """Wait for the next of the load's slots, shared by all threads (open loop: a thread held up by a
        fault leaves its slots to the others; after a stall of the whole load no burst makes up for it)."""
        if self.rate is None:
            return
        with self._slot_lock:
            self._next_slot = max(self._next_slot + random.expovariate(self.rate), now() - 0.5)
            slot = self._next_slot
        wait = slot - now()
        if wait > 0:
            self.stop.wait(wait)

    def _reader(self, index: int) -> None:
        clients = self._clients()
        while not self.stop.is_set():
            self._pace()
            client = clients[index % 2 if random.random() < 0.5 else random.randrange(2)]
            try:
                if random.random() < 0.1:
                    self._read_list(client)
                else:
                    with self.record.lock:  # writers add and remove products meanwhile
                        product_id = random.choice(self.live)
                    self._read(client, product_id)
            except ConnectionFailed:
                self.stop.wait(0.05)
        for client in clients:
            client.close()

    def _writer(self, index: int) -> None:
        clients = self._clients()
        owned = self.owned[index]
        while not self.stop.is_set():
            self._pace()
            client = random.choice(clients)
            roll = random.random()
            try:
                if roll < 0.04 or len(owned) < PRODUCTS_PER_WRITER // 2:
                    created = self._create(client, f"SOAK-{uuid.uuid4().hex[:12].upper()}")
                    if created:
                        owned.append(created)
                elif roll < 0.07:
                    victim = owned.pop(random.randrange(len(owned)))
                    self._delete(client, victim)
                else:
                    product_id = random.choice(owned)
                    if self._update(client, product_id):
                        self._pace()
                        self._read(client, product_id)  # read your write, through the writer's master
            except ConnectionFailed:
                self.stop.wait(0.05)
        for client in clients:
            client.close()

    # -- requests

    def _create(self, client: Client, sku: str) -> str | None:
        """POST with an Idempotency-Key, repeated (same key, same body) until the outcome is known."""
        body = product_body(sku)
        key = uuid.uuid4().hex
        first_id = None
        for _attempt in range(200):
            try:
                status, _response, data, sent, answered, master, incarnation = client.call(
                    "POST", "/api/v1/products", body, {"Idempotency-Key": key}
                )
            except ConnectionFailed:
                self.stop.wait(0.1)
                continue
            if status == 503:
                self.stop.wait(0.1)
                continue
            if status == 409:
                # An earlier attempt committed and was answered to nobody; the key's record says so (the
                # repeat that raced it got 409, a later repeat replays it): try again.
                self.stop.wait(0.05)
                continue
            if status != 201:
                self.record.violation("status", f"POST answered {status}: {data[:200]!r}")
                return None
            product = json.loads(data)
            if first_id is not None and product["id"] != first_id:
                self.record.violation("idempotency", f"a repeated POST made {product['id']} after {first_id}")
            first_id = product["id"]
            if product["version"] != 1 or product["sku"] != sku:
                self.record.violation("body", f"POST answered {product}")
            with self.record.lock:
                state = self.record.products.setdefault(product["id"], Product(product["id"], sku))
                if not state.writes:
                    state.writes.append(Write(1, sent, answered, master, incarnation, body["name"]))
                self.live.append(product["id"])
            return str(product["id"])
        return None

    def _update(self, client: Client, product_id: str) -> bool:
        state = self.record.products[product_id]
        body = product_body(state.sku)
        state.attempts.append(now())
        if random.random() < 0.5:
            status, _response, data, sent, answered, master, incarnation = client.call(
                "PUT", f"/api/v1/products/{product_id}", body
            )
        else:
            patch = {"name": body["name"], "price_cents": body["price_cents"]}
            status, _response, data, sent, answered, master, incarnation = client.call(
                "PATCH",
                f"/api/v1/products/{product_id}",
                patch,
                {"Content-Type": "application/merge-patch+json"},
            )
        if status == 503:
            return False
        if status != 200:
            self.record.violation("status", f"write of {product_id} answered {status}: {data[:200]!r}")
            return False
        product = json.loads(data)
        with self.record.lock:
            last = state.writes[-1].version
            if product["version"] <= last or product["name"] != body["name"]:
                self.record.violation(
                    "lost-update", f"{product_id}: answered version {product['version']} after {last}"
                )
            state.writes.append(Write(product["version"], sent, answered, master, incarnation, body["name"]))
        return True

    def _delete(self, client: Client, product_id: str) -> None:
        state = self.record.products[product_id]
        with self.record.lock:
            self.live.remove(product_id)
        state.delete_sent = now()
        state.attempts.append(state.delete_sent)
        status, _response, data, sent, answered, master, incarnation = client.call(
            "DELETE", f"/api/v1/products/{product_id}"
        )
        if status == 204:
            with self.record.lock:
                state.writes.append(Write(DELETED, sent, answered, master, incarnation, None))
        elif status != 503:
            self.record.violation("status", f"DELETE {product_id} answered {status}: {data[:200]!r}")

    def _read(self, client: Client, product_id: str) -> None:
        status, response, data, sent, answered, master, incarnation = client.call(
            "GET", f"/api/v1/products/{product_id}"
        )
        state = self.record.products[product_id]
        if status == 404:
            deleting = state.delete_sent is not None and state.delete_sent < now()
            self._observe(
                Read(
                    product_id,
                    DELETED if deleting else 0,
                    sent,
                    answered,
                    master,
                    incarnation,
                    None,
                )
            )
        elif status == 200:
            product = json.loads(data)
            etag = response.getheader("ETag")
            if etag != f'"{product["version"]}"' or product["id"] != product_id:
                self.record.violation("body", f"GET {product_id}: ETag {etag} for {product}")
            if response.getheader("X-Cache") not in ("HIT", "MISS", "BYPASS"):
                self.record.violation("body", f"GET {product_id}: X-Cache {response.getheader('X-Cache')}")
            self._observe(
                Read(
                    product_id,
                    product["version"],
                    sent,
                    answered,
                    master,
                    incarnation,
                    product["name"],
                )
            )
        elif status != 503:
            self.record.violation("status", f"GET {product_id} answered {status}: {data[:200]!r}")

    def _read_list(self, client: Client) -> None:
        status, _response, data, sent, answered, master, incarnation = client.call(
            "GET", "/api/v1/products?limit=20"
        )
        if status == 200:
            for item in json.loads(data)["items"]:
                if item["id"] in self.record.products:
                    self._observe(
                        Read(
                            item["id"],
                            item["version"],
                            sent,
                            answered,
                            master,
                            incarnation,
                            item["name"],
                        )
                    )
        elif status != 503:
            self.record.violation("status", f"GET list answered {status}: {data[:200]!r}")

    def _observe(self, read: Read) -> None:
        with self.record.lock:
            self.record.reads.append(read)


# --- the faults -----------------------------------------------------------------------------------------


class Faults:
    """Inject one fault at a time; record when each started and ended (and what it made unreachable)."""

    def __init__(
        self,
        redis: Redis,
        postgres: Postgres,
        masters: list[Master],
        secret: SecretDir,
        keys: dict[str, str],
        record: Record,
    ) -> None:
        self.redis = redis
        self.postgres = postgres
        self.masters = masters
        self.secret = secret
        self.keys = keys
        self.record = record
        self.outage = (2.0, 4.0)

    def inject(self, kind: str) -> None:
        started = now()
        master: Master | None = None
        if kind == "redis-kill":
            self.redis.kill()
            time.sleep(random.uniform(*self.outage))
            self.redis.start()
        elif kind == "redis-pause":
            self.redis.pause()
            time.sleep(random.uniform(*self.outage))
            self.redis.resume()
        elif kind == "redis-restart":
            self.redis.kill()
            self.redis.start()
        elif kind == "redis-partition":
            master = random.choice(self.masters)
            master.proxy.cut()
            time.sleep(random.uniform(*self.outage))
            master.proxy.restore()
        elif kind == "postgres-restart":
            self.postgres.stop()
            self.postgres.start()
        elif kind == "key-rotation":
            self._rotate()
        elif kind == "worker-kill":
            master = random.choice(self.masters)
            pid = random.choice(master.worker_pids())
            os.kill(pid, signal.SIGKILL)
            self.record.killed.append(pid)
        elif kind == "master-restart":
            master = random.choice(self.masters)
            master.ready = False
            time.sleep(PRE_STOP_SECONDS)
            master.stop()
            master.start()
        else:
            raise ValueError(kind)
        ended = now()
        with self.record.lock:
            self.record.faults.append(Fault(kind, started, ended, master.name if master else None))
            if kind.startswith("redis-"):
                self.record.redis_outages.append((started, ended, master.name if master else None))
            if kind == "postgres-restart":
                self.record.postgres_down.append((started, ended))
        log(f"fault {kind}{' on ' + master.name if master else ''}: {ended - started:.1f} s")

    def _rotate(self) -> None:
        """Add a new key next to the old, wait until both masters take it on fresh connections, move the
        clients to it, remove the old one (the README's zero-downtime rotation)."""
        old = self.keys["key"]
        new = secrets.token_urlsafe(24)
        self.secret.write({"soak": old, "soak-next": new})
        deadline = now() + 15
        confirmations = 0
        while confirmations < 12:
            if now() > deadline:
                raise RuntimeError("the new key was not accepted within 15 s")
            master = self.masters[confirmations % 2]
            try:
                connection = http.client.HTTPConnection(HOST, master.port, timeout=5)
                connection.request("GET", "/api/v1/products?limit=1", headers={"X-Api-Key": new})
                accepted = connection.getresponse().status == 200
                connection.close()
            except OSError:
                accepted = False
            confirmations = confirmations + 1 if accepted else 0
            time.sleep(0.1)
        self.keys["key"] = new
        time.sleep(0.5)  # requests already sent with the old key finish
        self.secret.write({"soak-next": new})


# --- the checks -----------------------------------------------------------------------------------------


def during(
    windows: list[tuple[float, float]], start: float, end: float, after: float = 0.0
) -> tuple[float, float] | None:
    """The first window [a, b + after] that [start, end] overlaps."""
    for a, b in windows:
        if start <= b + after and end >= a:
            return a, b
    return None


def check_reads(record: Record) -> dict[str, float]:
    """Every read against the writes answered before it started; the worst stale window per class."""
    worst = {"writer": 0.0, "other-100ms": 0.0, "other-outage-5s": 0.0}
    for read in record.reads:
        state = record.products[read.product]
        if read.version not in (0, DELETED):
            if read.version > 1 + sum(1 for sent in state.attempts if sent < read.ended):
                record.violation("phantom", f"{read.product} read version {read.version} nobody wrote")
            known = next((w for w in state.writes if w.version == read.version), None)
            if known is not None and known.name != read.name:
                record.violation(
                    "content", f"{read.product} v{read.version} read with another version's name"
                )
        for write in state.writes:
            if write.version <= read.version or write.answered >= read.started:
                continue
            if read.version == DELETED and write.version != DELETED:
                continue
            if write.master == read.master and write.incarnation == read.incarnation:
                kind, since, bound = "writer", write.answered, 0.0
            else:
                kind, since, bound = "other-100ms", write.answered, OTHER_POD_SECONDS
                for start, end, master in record.redis_outages:
                    if master not in (None, write.master) or not (
                        write.sent <= end + BREAKER_SECONDS and write.answered >= start
                    ):
                        continue
                    # Redis may not have taken the invalidation: another pod delivers it within 5 s of the
                    # write (the writer cut off alone), or of Redis being back (nobody could reach it).
                    kind, bound = "other-outage-5s", OUTAGE_SECONDS
                    since = max(since, end) if master is None else since
            lag = read.started - since
            if lag < 0:
                continue
            worst[kind] = max(worst[kind], lag)
            if lag > bound:
                seen = (
                    "404"
                    if read.version == 0
                    else ("deleted" if read.version == DELETED else f"v{read.version}")
                )
                written = "the delete" if write.version == DELETED else f"v{write.version}"
                record.violation(
                    f"stale-{kind}",
                    f"{read.product} read {seen} on {read.master}#{read.incarnation} {lag * 1000:.0f} ms "
                    f"after {written} answered on {write.master}#{write.incarnation}",
                )
    return worst


def check_errors(record: Record) -> None:
    """503s only while PostgreSQL was down (plus the grace); connection errors only where a fault explains
    them."""
    for method, master, sent, answered in record.unavailable:
        if during(record.postgres_down, sent, answered, after=POSTGRES_GRACE_SECONDS) is None:
            back = max((end for _start, end in record.postgres_down if end <= sent), default=None)
            since = (
                f"sent {sent - back:.2f} s after PostgreSQL was back" if back else "PostgreSQL never stopped"
            )
            record.violation("503", f"{method} answered 503 on {master} ({since})")
    for kind, master, when in record.conn_errors:
        explained = kind == "reset-idle" or any(
            fault.master == master
            and (
                (kind == "reset" and fault.kind == "worker-kill")
                or (kind in ("reset", "refused") and fault.kind == "master-restart")
            )
            and fault.started
            <= when
            <= fault.ended + (KILL_GRACE_SECONDS if fault.kind == "worker-kill" else 0.5)
            for fault in record.faults
        )
        if not explained:
            record.violation("connection", f"{kind} on {master} not explained by a fault")


def check_database(record: Record, postgres: Postgres) -> None:
    """Every 2xx-answered write is in the database (its version or a later one; its content at its version);
    every 204-answered delete is gone; no sku twice."""
    import psycopg

    with psycopg.connect(postgres.url, connect_timeout=10) as connection:
        rows = {
            row[0]: (row[1], row[2]) for row in connection.execute("SELECT id, version, name FROM products")
        }
        duplicated = connection.execute(
            "SELECT sku FROM products GROUP BY sku HAVING count(*) > 1"
        ).fetchall()
    for (sku,) in duplicated:
        record.violation("duplicate", f"sku {sku} twice in the database")
    for product in record.products.values():
        answered = [w for w in product.writes]
        if not answered:
            continue
        last = answered[-1]
        row = rows.get(product.id)
        if last.version == DELETED:
            if row is not None:
                record.violation("lost-write", f"{product.id} answered deleted, still in the database")
            continue
        if row is None:
            if product.delete_sent is None:
                record.violation(
                    "lost-write", f"{product.id} (v{last.version} answered) is not in the database"
                )
            continue
        version, name = row
        if version < last.version or (version == last.version and name != last.name):
            record.violation(
                "lost-write", f"{product.id}: database has v{version}, v{last.version} was answered"
            )


def check_converged(record: Record, masters: list[Master], keys: dict[str, str], postgres: Postgres) -> None:
    """After the load: every product reads the database's version through every master."""
    import psycopg

    with psycopg.connect(postgres.url, connect_timeout=10) as connection:
        rows: dict[str, int] = dict(connection.execute("SELECT id, version FROM products").fetchall())
    for master in masters:
        client = Client(master, Record(), keys)
        for product_id in record.products:
            try:
                status, _response, data, *_ = client.call("GET", f"/api/v1/products/{product_id}")
            except ConnectionFailed as failed:
                record.violation("converged", f"{product_id} on {master.name}: {failed.kind}")
                continue
            seen = json.loads(data)["version"] if status == 200 else None
            if status not in (200, 404) or seen != rows.get(product_id):
                record.violation(
                    "stale-at-end",
                    f"{product_id} reads {seen} ({status}) on {master.name}, "
                    f"the database has {rows.get(product_id)}",
                )
        client.close()


# --- the run --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(root: Path) -> Iterator[tuple[Postgres, Redis, SecretDir, list[Master], dict[str, str]]]:
    postgres = Postgres(root)
    redis = Redis(root)
    masters: list[Master] = []
    try:
        postgres.start()
        redis.start()
        migrate = subprocess.run(
            [sys.executable, "-m", "catalog.cli", "db", "upgrade"],
            env={**os.environ, "CATALOG_DATABASE_URL": postgres.url},
            capture_output=True,
            text=True,
            check=False,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"migration failed:\n{migrate.stdout}{migrate.stderr}")
        secret = SecretDir(root / "api-keys")
        keys = {"key": secrets.token_urlsafe(24)}
        secret.write({"soak": keys["key"]})
        env = {
            "PATH": os.environ["PATH"],
            "CATALOG_DATABASE_URL": postgres.url,
            "CATALOG_API_KEYS_DIR": str(secret.path),
            "CATALOG_RATE_LIMIT": "100000/second",
            "WEB_CONCURRENCY": str(WORKERS),
            "CATALOG_THREADS": str(THREADS),
            "CATALOG_LOG_LEVEL": "INFO",
        }
        masters = [Master(name, root, env, Proxy(redis.port)) for name in ("pod-a", "pod-b")]
        for master in masters:
            master.start()
        yield postgres, redis, secret, masters, keys
    finally:
        for master in masters:
            master.stop()
            master.proxy.stop()
        redis.kill()
        with contextlib.suppress(RuntimeError):
            postgres.stop()


def schedule(chosen: list[str]) -> Iterator[str]:
    """Fault kinds in rounds: every chosen kind once per round, shuffled."""
    while True:
        kinds = list(chosen)
        random.shuffle(kinds)
        yield from kinds


def soak(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="catalog-soak-"))
    os.chmod(root, 0o755)  # the postgres user reaches its directory inside
    record = Record()
    started_at = now()
    try:
        with servers(root) as (postgres, redis, secret, masters, keys):
            log(
                f"servers up in {now() - started_at:.1f} s (postgres :{postgres.port}, redis :{redis.port}, "
                f"masters :{masters[0].port} :{masters[1].port}) in {root}"
            )
            load = Load(masters, record, keys, args.readers, args.writers)
            load.seed()
            load.start()
            time.sleep(args.probe_seconds / 3)
            before, probe_start = record.requests, now()
            time.sleep(args.probe_seconds)
            capacity = (record.requests - before) / (now() - probe_start)
            load.rate = capacity * args.load
            log(f"capacity {capacity:.0f} requests/s (closed loop); loading at {load.rate:.0f}/s")
            faults = Faults(redis, postgres, masters, secret, keys, record)
            faults.outage = (args.outage[0], args.outage[1])
            load_start, requests_at_start = now(), record.requests
            record.began = load_start
            end = load_start + args.seconds
            kinds = schedule(args.faults)
            time.sleep(random.uniform(*args.gap) / 2)
            while now() + 8 < end:
                faults.inject(next(kinds))
                time.sleep(min(random.uniform(*args.gap), max(0.0, end - now())))
            time.sleep(max(0.0, end - now()))
            load.finish()
            loaded_seconds = now() - load_start
            loaded_requests = record.requests - requests_at_start
            time.sleep(OUTAGE_SECONDS + 0.5)
            check_database(record, postgres)
            check_converged(record, masters, keys, postgres)
            worst = check_reads(record)
            check_errors(record)
            error_lines = [line for master in masters for line in master.error_lines(record.killed)]
            for line in error_lines[:20]:
                record.violation("error-log", line)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    conn_errors = Counter(kind for kind, _m, _w in record.conn_errors)
    return {
        "seconds": round(loaded_seconds, 1),
        "capacity_rps": round(capacity),
        "target_rps": round(capacity * args.load),
        "requests": record.requests,
        "loaded_rps": round(loaded_requests / loaded_seconds),
        "reads_checked": len(record.reads),
        "writes_answered": sum(len(p.writes) for p in record.products.values()),
        "products": len(record.products),
        "faults": dict(Counter(f.kind for f in record.faults)),
        "statuses": dict(sorted(record.statuses.items())),
        "connection_errors": dict(conn_errors),
        "reconnects_after_idle_close": record.reconnects,
        "rerouted_while_restarting": record.rerouted,
        "worst_stale_seconds": {kind: round(value, 4) for kind, value in worst.items()},
        "slowest": {"seconds": round(record.slowest[0], 3), "request": record.slowest[1]},
        "fault_timeline": [
            f"+{f.started - record.began:.1f} s {f.kind}{' on ' + f.master if f.master else ''} "
            f"({f.ended - f.started:.1f} s)"
            for f in record.faults
        ],
        "violations_by_kind": dict(record.violation_kinds),
        "violations": record.violations,
        "total_seconds": round(now() - started_at, 1),
        "clean": not record.violations,
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"soak: {report['seconds']} s under load at {report['loaded_rps']} requests/s "
        f"(half of a measured {report['capacity_rps']}/s); {report['total_seconds']} s in all"
    )
    print(
        f"  requests {report['requests']}, reads checked {report['reads_checked']}, "
        f"writes answered {report['writes_answered']} over {report['products']} products"
    )
    print(f"  faults: {report['faults']}: {', '.join(report['fault_timeline'])}")
    print(f"  answers: {report['statuses']}")
    print(
        f"  connection errors: {report['connection_errors']} "
        f"(+{report['reconnects_after_idle_close']} reconnects after an idle close; "
        f"{report['rerouted_while_restarting']} requests to the other master while one restarted)"
    )
    print(
        "  worst stale window: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in report["worst_stale_seconds"].items())
    )
    print(f"  slowest request: {report['slowest']['seconds'] * 1000:.0f} ms ({report['slowest']['request']})")
    if report["clean"]:
        print("  CLEAN: no violation")
    else:
        print(f"  VIOLATIONS: {report['violations_by_kind']}")
        for line in report["violations"][:50]:
            print(f"    {line}")


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["proxy"]:
        run_proxy(int(arguments[1]), int(arguments[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="how long the load runs")
    parser.add_argument("--gap", type=float, nargs=2, default=(15.0, 30.0), help="seconds between faults")
    parser.add_argument(
        "--outage", type=float, nargs=2, default=(3.0, 5.0), help="seconds Redis stays killed/paused"
    )
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the measured capacity")
    parser.add_argument("--probe-seconds", type=float, default=5.0, help="capacity measurement")
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument(
        "--faults", type=lambda v: v.split(","), default=list(FAULT_KINDS), help="comma-separated fault kinds"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(arguments)
    report = soak(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
