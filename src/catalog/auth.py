"""API keys from the mounted Secret (re-read without restart) and the check every /api/ request passes."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, g, request
from limits import parse_many

from catalog.errors import Problem
from catalog.metrics import API_KEYS_LOADED, AUTH_FAILURES

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
MAX_FILE_BYTES = 64 * 1024
POLL_SECONDS = 2.0
SCOPES = frozenset({"read", "write"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Client:
    """A caller known by name (the Secret's file name), with its scopes and optional own rate limit."""

    name: str
    scopes: frozenset[str]
    rate_limit: str | None = None


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    client: Client


class KeyFileError(ValueError):
    """A key file does not parse; the message never holds the file's content."""


def parse_key_file(name: str, content: str) -> _Entry:
    """One Secret entry in any of the contract's three formats."""
    text = content.strip()
    if text.startswith("{"):
        try:
            document: Any = json.loads(text)
        except ValueError:
            raise KeyFileError("not valid JSON") from None
        if not isinstance(document, dict) or set(document) - {"key", "sha256", "scopes", "rate_limit"}:
            raise KeyFileError("JSON must be an object with key or sha256, and optional scopes and rate_limit")
        if ("key" in document) == ("sha256" in document):
            raise KeyFileError("JSON must have exactly one of key and sha256")
        scopes = document.get("scopes", ["read", "write"])
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= SCOPES or not all(
            isinstance(s, str) for s in scopes
        ):
            raise KeyFileError('scopes must be a non-empty list of "read" and "write"')
        rate_limit = document.get("rate_limit")
        if rate_limit is not None:
            try:
                if not isinstance(rate_limit, str) or not parse_many(rate_limit):
                    raise ValueError
            except ValueError:
                raise KeyFileError("rate_limit must be a rate limit such as '500/second'") from None
        client = Client(name, frozenset(scopes), rate_limit)
        if "key" in document:
            return _Entry(_digest_of_key(document["key"]), client)
        return _Entry(_digest_of_hex(document["sha256"]), client)
    client = Client(name, SCOPES)
    if text.startswith("sha256:"):
        return _Entry(_digest_of_hex(text.removeprefix("sha256:")), client)
    return _Entry(_digest_of_key(text), client)


def _digest_of_key(key: Any) -> bytes:
    if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
        raise KeyFileError(f"a key must be at least {MIN_KEY_LENGTH} characters without white space")
    return hashlib.sha256(key.encode()).digest()


def _digest_of_hex(value: Any) -> bytes:
    try:
        if not isinstance(value, str) or len(value) != 64:
            raise ValueError
        return bytes.fromhex(value)
    except ValueError:
        raise KeyFileError("sha256 must be 64 hexadecimal characters") from None


class KeyStore:
    """The keys of a kubelet-style Secret directory, re-read at most every POLL_SECONDS (never inotify:
    the kubelet swaps a `..data` symlink, which file watches miss)."""

    def __init__(self, directory: str, poll_seconds: float = POLL_SECONDS) -> None:
        self.directory = directory
        self.poll_seconds = poll_seconds
        self._entries: tuple[_Entry, ...] = ()
        self._signature: frozenset[tuple[bytes, Client]] | None = None
        self._loaded_at = float("-inf")
        self._reload_lock = threading.Lock()
        self.reload()

    @property
    def count(self) -> int:
        """Valid keys loaded now."""
        return len(self._entries)

    def refresh_if_due(self) -> None:
        """Re-read the directory if the poll interval has passed; never makes a request wait on another."""
        if time.monotonic() - self._loaded_at >= self.poll_seconds and self._reload_lock.acquire(blocking=False):
            try:
                self.reload()
            finally:
                self._reload_lock.release()

    def reload(self) -> None:
        """Read every entry of the directory now; skip (and name) files that do not parse."""
        self._loaded_at = time.monotonic()
        entries: list[_Entry] = []
        try:
            names = sorted(n for n in os.listdir(self.directory) if not n.startswith("."))
        except OSError as error:
            names = []
            if self._signature is None or self._entries:
                log.warning("api keys directory unreadable", extra={"directory": self.directory,
                                                                      "error_type": type(error).__name__})
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                if not os.path.isfile(path):
                    continue
                with open(path, encoding="utf-8") as key_file:
                    content = key_file.read(MAX_FILE_BYTES + 1)
                if len(content) > MAX_FILE_BYTES:
                    raise KeyFileError("larger than 64 KiB")
                entries.append(parse_key_file(name, content))
            except (KeyFileError, OSError, UnicodeDecodeError) as error:
                reason = str(error) if isinstance(error, KeyFileError) else type(error).__name__
                if self._signature is None or name not in {e.client.name for e in self._entries}:
                    log.warning("api key file skipped", extra={"file": name, "reason": reason})
        signature = frozenset((e.digest, e.client) for e in entries)
        if signature != self._signature:
            self._entries = tuple(entries)
            self._signature = signature
            API_KEYS_LOADED.set(len(entries))
            log.info("api keys loaded", extra={"count": len(entries), "clients": [e.client.name for e in entries]})

    def authenticate(self, presented: str) -> Client | None:
        """The client whose key this is; every stored digest is compared in constant time."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry.client
        return found


class Unauthenticated(Problem):
    """No key, or not a key of any client."""

    status, slug, title = 401, "unauthorized", "Unauthorized"


class Forbidden(Problem):
    """A valid key without the scope the request needs."""

    status, slug, title = 403, "forbidden", "Forbidden"


def key_store() -> KeyStore:
    """The key store of the current app."""
    return current_app.extensions["catalog.keys"]  # type: ignore[no-any-return]


def presented_key(header: str) -> str | None:
    """The key in the configured header, or an `Authorization: Bearer` token."""
    key = request.headers.get(header)
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def authenticate_request() -> None:
    """Before every /api/ request: 401 without a valid key, 403 without the method's scope."""
    if not request.path.startswith("/api/"):
        return
    store = key_store()
    store.refresh_if_due()
    header = current_app.config["SETTINGS"].api_key_header
    key = presented_key(header)
    client = store.authenticate(key) if key else None
    if client is None:
        reason = "invalid" if key else "missing"
        AUTH_FAILURES.labels(reason=reason).inc()
        current_app.extensions["catalog.auth_failed"](reason)
        detail = "The API key is not valid." if key else f"Send an API key in {header} or Authorization: Bearer."
        raise Unauthenticated(detail, headers={"WWW-Authenticate": 'Bearer realm="catalog"'})
    needed = "read" if request.method in READ_METHODS else "write"
    if needed not in client.scopes:
        g.client = client
        AUTH_FAILURES.labels(reason="forbidden").inc()
        raise Forbidden(f"The client {client.name!r} lacks the {needed!r} scope this request needs.")
    g.client = client


def init_app(app: Flask) -> None:
    """Load the keys and check every /api/ request."""
    app.extensions["catalog.keys"] = KeyStore(app.config["SETTINGS"].api_keys_dir)
    app.extensions.setdefault("catalog.auth_failed", lambda reason: None)
    app.before_request(authenticate_request)
