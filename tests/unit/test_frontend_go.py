"""The compiled front end's own tests (``frontend/*_test.go``: framing, partial reads, a missing
socket, an oversized reply, an agent that closes early, the accept and answer deadlines, the
in-process exec with the same stdin), run with the Go toolchain as part of the suite."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from netctl import frontend

FRONTEND = Path(__file__).resolve().parents[2] / "frontend"


def test_go_tests_pass() -> None:
    go = frontend.go_tool()
    if go is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no Go toolchain in CI: scripts/install-deps.sh installs golang-go")
        pytest.skip("no Go toolchain (apt-get install golang-go): the compiled front end's tests need it")
    env = {**os.environ, "CGO_ENABLED": "0", "GOPROXY": "off", "GOFLAGS": "-mod=mod"}
    with tempfile.TemporaryDirectory(prefix="tortie-gotest-") as scratch:
        if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
            env["GOCACHE"] = str(Path(scratch) / "cache")
        if not env.get("GOPATH") and not env.get("HOME"):
            env["GOPATH"] = str(Path(scratch) / "gopath")
        done = subprocess.run([go, "test", "-count=1", "./..."], cwd=FRONTEND, env=env, capture_output=True,
                              text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
