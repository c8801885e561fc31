"""The threads an app runs beside its requests (the near-cache's invalidation listener, the key store's
re-reads, the rate limiter's syncs), in every process that serves it: started with the app, and again in a
child forked after the app was built (gunicorn --preload), where threads do not survive the fork."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

from flask import Flask

log = logging.getLogger(__name__)

Body = Callable[[threading.Event], None]


class Background:
    """Named daemon threads that run until `stop` (each gets the event that stop sets)."""

    def __init__(self) -> None:
        self._bodies: list[tuple[str, Body]] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        reference = weakref.ref(self)

        def restart_in_child() -> None:
            background = reference()
            if background is not None:
                background._restart()

        os.register_at_fork(after_in_child=restart_in_child)

    def run(self, name: str, body: Body) -> None:
        """Start `body(stop_event)` in a thread of its own now, and in every forked child."""
        self._bodies.append((name, body))
        self._start(name, body)

    def every(self, name: str, seconds: float, function: Callable[[], object]) -> None:
        """Call `function` every `seconds` (errors are logged, never end the thread)."""

        def loop(stop: threading.Event) -> None:
            while not stop.wait(seconds):
                try:
                    function()
                except Exception:
                    log.exception("background task failed", extra={"task": name})

        self.run(name, loop)

    def stop(self, seconds: float = 5.0) -> None:
        """Ask every thread to end (each does within its own wait) and wait up to `seconds` for them, so
        that none is still using a connection its owner is about to close."""
        self._stop.set()
        deadline = time.monotonic() + seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _start(self, name: str, body: Body) -> None:
        thread = threading.Thread(target=body, args=(self._stop,), name=f"catalog-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _restart(self) -> None:
        if self._stop.is_set():
            return
        self._stop = threading.Event()
        self._threads = []  # the parent's did not survive the fork
        for name, body in self._bodies:
            self._start(name, body)


def init_app(app: Flask) -> None:
    """The app's background threads (none yet; each concern adds its own)."""
    app.extensions["catalog.background"] = Background()
