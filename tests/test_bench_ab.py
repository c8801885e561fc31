"""bench/ab.py, the side-by-side comparison of two versions: it runs a git revision and a source tree
together and reports the paired ratios, and leaves no worktree behind."""

import re
import subprocess
import sys

from tests.conftest import ROOT
from tests.tools import require_tool


def worktrees() -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in listed.stdout.splitlines() if line.startswith("worktree ")]


def test_a_revision_against_the_working_tree() -> None:
    require_tool("wrk")
    require_tool("redis-server")
    before = worktrees()
    done = subprocess.run(
        [sys.executable, "bench/ab.py", "HEAD", ".", "--rounds", "2", "--duration", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting A from" in done.stderr and f"starting B from {ROOT}" in done.stderr
    for server in ("floor", "A", "B"):
        assert re.search(rf"^{server} +\d+ +\d+ +[\d.]+ +[\d.]+$", done.stdout, re.M), done.stdout
    ratios = re.findall(
        r"^B/A +CPU us/request +median (\d\.\d{3}) +\(rounds: ([\d., ]+)\)$", done.stdout, re.M
    )
    assert len(ratios) == 1, done.stdout
    median, rounds = ratios[0]
    assert len(rounds.split(", ")) == 2 and 0.2 < float(median) < 5
    assert worktrees() == before


def test_an_unknown_version_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "bench/ab.py", "no-such-revision", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "'no-such-revision' is neither a source tree nor a git revision" in done.stderr
