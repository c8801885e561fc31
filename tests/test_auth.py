"""API keys from the mounted Secret, checked from outside the in-process app: the three formats, scopes,
headers, 401/403 problem bodies, fail closed, re-reading without restart, metrics, the access log's
client, the constant-time compare, and no key material anywhere the service writes."""

import dataclasses
import hashlib
import hmac
import inspect
import json
import logging
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import READER_KEY, WRITER_KEY, SecretDir, assert_problem, auth, product_body

from catalog import logs
from catalog.auth import KeyStore
from catalog.config import Settings

PRODUCTS = "/api/v1/products"
# Generous against a loaded machine; the service re-reads every 2 s and promises 10 s.
ROTATION_DEADLINE_SECONDS = 10.0
# Longer than the service's poll interval (2 s): the next request must re-read the directory.
PAST_POLL_INTERVAL = 2.2
SWAP_SECONDS = 3.0
# Rewrites a Secret with the shared fixture's kubelet-style writer (its source, without the heavy imports of
# conftest), as fast as it can: argv = directory, a key kept in every version, seconds to go on.
ROTATOR = f"""
import os, shutil, sys, time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
{inspect.getsource(SecretDir)}
secret, kept, end = SecretDir(Path(sys.argv[1])), sys.argv[2], time.monotonic() + float(sys.argv[3])
turn = 0
while time.monotonic() < end:
    turn += 1
    secret.write({{"writer": kept, f"client-{{turn % 3}}": f"rotating-key-{{turn:010d}}"}})
"""


def new_key() -> str:
    """A random key nobody else uses (so a search for it in output cannot hit by chance)."""
    return secrets.token_urlsafe(24)


def sha256_hex(key: str) -> str:
    """What `printf %s "$KEY" | sha256sum` prints."""
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(autouse=True, scope="module")
def json_logging() -> None:
    """Route logging to the app's JSON handler before any test builds an app, so caplog keeps its handler."""
    logs.configure("INFO")


@pytest.fixture
def make_app(settings: Settings, build_app: Callable[[Settings], Any]) -> Callable[..., Any]:
    """Build another app on the test database: `make_app(**settings_overrides)`."""

    def build(**overrides: Any) -> Any:
        return build_app(dataclasses.replace(settings, **overrides))

    return build


def access_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of an access line's record (method, path, status, duration_ms, client, request_id)."""
    return dict(record.__dict__[logs.ACCESS_FIELDS])


def metric(client: Any, name: str, **labels: str) -> float:
    """A sample's value in /metrics (0 when absent)."""
    text = client.get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def failures(client: Any) -> dict[str, float]:
    """catalog_auth_failures_total by reason."""
    return {
        reason: metric(client, "catalog_auth_failures_total", reason=reason)
        for reason in ("missing", "invalid", "forbidden")
    }


def create_product(client: Any) -> str:
    """Create a product as the writer; its id."""
    response = client.post(PRODUCTS, json=product_body(), headers=auth(WRITER_KEY))
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


def skipped_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The 'file skipped' warnings of every phase of the test so far."""
    records = caplog.get_records("setup") + caplog.get_records("call")
    return [r for r in records if r.getMessage() == "api key file skipped"]


def wait_for(condition: Callable[[], bool], deadline_seconds: float) -> float:
    """Poll until `condition()`; the seconds it took (fails after the deadline)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < deadline_seconds, "not in effect before the deadline"
        time.sleep(0.1)
    return time.monotonic() - started


class TestFormats:
    """The contract's three formats, and the layouts the directory may have."""

    def test_a_bare_key_reads_and_writes(self, keys_dir: SecretDir, client: Any) -> None:
        assert client.get(PRODUCTS, headers=auth(WRITER_KEY)).status_code == 200
        assert client.post(PRODUCTS, json=product_body(), headers=auth(WRITER_KEY)).status_code == 201

    def test_a_sha256_entry_accepts_the_key_it_hashes(
        self, keys_dir: SecretDir, make_app: Callable[..., Any]
    ) -> None:
        key, upper_key = new_key(), new_key()
        keys_dir.write(
            {"hashed": f"sha256:{sha256_hex(key)}", "upper": f"sha256:{sha256_hex(upper_key).upper()}"}
        )
        client = make_app().test_client()
        assert client.get(PRODUCTS, headers=auth(key)).status_code == 200
        assert client.post(PRODUCTS, json=product_body(), headers=auth(key)).status_code == 201
        assert client.get(PRODUCTS, headers=auth(upper_key)).status_code == 200
        # The digest itself is not a key.
        assert client.get(PRODUCTS, headers=auth(sha256_hex(key))).status_code == 401

    def test_json_entries_carry_scopes_and_an_own_rate_limit(
        self, keys_dir: SecretDir, make_app: Callable[..., Any]
    ) -> None:
        viewer, hashed_writer, limited = new_key(), new_key(), new_key()
        keys_dir.write(
            {
                "viewer": json.dumps({"key": viewer, "scopes": ["read"]}),
                "hashed-writer": json.dumps(
                    {"sha256": sha256_hex(hashed_writer), "scopes": ["read", "write"]}
                ),
                "limited": json.dumps({"key": limited, "rate_limit": "7/minute"}),
            }
        )
        client = make_app().test_client()
        assert client.get(PRODUCTS, headers=auth(viewer)).status_code == 200
        assert client.post(PRODUCTS, json=product_body(), headers=auth(viewer)).status_code == 403
        assert client.post(PRODUCTS, json=product_body(), headers=auth(hashed_writer)).status_code == 201
        limited_answer = client.get(PRODUCTS, headers=auth(limited))
        assert limited_answer.status_code == 200
        assert limited_answer.headers["RateLimit-Limit"] == "7"
        # Without scopes a JSON entry reads and writes; without rate_limit it has CATALOG_RATE_LIMIT.
        assert client.post(PRODUCTS, json=product_body(), headers=auth(limited)).status_code == 201
        assert client.get(PRODUCTS, headers=auth(viewer)).headers["RateLimit-Limit"] == "100000"

    def test_surrounding_white_space_and_a_byte_order_mark_are_trimmed(
        self, keys_dir: SecretDir, make_app: Callable[..., Any]
    ) -> None:
        spaced, crlf, bom, hashed = new_key(), new_key(), new_key(), new_key()
        keys_dir.write(
            {
                "spaced": f"  \n\t{spaced} \n\n",
                "crlf": f"{crlf}\r\n",
                "bom": f"\ufeff{bom}\n",
                "hashed": f"\n sha256:{sha256_hex(hashed)}\n",
            }
        )
        client = make_app().test_client()
        for key in (spaced, crlf, bom, hashed):
            assert client.get(PRODUCTS, headers=auth(key)).status_code == 200
        assert metric(client, "catalog_api_keys_loaded") == 4

    def test_the_kubelet_layout_and_a_plain_directory_both_load(
        self, keys_dir: SecretDir, tmp_path: Path, make_app: Callable[..., Any]
    ) -> None:
        # The fixture really lays the Secret out as the kubelet does: links through ..data.
        assert (keys_dir.path / "..data").is_symlink()
        assert (keys_dir.path / "writer").is_symlink()
        assert str((keys_dir.path / "writer").readlink()) == "..data/writer"
        assert make_app().test_client().get(PRODUCTS, headers=auth(WRITER_KEY)).status_code == 200
        # `make run` writes plain files.
        plain = tmp_path / "plain"
        plain.mkdir()
        key = new_key()
        (plain / "dev").write_text(key + "\n")
        client = make_app(api_keys_dir=str(plain)).test_client()
        assert client.get(PRODUCTS, headers=auth(key)).status_code == 200


class TestUnusableFiles:
    """Files that are no key: skipped, named once in a warning, never quoted."""

    def test_each_is_skipped_with_one_warning_naming_the_file_never_its_content(
        self, keys_dir: SecretDir, make_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
    ) -> None:
        good = new_key()
        secret_part = new_key()
        bad = {
            "short": "abc123def456789",  # 15 characters
            "short-json": json.dumps({"key": "abc123def456789"}),
            "not-json": "{" + secret_part,
            "both": json.dumps({"key": secret_part, "sha256": sha256_hex(secret_part)}),
            "unknown-field": json.dumps({"key": secret_part, "admin": True}),
            "bad-scope": json.dumps({"key": secret_part, "scopes": ["admin"]}),
            "empty-scopes": json.dumps({"key": secret_part, "scopes": []}),
            "unhashable-scopes": json.dumps({"key": secret_part, "scopes": [["read"]]}),
            "bad-rate-limit": json.dumps({"key": secret_part, "rate_limit": "lots"}),
            "short-hash": "sha256:" + sha256_hex(secret_part)[:63],
            "spaced-hash": "sha256:" + " ".join([sha256_hex(secret_part)[:4]] * 13),  # 64 characters
            "json-spaced-hash": json.dumps({"sha256": " ".join([sha256_hex(secret_part)[:4]] * 13)}),
            "inner-space": f"{secret_part} {secret_part}",
            "deep-json": '{"key": ' + "[" * 50_000 + "]" * 50_000 + "}",
            "empty": "",
            "too-large": secret_part * 3000,
        }
        keys_dir.write({"good": good, **bad})
        (keys_dir.path / "..data" / "latin-1").write_bytes(b"\xff\xfe" + secret_part.encode())
        (keys_dir.path / "latin-1").symlink_to("..data/latin-1")
        caplog.clear()
        client = make_app().test_client()
        assert client.get(PRODUCTS, headers=auth(good)).status_code == 200
        assert metric(client, "catalog_api_keys_loaded") == 1
        warned = [r.__dict__["file"] for r in skipped_warnings(caplog)]
        assert sorted(warned) == sorted([*bad, "latin-1"])
        for record in skipped_warnings(caplog):
            assert record.levelno == logging.WARNING
            line = logs.JsonLineFormatter().format(record)
            assert record.__dict__["file"] in line
            assert secret_part not in line and sha256_hex(secret_part) not in line
            assert "abc123def456789" not in line
        # Polls go on; a file still broken the same way is not warned about again.
        time.sleep(PAST_POLL_INTERVAL)
        assert client.get(PRODUCTS, headers=auth(good)).status_code == 200
        assert len(skipped_warnings(caplog)) == len(bad) + 1
        # Changed (and still broken), it is warned about once more.
        keys_dir.write({"good": good, **bad, "short": "still-too-short"})
        time.sleep(PAST_POLL_INTERVAL)
        assert client.get(PRODUCTS, headers=auth(good)).status_code == 200
        assert [r.__dict__["file"] for r in skipped_warnings(caplog)][len(bad) + 1 :] == ["short"]

    def test_none_of_the_skipped_keys_authenticates(
        self, keys_dir: SecretDir, make_app: Callable[..., Any]
    ) -> None:
        short = "abc123def456789"
        spaced_hash_key = new_key()
        keys_dir.write(
            {
                "writer": WRITER_KEY,
                "short": short,
                "spaced-hash": "sha256:" + " ".join([sha256_hex(spaced_hash_key)[:4]] * 13),
            }
        )
        client = make_app().test_client()
        assert client.get(PRODUCTS, headers=auth(short)).status_code == 401
        assert client.get(PRODUCTS, headers=auth(spaced_hash_key)).status_code == 401
        assert metric(client, "catalog_api_keys_loaded") == 1

    def test_hidden_files_are_ignored_without_a_warning(
        self, keys_dir: SecretDir, make_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
    ) -> None:
        hidden = new_key()
        keys_dir.write({"writer": WRITER_KEY, ".hidden": hidden, ".broken": "x"})
        assert (keys_dir.path / ".hidden").is_symlink()
        caplog.clear()
        client = make_app().test_client()
        assert client.get(PRODUCTS, headers=auth(hidden)).status_code == 401
        assert client.get(PRODUCTS, headers=auth(WRITER_KEY)).status_code == 200
        assert metric(client, "catalog_api_keys_loaded") == 1
        assert skipped_warnings(caplog) == []


class TestHeaders:
    """Where a request may carry its key."""

    def test_x_api_key_and_bearer_are_accepted(self, client: Any) -> None:
        assert client.get(PRODUCTS, headers={"X-Api-Key": WRITER_KEY}).status_code == 200
        assert client.get(PRODUCTS, headers={"Authorization": f"Bearer {WRITER_KEY}"}).status_code == 200
        assert client.get(PRODUCTS, headers={"Authorization": f"bearer {READER_KEY}"}).status_code == 200
        assert client.get(PRODUCTS, headers={"Authorization": f"Basic {WRITER_KEY}"}).status_code == 401

    def test_a_custom_header_replaces_x_api_key(self, make_app: Callable[..., Any]) -> None:
        client = make_app(api_key_header="X-Catalog-Token").test_client()
        assert client.get(PRODUCTS, headers={"X-Catalog-Token": WRITER_KEY}).status_code == 200
        assert client.get(PRODUCTS, headers={"X-Api-Key": WRITER_KEY}).status_code == 401
        assert client.get(PRODUCTS, headers={"Authorization": f"Bearer {WRITER_KEY}"}).status_code == 200
        assert "X-Catalog-Token" in assert_problem(client.get(PRODUCTS), 401)["detail"]

    def test_the_header_comes_from_catalog_api_key_header(self) -> None:
        assert (
            Settings.from_env({"CATALOG_API_KEY_HEADER": "X-Catalog-Token"}).api_key_header
            == "X-Catalog-Token"
        )
        assert Settings.from_env({}).api_key_header == "X-Api-Key"


class TestAnswers:
    """401, 403, open operational endpoints, and the access line's client."""

    def test_missing_key_is_401_with_a_challenge_and_a_problem_body(self, client: Any) -> None:
        before = failures(client)
        response = client.get(PRODUCTS)
        body = assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="catalog"'
        assert "X-Api-Key" in body["detail"]
        assert failures(client)["missing"] - before["missing"] == 1

    @pytest.mark.parametrize(
        "headers",
        [{"X-Api-Key": "wrong-key-0123456789abcdef"}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}],
    )
    def test_invalid_key_is_401_with_a_challenge_and_a_problem_body(
        self, client: Any, headers: dict[str, str]
    ) -> None:
        before = failures(client)
        response = client.get(PRODUCTS, headers=headers)
        assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="catalog"')
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        after = failures(client)
        assert (after["invalid"] - before["invalid"], after["missing"] - before["missing"]) == (1, 0)

    @pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
    def test_a_read_only_client_gets_403_for_writes(
        self, client: Any, method: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        product_id = create_product(client)
        path = PRODUCTS if method == "POST" else f"{PRODUCTS}/{product_id}"
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        before = failures(client)
        caplog.clear()
        response = client.open(
            path,
            method=method,
            data=json.dumps(product_body()),
            headers={**auth(READER_KEY), "Content-Type": content_type},
        )
        body = assert_problem(response, 403)
        assert "reader" in body["detail"] and "write" in body["detail"]
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
        assert failures(client)["forbidden"] - before["forbidden"] == 1
        access = [access_fields(r) for r in caplog.records if r.name == logs.ACCESS_LOGGER]
        assert [line["client"] for line in access if line["status"] == 403] == ["reader"]
        # Nothing was written.
        assert client.get(f"{PRODUCTS}/{product_id}", headers=auth(READER_KEY)).status_code == 200

    def test_a_read_only_client_reads(self, client: Any) -> None:
        product_id = create_product(client)
        assert client.get(PRODUCTS, headers=auth(READER_KEY)).status_code == 200
        assert client.get(f"{PRODUCTS}/{product_id}", headers=auth(READER_KEY)).status_code == 200
        assert client.head(f"{PRODUCTS}/{product_id}", headers=auth(READER_KEY)).status_code == 200

    @pytest.mark.parametrize(
        "path", ["/livez", "/healthz", "/readyz", "/metrics", "/version", "/openapi.json", "/docs"]
    )
    def test_operational_endpoints_need_no_key(self, client: Any, path: str) -> None:
        before = failures(client)
        assert client.get(path).status_code == 200
        assert client.get(path, headers=auth("wrong-key-0123456789abcdef")).status_code == 200
        assert failures(client) == before

    def test_the_access_line_names_the_client_never_the_key(
        self, client: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.clear()
        client.get(PRODUCTS, headers=auth(WRITER_KEY))
        client.get(PRODUCTS, headers={"Authorization": f"Bearer {READER_KEY}"})
        client.get(PRODUCTS, headers=auth("wrong-key-0123456789abcdef"))
        client.get(PRODUCTS)
        access = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
        assert [(access_fields(r)["status"], access_fields(r)["client"]) for r in access] == [
            (200, "writer"),
            (200, "reader"),
            (401, None),
            (401, None),
        ]
        for record in access:
            assert (
                json.loads(logs.JsonLineFormatter().format(record))["client"]
                == access_fields(record)["client"]
            )


class TestFailClosed:
    """No valid key: nothing under /api/ answers and the pod is not ready."""

    def test_no_key_means_401_everywhere_and_not_ready_until_a_key_arrives(
        self, keys_dir: SecretDir, make_app: Callable[..., Any]
    ) -> None:
        keys_dir.write({"short": "too-short", ".hidden": WRITER_KEY})
        client = make_app().test_client()
        assert metric(client, "catalog_api_keys_loaded") == 0
        for key in (WRITER_KEY, READER_KEY, "too-short", ""):
            assert_problem(client.get(PRODUCTS, headers=auth(key)), 401)
        assert_problem(client.post(PRODUCTS, json=product_body(), headers=auth(WRITER_KEY)), 401)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.get_json()["status"] == "unavailable"
        assert ready.get_json()["checks"]["api_keys"] == "failing"
        assert client.get("/livez").status_code == 200

        new = new_key()
        keys_dir.write({"first": new})
        took = wait_for(
            lambda: client.get(PRODUCTS, headers=auth(new)).status_code == 200, ROTATION_DEADLINE_SECONDS
        )
        assert took < ROTATION_DEADLINE_SECONDS
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.get_json()["checks"]["api_keys"] == "ok"
        assert metric(client, "catalog_api_keys_loaded") == 1

    def test_a_missing_directory_fails_closed(self, tmp_path: Path, make_app: Callable[..., Any]) -> None:
        client = make_app(api_keys_dir=str(tmp_path / "absent")).test_client()
        assert_problem(client.get(PRODUCTS, headers=auth(WRITER_KEY)), 401)
        assert client.get("/readyz").status_code == 503
        assert client.get("/readyz").get_json()["checks"]["api_keys"] == "failing"


class TestRereading:
    """Changes of the Secret take effect without restart, also in an idle worker and mid-swap."""

    def test_keys_are_reread_off_the_request_path(self, keys_dir: SecretDir, app: Any) -> None:
        """No request and no probe: a thread of the worker re-reads the Secret (so the gauge of an idle
        worker is current too) and requests never scan the directory themselves."""
        store = app.extensions["catalog.keys"]
        assert store.count == 2
        keys_dir.write({"rotated": new_key()})
        took = wait_for(lambda: store.count == 1, ROTATION_DEADLINE_SECONDS)
        assert [client.name for client in store.clients] == ["rotated"]
        print(f"re-read by the worker's thread {took:.1f} s after the change")

    def test_added_changed_and_removed_keys_take_effect_without_restart(
        self, keys_dir: SecretDir, client: Any
    ) -> None:
        old, new = WRITER_KEY, new_key()
        keys_dir.write({"writer": old, "writer-next": new, "reader": READER_KEY})
        wait_for(
            lambda: client.get(PRODUCTS, headers=auth(new)).status_code == 200, ROTATION_DEADLINE_SECONDS
        )
        # While both are present both work.
        assert client.get(PRODUCTS, headers=auth(old)).status_code == 200
        assert metric(client, "catalog_api_keys_loaded") == 3
        # Changed: the reader becomes read-write.
        keys_dir.write({"writer": old, "writer-next": new, "reader": json.dumps({"key": READER_KEY})})
        wait_for(
            lambda: client.post(PRODUCTS, json=product_body(), headers=auth(READER_KEY)).status_code == 201,
            ROTATION_DEADLINE_SECONDS,
        )
        # Removed.
        keys_dir.write({"writer-next": new})
        wait_for(
            lambda: client.get(PRODUCTS, headers=auth(old)).status_code == 401, ROTATION_DEADLINE_SECONDS
        )
        assert client.get(PRODUCTS, headers=auth(READER_KEY)).status_code == 401
        assert client.get(PRODUCTS, headers=auth(new)).status_code == 200
        assert metric(client, "catalog_api_keys_loaded") == 1

    def test_an_idle_worker_answers_its_first_request_from_fresh_keys(
        self, keys_dir: SecretDir, client: Any
    ) -> None:
        assert client.get(PRODUCTS, headers=auth(WRITER_KEY)).status_code == 200
        new = new_key()
        keys_dir.write({"rotated": new})
        # No request, no probe: nothing re-reads. Then the very first request must see the new Secret.
        time.sleep(PAST_POLL_INTERVAL)
        assert client.get(PRODUCTS, headers=auth(WRITER_KEY)).status_code == 401
        assert client.get(PRODUCTS, headers=auth(new)).status_code == 200

    def test_readyz_rereads_too(self, keys_dir: SecretDir, client: Any) -> None:
        assert client.get("/readyz").status_code == 200
        keys_dir.write({})
        time.sleep(PAST_POLL_INTERVAL)
        assert client.get("/readyz").status_code == 503

    def test_a_key_on_both_sides_of_a_swap_is_never_missed_mid_swap(self, keys_dir: SecretDir) -> None:
        # Reads racing the kubelet's writer (in a process of its own, so truly in parallel): `..data` is
        # renamed to a new version and the old version's directory deleted while a read may be resolving
        # a key through it.
        rotator = subprocess.Popen(
            [sys.executable, "-c", ROTATOR, str(keys_dir.path), WRITER_KEY, str(SWAP_SECONDS)]
        )
        store = KeyStore(str(keys_dir.path))
        loaded: set[tuple[str, ...]] = set()
        missed = reads = 0
        try:
            while rotator.poll() is None:
                store.poll()
                reads += 1
                loaded.add(tuple(sorted(client.name for client in store.clients)))
                missed += store.authenticate(WRITER_KEY) is None
        finally:
            rotator.kill()
            rotator.wait()
        assert missed == 0, f"{missed} of {reads} reads lost a key present in every version"
        assert len(loaded) >= 3  # the reads did follow the rotation


class TestComparison:
    """A key is found by its SHA-256 (a dict lookup, whose timing the caller cannot steer: it depends on the
    digest, not on the key) and the match is confirmed with hmac.compare_digest; the key itself is never
    compared."""

    def test_the_digest_finds_the_client_and_hmac_compare_digest_confirms_it(
        self, keys_dir: SecretDir, make_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        third = new_key()
        keys_dir.write({"writer": WRITER_KEY, "reader": READER_KEY, "third": f"sha256:{sha256_hex(third)}"})
        client = make_app().test_client()
        real_compare = hmac.compare_digest
        calls: list[tuple[Any, Any]] = []

        def counting_compare(a: Any, b: Any) -> bool:
            calls.append((a, b))
            return real_compare(a, b)

        monkeypatch.setattr(hmac, "compare_digest", counting_compare)
        for presented, status in ((READER_KEY, 200), (third, 200), ("wrong-key-0123456789abcdef", 401)):
            calls.clear()
            assert client.get(PRODUCTS, headers=auth(presented)).status_code == status
            presented_digest = hashlib.sha256(presented.encode()).digest()
            ours = [(a, b) for a, b in calls if a == presented_digest]
            # The found digest is confirmed in constant time; an unknown key finds nothing to compare.
            assert ours == ([(presented_digest, presented_digest)] if status == 200 else [])
            assert all(presented not in (a, b) for a, b in calls)


class TestNoKeyMaterial:
    """Keys and their digests appear nowhere the service writes or answers."""

    def test_no_log_line_body_header_or_metric_holds_a_key(
        self,
        keys_dir: SecretDir,
        make_app: Callable[..., Any],
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        plain, viewer, hashed = new_key(), new_key(), new_key()
        short, broken, guessed = new_key()[:12], new_key(), new_key()
        keys_dir.write(
            {
                "plain": plain,
                "viewer": json.dumps({"key": viewer, "scopes": ["read"]}),
                "hashed": f"sha256:{sha256_hex(hashed)}",
                "short": short,
                "broken": json.dumps({"key": broken, "scopes": "read"}),
            }
        )
        caplog.clear()
        client = make_app().test_client()
        answers = [
            client.get(PRODUCTS, headers=auth(plain)),
            client.get(f"{PRODUCTS}/nope", headers=auth(plain)),
            client.post(PRODUCTS, json={"sku": "bad"}, headers=auth(plain)),
            client.post(PRODUCTS, data="{", headers={**auth(plain), "Content-Type": "application/json"}),
            client.post(PRODUCTS, json=product_body(), headers=auth(viewer)),
            client.get(PRODUCTS, headers={"Authorization": f"Bearer {hashed}"}),
            client.get(PRODUCTS, headers=auth(short)),
            client.get(PRODUCTS, headers=auth(broken)),
            client.get(PRODUCTS, headers=auth(guessed)),
            client.get(PRODUCTS, headers={"Authorization": f"Bearer {guessed}"}),
            client.get(PRODUCTS),
            client.get("/readyz"),
        ]
        assert [a.status_code for a in answers] == [
            200,
            404,
            422,
            400,
            403,
            200,
            401,
            401,
            401,
            401,
            401,
            200,
        ]
        exposed = [a.get_data(as_text=True) for a in answers]
        exposed += [f"{name}: {value}" for a in answers for name, value in a.headers.items()]
        exposed.append(client.get("/metrics").get_data(as_text=True))
        formatter = logs.JsonLineFormatter()
        records = caplog.get_records("setup") + caplog.get_records("call")
        assert any(r.getMessage() == "api key file skipped" for r in records)
        assert any(r.name == logs.ACCESS_LOGGER for r in records)
        exposed += [formatter.format(r) + repr(r.__dict__) for r in records]
        exposed += list(capsys.readouterr())
        everything = "\n".join(exposed)
        for key in (plain, viewer, hashed, short, broken, guessed):
            assert key not in everything
            assert sha256_hex(key) not in everything
            assert sha256_hex(key).upper() not in everything
