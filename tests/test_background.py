"""An app's background threads: stopping them waits until they have finished, so that their owner can then
close the connections they use."""

import threading
import time
from collections.abc import Callable

from catalog.background import Background


def test_stop_waits_for_every_thread_to_finish() -> None:
    finished: list[str] = []

    def body(name: str) -> Callable[[threading.Event], None]:
        def run(stop: threading.Event) -> None:
            stop.wait()
            time.sleep(0.2)  # the last query of a sweep
            finished.append(name)

        return run

    background = Background()
    background.run("first", body("first"))
    background.run("second", body("second"))
    background.stop()
    assert sorted(finished) == ["first", "second"]


def test_stop_gives_up_on_a_thread_that_does_not_end_in_time() -> None:
    release = threading.Event()
    background = Background()

    def stuck(_stop: threading.Event) -> None:
        release.wait()

    background.run("stuck", stuck)
    began = time.monotonic()
    background.stop(seconds=0.3)
    assert 0.25 <= time.monotonic() - began < 2
    release.set()
