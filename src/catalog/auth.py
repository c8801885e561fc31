"""API keys from the mounted Secret (re-read without restart) and the check every /api/ request passes."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask, Request
from limits import parse_many
from werkzeug.datastructures import Headers

from catalog.background import Background
from catalog.errors import Problem
from catalog.metrics import API_KEYS_LOADED, AUTH_FAILURES, export_clients

log = logging.getLogger(__name__)
# Bound once: by whether a key was sent (invalid) or not (missing).
AUTH_FAILED = {False: AUTH_FAILURES.labels(reason="missing"), True: AUTH_FAILURES.labels(reason="invalid")}
AUTH_FORBIDDEN = AUTH_FAILURES.labels(reason="forbidden")

MIN_KEY_LENGTH = 16
MAX_FILE_BYTES = 64 * 1024
# The contract: a change is in effect within 10 s in every worker. A thread of each worker re-reads the
# keys every POLL_SECONDS, and no request is answered from keys older than MAX_STALE_SECONDS (one that finds
# them older, e.g. because the thread was held up, re-reads them first).
POLL_SECONDS = 2.0
MAX_STALE_SECONDS = 5.0
SCAN_ATTEMPTS = 3
DATA_LINK = "..data"
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
SCOPES = frozenset({"read", "write"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CHALLENGE = 'Bearer realm="catalog"'


@dataclass(frozen=True)
class Client:
    """A caller known by name (the Secret's file name), with its scopes and optional own rate limit."""

    name: str
    scopes: frozenset[str]
    rate_limit: str | None = None


@dataclass(frozen=True)
class _Entry:
    """A loaded key: the SHA-256 of the key (never the key) and whose it is."""

    digest: bytes
    client: Client


class KeyFileError(ValueError):
    """A key file does not parse; the message never holds the file's content."""


def parse_key_file(name: str, content: str) -> _Entry:
    """One Secret entry in any of the contract's three formats."""
    text = content.strip()
    if text.startswith("{"):
        return _parse_json_entry(name, text)
    client = Client(name, SCOPES)
    if text.startswith("sha256:"):
        return _Entry(_digest_of_hex(text.removeprefix("sha256:")), client)
    return _Entry(_digest_of_key(text), client)


def _parse_json_entry(name: str, text: str) -> _Entry:
    """The JSON format: key or sha256, optional scopes and rate_limit."""
    try:
        document: Any = json.loads(text)
    except (ValueError, RecursionError):
        raise KeyFileError("not valid JSON") from None
    if not isinstance(document, dict) or set(document) - {"key", "sha256", "scopes", "rate_limit"}:
        raise KeyFileError("JSON must be an object with key or sha256, and optional scopes and rate_limit")
    if ("key" in document) == ("sha256" in document):
        raise KeyFileError("JSON must have exactly one of key and sha256")
    scopes = document.get("scopes", sorted(SCOPES))
    if (
        not isinstance(scopes, list)
        or not scopes
        or not all(isinstance(scope, str) and scope in SCOPES for scope in scopes)
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


def _digest_of_key(key: Any) -> bytes:
    """The SHA-256 of a usable key (16 characters or more, no white space)."""
    if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
        raise KeyFileError(f"a key must be at least {MIN_KEY_LENGTH} characters without white space")
    return hashlib.sha256(key.encode()).digest()


def _digest_of_hex(value: Any) -> bytes:
    """The digest a `sha256` entry spells in hex."""
    # bytes.fromhex alone would accept white space between digits and so a digest shorter than 32 bytes.
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
        raise KeyFileError("sha256 must be 64 hexadecimal characters")
    return bytes.fromhex(value)


@dataclass(frozen=True)
class _Scan:
    """What one read of the directory found."""

    entries: tuple[_Entry, ...]
    # Files that did not parse: name -> (fingerprint of what was read, reason without content).
    skipped: dict[str, tuple[bytes, str]]


class KeyStore:
    """The keys of a kubelet-style Secret directory, re-read every POLL_SECONDS off the request path.

    No inotify (the kubelet swaps a `..data` symlink, which file watches miss): a background thread of each
    worker (`poll`) re-reads the directory; a request that finds the keys older than MAX_STALE_SECONDS
    re-reads them itself. Keys are found by the SHA-256 of the presented key."""

    def __init__(
        self, directory: str, poll_seconds: float = POLL_SECONDS, max_stale_seconds: float = MAX_STALE_SECONDS
    ) -> None:
        self.directory = directory
        self.poll_seconds = poll_seconds
        self.max_stale_seconds = max(max_stale_seconds, poll_seconds)
        self._entries: tuple[_Entry, ...] = ()
        self._by_digest: dict[bytes, _Entry] = {}
        self._signature: frozenset[tuple[bytes, Client]] | None = None
        self._warned: dict[str, tuple[bytes, str]] = {}
        self._directory_unreadable = False
        self._fresh_as_of = float("-inf")
        self._reload_lock = threading.Lock()
        self.reload()

    @property
    def count(self) -> int:
        """Valid keys loaded now."""
        return len(self._entries)

    @property
    def clients(self) -> tuple[Client, ...]:
        """The clients of the keys loaded now (names and scopes; never a key or digest)."""
        return tuple(entry.client for entry in self._entries)

    def poll(self) -> None:
        """Re-read the directory (the background thread's task; one read at a time)."""
        with self._reload_lock:
            self.reload()

    def refresh_if_due(self) -> None:
        """Re-read the directory now if the keys are older than MAX_STALE_SECONDS (the thread fell behind);
        concurrent callers wait for the one read."""
        if time.monotonic() - self._fresh_as_of < self.max_stale_seconds:
            return
        with self._reload_lock:
            if time.monotonic() - self._fresh_as_of >= self.max_stale_seconds:
                self.reload()

    def reload(self) -> None:
        """Read every entry of the directory now; skip (and name, once) files that do not parse."""
        started = time.monotonic()
        scan = self._consistent_scan()
        if scan is None:
            return  # keep the keys; the next request or probe reads again
        for name, (fingerprint, reason) in scan.skipped.items():
            if self._warned.get(name) != (fingerprint, reason):
                log.warning("api key file skipped", extra={"file": name, "reason": reason})
        self._warned = scan.skipped
        signature = frozenset((e.digest, e.client) for e in scan.entries)
        if signature != self._signature:
            # The first entry of a digest wins (two files holding one key are one client, as before).
            by_digest: dict[bytes, _Entry] = {}
            for entry in scan.entries:
                by_digest.setdefault(entry.digest, entry)
            self._entries, self._by_digest = scan.entries, by_digest
            self._signature = signature
            API_KEYS_LOADED.set(len(scan.entries))
            names = [e.client.name for e in scan.entries]
            export_clients(names)
            if names:
                log.info("api keys loaded", extra={"count": len(names), "clients": names, "pid": os.getpid()})
            else:
                log.warning(
                    "no valid api key loaded: every /api/ request gets 401",
                    extra={"count": 0, "clients": [], "pid": os.getpid(), "directory": self.directory},
                )
        self._fresh_as_of = started

    def _data_target(self) -> str | None:
        """Where `..data` points now (None in a plain directory, as `make run` writes)."""
        try:
            return os.readlink(os.path.join(self.directory, DATA_LINK))
        except OSError:
            return None

    def _consistent_scan(self) -> _Scan | None:
        """A scan during which the kubelet did not swap `..data` (else files of both versions could mix,
        and a key present in both could be missed while the old version's directory is deleted); None if
        the Secret changed during every attempt."""
        for _attempt in range(SCAN_ATTEMPTS):
            before = self._data_target()
            scan = self._scan()
            if self._data_target() == before:
                return scan
        return None

    def _scan(self) -> _Scan:
        """Read each visible entry once; files that do not parse are noted with a reason, not loaded."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if not n.startswith("."))
        except OSError as error:
            if not self._directory_unreadable:
                log.warning(
                    "api keys directory unreadable",
                    extra={"directory": self.directory, "error_type": type(error).__name__},
                )
            self._directory_unreadable = True
            return _Scan((), {})
        self._directory_unreadable = False
        entries: list[_Entry] = []
        skipped: dict[str, tuple[bytes, str]] = {}
        for name in names:
            path = os.path.join(self.directory, name)
            raw = b""
            try:
                if not os.path.exists(path):
                    continue  # a link to a key the kubelet is removing
                if not os.path.isfile(path):
                    raise KeyFileError("not a regular file")
                with open(path, "rb") as key_file:
                    raw = key_file.read(MAX_FILE_BYTES + 1)
                if len(raw) > MAX_FILE_BYTES:
                    raise KeyFileError(f"larger than {MAX_FILE_BYTES // 1024} KiB")
                try:
                    content = raw.decode("utf-8-sig")
                except UnicodeDecodeError:
                    raise KeyFileError("not UTF-8 text") from None
                entries.append(parse_key_file(name, content))
            except FileNotFoundError:
                continue
            except (KeyFileError, OSError) as error:
                reason = str(error) if isinstance(error, KeyFileError) else type(error).__name__
                skipped[name] = (hashlib.sha256(raw).digest(), reason)
        return _Scan(tuple(entries), skipped)

    def authenticate(self, presented: str) -> Client | None:
        """The client whose key this is, found by the key's SHA-256: the lookup's timing depends on the
        digest, which a caller cannot steer towards a stored one, never on the key; the match is confirmed
        with a constant-time comparison."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(digest, entry.digest):
            return None
        return entry.client


class Unauthenticated(Problem):
    """No key, or not a key of any client."""

    status, slug, title = 401, "unauthorized", "Unauthorized"


class Forbidden(Problem):
    """A valid key without the scope the request needs."""

    status, slug, title = 403, "forbidden", "Forbidden"


def presented_key(headers: Headers, header: str) -> str | None:
    """The key in the configured header, or an `Authorization: Bearer` token."""
    key = headers.get(header)
    if key:
        return key
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


class Authenticator:
    """The check every /api/ request passes (called by the pipeline): who the caller is (401 otherwise,
    each failure counted against the caller's IP), then whether its key has the method's scope (403)."""

    def __init__(self, store: KeyStore, header: str) -> None:
        self.store = store
        self.header = header

    def identify(self, request: Request, count_failure: Callable[[Request], None]) -> Client:
        """The client whose key the request carries; Unauthenticated (after `count_failure`) if none."""
        self.store.refresh_if_due()
        key = presented_key(request.headers, self.header)
        client = self.store.authenticate(key) if key else None
        if client is not None:
            return client
        AUTH_FAILED[bool(key)].inc()
        count_failure(request)
        if key:  # RFC 6750 section 3: an error code only when credentials were sent
            raise Unauthenticated(
                "The API key is not valid.",
                headers={"WWW-Authenticate": f'{CHALLENGE}, error="invalid_token"'},
            )
        raise Unauthenticated(
            f"Send an API key in {self.header} or Authorization: Bearer.",
            headers={"WWW-Authenticate": CHALLENGE},
        )

    @staticmethod
    def authorize(client: Client, method: str) -> None:
        """Forbidden unless the client's key has the scope the method needs."""
        needed = "read" if method in READ_METHODS else "write"
        if needed not in client.scopes:
            AUTH_FORBIDDEN.inc()
            raise Forbidden(
                f"The client {client.name!r} lacks the {needed!r} scope this request needs.",
                headers={"WWW-Authenticate": f'{CHALLENGE}, error="insufficient_scope", scope="{needed}"'},
            )


def init_app(app: Flask) -> None:
    """Load the keys and re-read them in the background; the pipeline checks every /api/ request."""
    settings = app.config["SETTINGS"]
    store = KeyStore(settings.api_keys_dir)
    background: Background = app.extensions["catalog.background"]
    background.every("api-keys", store.poll_seconds, store.poll)
    app.extensions["catalog.keys"] = store
    app.extensions["catalog.authenticator"] = Authenticator(store, settings.api_key_header)
