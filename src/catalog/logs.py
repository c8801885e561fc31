"""One JSON object per line on stdout for the app, gunicorn and the access log."""

from __future__ import annotations

import itertools
import logging
import os
import re
import select
import sys
import time
from json.encoder import encode_basestring_ascii as json_string  # a str as a JSON string, ASCII only
from typing import Any

from flask import Flask, Request, g, has_request_context, request
from gunicorn.glogging import Logger as GunicornLogger
from pythonjsonlogger.json import JsonFormatter

from catalog import tracing

ACCESS_LOGGER = "catalog.access"
# The attribute of an access line's record holding its fields (method, path, status, ...).
ACCESS_FIELDS = "access_fields"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
access_log = logging.getLogger(ACCESS_LOGGER)


class JsonLineFormatter(JsonFormatter):
    """python-json-logger with the contract's field names and an RFC 3339 UTC timestamp. The access line,
    written once per request with known fields of plain types, skips the general machinery: the same
    fields in the same order, filled into a template."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("json_default", str)
        super().__init__("%(levelname)s %(name)s %(message)s", *args, **kwargs)

    _second = -1
    _second_text = ""

    def rfc3339(self, created: float) -> str:
        """RFC 3339 UTC with milliseconds (the date formatted once a second, not once a line)."""
        seconds = int(created)
        if seconds != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            self._second = seconds
        return f"{self._second_text}.{int((created - seconds) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        access: dict[str, Any] | None = record.__dict__.get(ACCESS_FIELDS)
        if access is None:
            return super().format(record)
        return self.access_line(record.created, record.getMessage(), access)

    def access_line(self, created: float, message: str, fields: dict[str, Any]) -> str:
        """An access line: the contract's fields, then the request's (those `write_access_line` sets), as
        `json.dumps` would write them, but filled into a template (a third of the time of a dumps)."""
        client = fields["client"]
        line = (
            f'{{"timestamp": "{self.rfc3339(created)}", "level": "INFO", "logger": "{ACCESS_LOGGER}", '
            f'"message": {json_string(message)}, "method": {json_string(fields["method"])}, '
            f'"path": {json_string(fields["path"])}, "status": {fields["status"]}, '
            f'"duration_ms": {fields["duration_ms"]!r}, '
            f'"client": {"null" if client is None else json_string(client)}, '
            f'"request_id": {json_string(fields["request_id"])}'
        )
        if "trace_id" in fields:
            trace_id, span_id = json_string(fields["trace_id"]), json_string(fields["span_id"])
            line += f', "trace_id": {trace_id}, "span_id": {span_id}'
        return line + "}"

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["timestamp"] = self.rfc3339(record.created)
        super().add_fields(log_data, record, message_dict)


class JsonGunicornLogger(GunicornLogger):  # type: ignore[misc]
    """gunicorn's logger, minus its access log: catalog writes its own access line (through the app's JSON
    logging), so gunicorn need not build the access atoms (a dict of every header) of each request."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        """Nothing: the app logs the access line."""


class RequestIds:
    """Ids for requests that bring none: a random prefix per process and a counter (unique, and far cheaper
    than a uuid4 per request)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        """A new id."""
        return f"{self._prefix}{next(self._counter):08x}"


request_ids = RequestIds()


class RequestIdFilter(logging.Filter):
    """Adds the serving request's id, and its trace's ids, to every line logged while it is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context():
            if not hasattr(record, "request_id"):
                request_id = g.get("request_id")
                if request_id is not None:
                    record.request_id = request_id
            trace_ids = tracing.log_ids(request.environ)
            if trace_ids is not None:
                record.trace_id, record.span_id = trace_ids
        return True


def json_handler() -> logging.Handler:
    """A stdout handler writing JSON lines with request ids."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLineFormatter())
    handler.addFilter(RequestIdFilter())
    return handler


def configure(level: str) -> None:
    """Route the root logger (and so every library's) to one JSON handler on stdout, once."""
    # No record needs the caller's source line, thread or process names: skip finding them on every line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.setLevel(level)
    if not any(isinstance(h.formatter, JsonLineFormatter) for h in root.handlers):
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(json_handler())


def gunicorn_logconfig(level: str) -> dict[str, Any]:
    """dictConfig for gunicorn: its error log shares our JSON handler; its access log is off (ours is)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonLineFormatter}},
        "filters": {"request_id": {"()": RequestIdFilter}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "json",
                "filters": ["request_id"],
            }
        },
        "root": {"level": level, "handlers": ["stdout"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
    }


def write_access_line(request: Request, status: int, client: Any, started: float, request_id: str) -> None:
    """The one access line of a request. Where the line goes only to this module's JSON handlers of a
    file descriptor (stdout, as `configure` and gunicorn.conf.py set them up), it is written with one
    os.write per handler: the same line, without a LogRecord, the logging call chain, or the handler's lock,
    which the request threads of a worker otherwise queue on (a lock convoy py-spy showed taking a fifth of
    a busy worker's time). A line is one write of less than PIPE_BUF bytes, so it never interleaves with
    another. Any other handler (a file, a test's capture) gets the record through logging as usual."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    method, path = request.method, request.path
    fields = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "client": client.name if client else None,
        "request_id": request_id,
    }
    trace_ids = tracing.log_ids(request.environ)
    if trace_ids is not None:
        fields["trace_id"], fields["span_id"] = trace_ids
    message = f"{method} {path} {status}"
    targets = _direct_targets()
    if targets is None:
        access_log.info(message, extra={ACCESS_FIELDS: fields, "request_id": request_id})
        return
    now = time.time()
    for descriptor, formatter in targets:
        line = formatter.access_line(now, message, fields)
        if len(line) >= select.PIPE_BUF:
            access_log.info(message, extra={ACCESS_FIELDS: fields, "request_id": request_id})
            return
        os.write(descriptor, line.encode("ascii") + b"\n")


def _direct_targets() -> list[tuple[int, JsonLineFormatter]] | None:
    """(file descriptor, formatter) of each handler an access record would reach, if every one is a JSON
    line stream handler on a file descriptor that lets INFO through; else None. (A StreamHandler flushes
    after each record, so nothing it wrote is still waiting in its buffer.)"""
    targets: list[tuple[int, JsonLineFormatter]] = []
    logger: logging.Logger | None = access_log
    while logger is not None:
        for handler in logger.handlers:
            formatter = handler.formatter
            if (
                type(handler) is not logging.StreamHandler
                or not isinstance(formatter, JsonLineFormatter)
                or handler.level > logging.INFO
            ):
                return None
            try:
                descriptor = handler.stream.fileno()
            except (AttributeError, OSError, ValueError):
                return None
            targets.append((descriptor, formatter))
        logger = logger.parent if logger.propagate else None
    return targets


def init_app(app: Flask) -> None:
    """JSON logging at the configured level (gunicorn may have set it up); the pipeline writes the access
    line of each request."""
    configure(app.config["SETTINGS"].log_level)
    app.logger.handlers.clear()
    app.logger.propagate = True
