"""ExaBGP's priority relative to its agent (``ExaBGPProcess(nice=...)``, felix-agent ``--bgp-nice``):
the child runs at the agent's nice value plus the delta, and where raising a priority is refused
it still runs, at the agent's, with the reason kept for the agent's log. A stand-in command
takes ExaBGP's place (``sh -c 'sleep 30' ... server CONFIG``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bgp.api_process import ExaBGPProcess


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def process(tmp_path: Path, nice: int) -> ExaBGPProcess:
    return ExaBGPProcess(["/bin/sh", "-c", "exec sleep 30", "exabgp"], tmp_path, tmp_path / "exabgp.conf",
                         tmp_path / "exabgp.pid", "exabgp", nice=nice)


@pytest.mark.parametrize("delta", [0, 3, -5])
def test_exabgp_runs_at_the_agents_nice_plus_the_delta(tmp_path: Path, delta: int) -> None:
    if delta < 0 and os.geteuid() != 0:
        pytest.skip("raising a priority needs root (CAP_SYS_NICE)")
    exabgp = process(tmp_path, delta)
    exabgp.start({})
    try:
        assert exabgp.pid is not None
        assert nice_of(exabgp.pid) == os.getpriority(os.PRIO_PROCESS, 0) + delta
        assert exabgp.nice_refused == ""
    finally:
        exabgp.stop()


def test_a_refused_priority_leaves_exabgp_running_at_the_agents(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    exabgp = process(tmp_path, -5)
    exabgp.start({})
    try:
        assert exabgp.running() and exabgp.pid is not None
        assert nice_of(exabgp.pid) == os.getpriority(os.PRIO_PROCESS, 0)
        assert exabgp.nice_refused == "ExaBGP runs at the agent's priority, not -5: Operation not permitted"
    finally:
        exabgp.stop()
