"""gunicorn's gthread worker, with two changes: its own HTTP-level errors (414, 431, bad request lines) are
problem bodies like every other error of the service, and on SIGTERM it closes its copy of the listening
socket at once, so that new connections are refused while in-flight requests finish."""

from __future__ import annotations

import json
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


class ProblemThreadWorker(ThreadWorker):  # type: ignore[misc]
    """A gthread worker whose protocol-level error answers are application/problem+json."""

    def set_accept_enabled(self, enabled: bool) -> None:
        """Stopping to accept for shutdown also closes the listeners: refused, not queued and later reset."""
        super().set_accept_enabled(enabled)
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
