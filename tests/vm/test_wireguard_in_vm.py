"""Runs the WireGuard files inside one boot of the throw-away VM (its Debian kernel has the
wireguard module; this host's has none), as ``test_ipip_in_vm.py`` does for the IPIP files: a
failure, not a skip, under ``CI=true`` when the VM cannot run.

One boot runs both ``test_wireguard.py`` (the managers on a hand-built underlay, four tests) and
``test_wireguard_agents.py`` (three felix-agents with etcd, pods through the plugin, five tests):
under TCG an agent takes a minute to start, so the VM is booted once. The inner figures (pings lost
in a live switch, the rotation gap, the time to the first encrypted packet) are printed here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_ipip_in_vm import run_inside_a_vm

pytestmark = pytest.mark.lab

TIMEOUT = 2400  # seconds: the agents' lab is ~3 minutes to build under TCG, each agent restart ~1
MEMORY_MB = 2048  # etcd, three agents and their pods used ~450 MB of the default 1 GB: room for iperf3 and peaks
FILES = "tests/vm/test_wireguard.py tests/vm/test_wireguard_agents.py"
FIGURES = ("WireGuard on", "WireGuard off", "key rotation:", "killed and restarted", "restarted node:")


@pytest.mark.timeout(TIMEOUT + 120)
def test_wireguard_inside_a_vm(tmp_path: Path) -> None:
    out = run_inside_a_vm(tmp_path, FILES, tests=4 + 5, memory_mb=MEMORY_MB, timeout=TIMEOUT, show_output=True)
    for line in out.splitlines():
        marks = [line.find(m) for m in FIGURES if m in line]
        if marks:
            print(line[min(marks):])
