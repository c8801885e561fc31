"""Find the external tools a test needs: skip when absent, fail under CI=true."""

import os
import shutil
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str) -> NoReturn:
    """Something a test needs is missing: skip it with `reason`, or fail under CI=true (where nothing may be
    missing)."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Return the path of `name` (a command on PATH, or a path to an executable); skip the test without it, or
    fail under CI=true."""
    path = shutil.which(name)
    if path:
        return path
    unavailable(f"{name} is not installed (.ci/run installs it)")
