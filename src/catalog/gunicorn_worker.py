"""gunicorn's gthread worker, with three changes: its own HTTP-level errors (414, 431, bad request lines) are
problem bodies like every other error of the service; on SIGTERM it closes its copy of the listening socket
at once, so that new connections are refused while in-flight requests finish; and a worker that already
holds more connections than threads leaves new ones to its siblings for a moment."""

from __future__ import annotations

import json
import time
import uuid
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker


class _CapturedSocket:
    """Takes the bytes gunicorn would send, so that only the status line is reused."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, _flag: bool) -> None:
        """Nothing to switch."""

    def sendall(self, data: bytes) -> None:
        self.data += data


# Every worker polls the one listening socket and plain gthread accepts whenever it is woken, so a burst of
# new connections (a client's or an ingress's pool of keep-alive connections) often lands nearly all on the
# worker that woke first: one process and one GIL then serve them while the others idle. A worker holding
# more connections than threads therefore waits this long after each accept, and an idle sibling takes the
# next one; alone, or with every sibling as loaded, it still accepts them all, this far apart.
ACCEPT_PAUSE_SECONDS = 0.001


class ProblemThreadWorker(ThreadWorker):  # type: ignore[misc]
    """A gthread worker whose protocol-level error answers are application/problem+json, and which spreads
    kept-alive connections over the workers (see ACCEPT_PAUSE_SECONDS)."""

    _resume_accept_at = 0.0

    def accept(self, listener: Any) -> None:
        """Accept one connection; holding more than one per thread, leave the next ones to the other workers
        for a moment."""
        super().accept(listener)
        if self.nr_conns > self.cfg.threads:
            self._resume_accept_at = time.monotonic() + ACCEPT_PAUSE_SECONDS
            self.set_accept_enabled(False)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """gthread's loop turn, woken in time to accept again after a pause."""
        if self._resume_accept_at:
            left = self._resume_accept_at - time.monotonic()
            if left > 0:
                timeout = min(timeout, left)
            else:
                self._resume_accept_at = 0.0
                self.set_accept_enabled(self.alive and self.nr_conns < self.worker_connections)
        super().wait_for_and_dispatch_events(timeout)

    def set_accept_enabled(self, enabled: bool) -> None:
        """Not during a pause. Stopping to accept for shutdown also closes the listeners: refused, not queued
        and later reset."""
        super().set_accept_enabled(enabled and not self._resume_accept_at)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Let gunicorn classify and log the error, then answer with a problem body (never echoing input)."""
        captured = _CapturedSocket()
        super().handle_error(req, captured, addr, exc)
        try:
            status = int(captured.data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = 500
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        request_id = uuid.uuid4().hex
        body = json.dumps(
            {
                "type": "about:blank",
                "title": phrase,
                "status": status,
                "detail": f"The server could not read the request: {phrase.lower()}.",
                "request_id": request_id,
            }
        ).encode()
        head = (
            f"HTTP/1.1 {status} {phrase}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n\r\n"
        ).encode("latin-1")
        try:
            util.write_nonblock(client, head + body)
        except OSError:
            self.log.debug("Failed to send error message.")
