"""The guided demo (the README's first command) runs to the end and leaves a lab that `lab down`
removes completely."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab
NETCTL = str(Path(sys.executable).parent / "netctl")


def test_demo_runs_to_the_end_and_the_lab_comes_down() -> None:
    if os.geteuid() != 0:
        pytest.skip("the demo makes network namespaces: needs root")
    name = f"dm{uuid.uuid4().hex[:6]}"
    try:
        demo = subprocess.run([sys.executable, "-m", "netlab.demo", "--name", name], capture_output=True,
                              text=True, timeout=600)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        out = demo.stdout
        assert "30 of 30 allowed" in out, "before the policy every pod reaches every pod"
        assert "deny" in out.split("a Kubernetes NetworkPolicy")[1], "after it, some traffic is dropped"
        assert "knp.default.back-from-front-web" in out, "--explain names the deciding policy"
        assert "Established" in out, "node status shows the BGP sessions"
        assert f"lab down --name {name}" in out
    finally:
        down = subprocess.run([NETCTL, "lab", "down", "--name", name], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    leftovers = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                 if ns.startswith(f"{name}-")]
    assert leftovers == []
    assert not Path(f"/run/tortie-lab/{name}").exists()
