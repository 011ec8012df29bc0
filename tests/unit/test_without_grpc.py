"""Unit tests need no gRPC: pure modules' tests pass in a pytest run where ``grpc`` cannot be imported.

The whole of tests/unit passes that way too (``python -m pytest -p tests.unit.without_grpc
tests/unit``); this runs a few modules that reach deep into the packages, to keep it quick.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PURE = ["tests/unit/test_ipam_check.py", "tests/unit/test_ipam_pools.py", "tests/unit/test_netctl_parse.py",
        "tests/unit/test_calc_routes.py"]


def test_the_blocker_really_blocks() -> None:
    out = subprocess.run([sys.executable, "-c", "import tests.unit.without_grpc, grpc"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "No module named 'grpc'" in out.stderr


def test_pure_tests_pass_without_grpc() -> None:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "tests.unit.without_grpc", *PURE],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "error" not in out.stdout.splitlines()[-1]
