"""Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no port, no
websocket library, no browser download. Records every request the page makes and every console error."""

import base64
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

# Chromium's own traffic (updates, sync, safe browsing, first-run) is switched off; any host but the
# loopback address fails to resolve, so nothing can leave the machine even if something tried.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-pipe",
)


class Browser:
    """One Chromium process and one page (a tab) of it; `close()` ends it."""

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 1000) -> None:
        commands_read, self._commands = os.pipe()
        self._events, events_write = os.pipe()
        # Chromium reads commands on fd 3 and writes answers and events on fd 4.
        self.process = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" "$@" 3<&{commands_read} 4>&{events_write}',
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            pass_fds=(commands_read, events_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(events_write)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self._answers: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._condition = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=self.session)

    def _read(self) -> None:
        buffered = b""
        while chunk := os.read(self._events, 1 << 16):
            buffered += chunk
            *messages, buffered = buffered.split(b"\0")
            for raw in messages:
                self._dispatch(json.loads(raw))

    def _dispatch(self, message: dict[str, Any]) -> None:
        params = message.get("params", {})
        method = message.get("method")
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry']['source']}: {params['entry']['text']}")
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.errors.append("console: " + " ".join(str(a.get("value", a)) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.errors.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
        with self._condition:
            if "id" in message:
                self._answers[message["id"]] = message
                self._condition.notify_all()

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params: Any) -> Any:
        """Send one command and return its result (AssertionError on a protocol error)."""
        with self._condition:
            self._next_id += 1
            number = self._next_id
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        with self._condition:
            if not self._condition.wait_for(lambda: number in self._answers, timeout):
                raise AssertionError(f"no answer to {method} within {timeout} s")
            answer = self._answers.pop(number)
        assert "error" not in answer, answer
        return answer["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate",
            session=self.session,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"still false after {timeout} s: {expression}\nerrors: {self.errors}")

    def navigate(self, url: str) -> None:
        """Load `url` in the page."""
        self.call("Page.navigate", session=self.session, url=url)

    def click(self, selector: str) -> None:
        """Click the first element matching a CSS selector."""
        self.wait_for(f"!!document.querySelector({json.dumps(selector)})")
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def type_into(self, selector: str, text: str) -> None:
        """Focus an input and type `text` into it as a user would."""
        self.wait_for(f"!!document.querySelector({json.dumps(selector)})")
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", session=self.session, text=text)

    def dom(self) -> str:
        """The rendered document as HTML."""
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: Path) -> None:
        """A PNG of what the window shows."""
        data = self.call("Page.captureScreenshot", session=self.session, format="png")
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        """End the browser."""
        try:
            self.call("Browser.close", timeout=10)
        except (AssertionError, OSError):
            self.process.kill()
        self.process.wait(timeout=20)
        os.close(self._commands)
        self._reader.join(timeout=5)
        os.close(self._events)
