"""Find the external tools a test needs: skip when absent, fail under CI=true."""

import os
import shutil

import pytest

IN_CI = os.environ.get("CI") == "true"


def require_tool(name: str) -> str:
    """Return the path of `name` on PATH; skip the test without it, or fail under CI=true."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed (.ci/run installs it)"
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def require_executable(path: str) -> str:
    """Return `path` if it is an executable file; skip the test without it, or fail under CI=true."""
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    reason = f"{path} is missing (.ci/run builds it)"
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)
