"""schemathesis against the live /openapi.json, deterministically (a fixed seed, a fixed number of examples
per operation, one worker, no example database, no time budget): no 5xx, no answer the document does not
describe, no schema-violating request served, and no schema-valid request refused by validation, so the
document is exactly as strict as the API."""

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import WRITER_KEY, SecretDir

SEED = 20261127
EXAMPLES_PER_OPERATION = 60
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
    )
)
CONFIG = """
[warnings]
# "mostly rejected generated data": the document says less than the validation enforces.
fail-on = ["validation_mismatch", "unsupported_regex"]

[checks.negative_data_rejection]
# schemathesis' defaults, and what else refuses a request that breaks the document: a body over 1 MiB
# (413), gunicorn's limits on the request line and header fields (414, 431), a failed If-Match (412).
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "412", "413", "414", "415", "422",
                     "428", "429", "431", "5xx"]
"""
# Problem types that mean "this request breaks a rule of the API". A schema-valid request may still meet
# the state of the data (404, 409, 412, a reused Idempotency-Key, a cursor this service did not make), but
# never one of these.
RULE_PROBLEMS = {"/problems/validation-error", "/problems/malformed-json", "/problems/unsupported-media-type"}


def finished_scenarios(report_dir: Path) -> Iterator[dict[str, Any]]:
    """The recorders of every scenario schemathesis ran, from its NDJSON event report."""
    (report,) = report_dir.glob("*.ndjson")
    for line in report.read_text().splitlines():
        event = json.loads(line)
        if "ScenarioFinished" in event:
            yield event["ScenarioFinished"]["recorder"]


def refused_as_breaking_a_rule(recorder: dict[str, Any]) -> Iterator[str]:
    """Each schema-valid (positive) case of a scenario that the API refused as breaking one of its rules."""
    for case_id, node in recorder.get("cases", {}).items():
        case = node["value"]
        if ((case.get("meta") or {}).get("generation") or {}).get("mode") != "positive":
            continue
        response = (recorder["interactions"].get(case_id) or {}).get("response") or {}
        content = response.get("content") or {}
        body = base64.b64decode(content["$base64"]) if isinstance(content, dict) and content else b""
        try:
            problem = json.loads(body)
        except ValueError:
            continue
        if isinstance(problem, dict) and problem.get("type") in RULE_PROBLEMS:
            sent = {k: case.get(k) for k in ("method", "path_parameters", "query", "headers", "body")}
            yield f"{recorder['label']}: {json.dumps(sent)[:600]} -> {json.dumps(problem)[:600]}"


def test_schemathesis_finds_no_failure_and_the_document_is_as_strict_as_the_api(
    gunicorn: Any, database_url: str, keys_dir: SecretDir, tmp_path: Path
) -> None:
    server = gunicorn(
        {
            "CATALOG_DATABASE_URL": database_url,
            "CATALOG_API_KEYS_DIR": str(keys_dir.path),
            "CATALOG_RATE_LIMIT": "100000/second",
        }
    )
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    report_dir = tmp_path / "report"
    result = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "schemathesis"),
            "--config-file",
            str(config),
            "run",
            f"{server.url}/openapi.json",
            "--header",
            f"X-Api-Key: {WRITER_KEY}",
            "--checks",
            CHECKS,
            "--max-examples",
            str(EXAMPLES_PER_OPERATION),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--report",
            "ndjson",
            "--report-dir",
            str(report_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated and int(generated.group(1)) >= 500, output[-2000:]
    print(f"schemathesis: {generated.group(1)} cases")
    refused = [
        line for recorder in finished_scenarios(report_dir) for line in refused_as_breaking_a_rule(recorder)
    ]
    assert not refused, "\n".join(refused[:10])
    assert server.stop() == 0
    assert all(
        line.get("status", 0) < 500 for line in server.log_lines() if line["logger"] == "catalog.access"
    )
