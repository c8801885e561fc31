"""Find the external tools a test needs: skip when absent, fail under CI=true."""

import glob
import os
import re
import shutil

import pytest

IN_CI = os.environ.get("CI") == "true"


def require_tool(name: str, *directories: str) -> str:
    """Return the path of `name` on PATH, else in the first of `directories` (glob patterns, newest
    version first) that has it; skip the test without it, or fail under CI=true."""
    path = shutil.which(name)
    for pattern in directories:
        if path:
            break
        for directory in sorted(glob.glob(pattern), key=_version_order, reverse=True):
            path = shutil.which(name, path=directory)
            if path:
                break
    if path:
        return path
    reason = f"{name} is not installed (.ci/run installs it)"
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def _version_order(path: str) -> list[tuple[int, str]]:
    """Numbers compare as numbers: /usr/lib/postgresql/16 sorts after /usr/lib/postgresql/9."""
    return [(int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", path)]
