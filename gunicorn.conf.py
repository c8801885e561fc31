"""gunicorn settings for catalog, all derived from the environment (see CONTRACT: Configuration)."""

import logging
import os
import sys
import tempfile

from catalog import logs
from catalog.config import ConfigError, Settings, check_metrics_dir, listen_addresses

try:
    settings = Settings.from_env()
    check_metrics_dir()
except ConfigError as error:
    logs.configure("INFO")
    logging.getLogger("catalog.config").critical(
        "invalid configuration: %s", error.problem, extra={"variable": error.variable}
    )
    sys.exit(2)

from catalog import metrics, tracing
from catalog.cache.board import BOARD_ENV

wsgi_app = "catalog:create_app()"
# Every interface, IPv4 and IPv6 (`make run` overrides it with --bind 127.0.0.1:$PORT).
bind = listen_addresses(settings.port)
workers = settings.web_concurrency
# gthread, answering its own protocol-level errors as problem bodies too.
worker_class = "catalog.gunicorn_worker.ProblemThreadWorker"
threads = settings.threads
# In-flight requests get this long to finish after SIGTERM; the chart's grace period is longer.
graceful_timeout = 30
timeout = 30
keepalive = 5
# The worker heartbeat is a file touched every second: keep it in memory, not on a disk or overlay.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 - tmpfs, not a shared temp dir
control_socket_disable = True
accesslog = None
# gunicorn's logger without its access log (the app writes the one access line of each request).
logger_class = "catalog.logs.JsonGunicornLogger"
logconfig_dict = logs.gunicorn_logconfig(settings.log_level)
proc_name = "catalog"


def on_starting(server):
    """Before the workers exist: an embedded SQLite database gets its schema (a PostgreSQL one is migrated
    by `catalog db upgrade`, e.g. the chart's init container); the board that keeps in-process caches of
    all workers exact."""
    if settings.database_url.startswith("sqlite"):
        from catalog.cli import upgrade

        upgrade(settings)
    board = tempfile.NamedTemporaryFile(prefix="catalog-cache-board-", delete=False)  # noqa: SIM115
    board.close()
    os.environ[BOARD_ENV] = board.name


def on_exit(server):
    """Remove the board file."""
    board = os.environ.get(BOARD_ENV)
    if board and os.path.exists(board):
        os.unlink(board)


def post_fork(server, worker):
    """A preloaded app's connection pools must not be shared with the parent; the worker's own tracer
    provider and exporter (when tracing is on)."""
    if server.cfg.preload_app:
        worker.app.wsgi().extensions["catalog.db"].dispose()
    tracing.start_worker(settings)


def worker_exit(server, worker):
    """The worker's requests have drained: export its last spans."""
    tracing.stop_worker()


def child_exit(server, worker):
    """Fold the dead worker's metric files into the archive so restarts keep counts and files stay few."""
    metrics.fold_dead_worker(worker.pid)
