"""schemathesis against the live /openapi.json: no 5xx and no answer the document does not describe."""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import WRITER_KEY, SecretDir

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    )
)


def test_schemathesis_finds_no_failure(
    gunicorn: Any, database_url: str, keys_dir: SecretDir, tmp_path: Path
) -> None:
    server = gunicorn(
        {
            "CATALOG_DATABASE_URL": database_url,
            "CATALOG_API_KEYS_DIR": str(keys_dir.path),
            "CATALOG_RATE_LIMIT": "100000/second",
        }
    )
    result = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "schemathesis"),
            "run",
            f"{server.url}/openapi.json",
            "--header",
            f"X-Api-Key: {WRITER_KEY}",
            "--checks",
            CHECKS,
            "--max-examples",
            "25",
            "--max-time",
            "60",
            "--seed",
            "20261127",
            "--report-dir",
            str(tmp_path / "report"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated and int(generated.group(1)) >= 200, output[-2000:]
    print(f"schemathesis: {generated.group(1)} cases")
    assert server.stop() == 0
    assert all(
        line.get("status", 0) < 500 for line in server.log_lines() if line["logger"] == "catalog.access"
    )
