"""The lab harness's pieces that need no root: keeping a lab's logs, waiting, naming, the agent's argv."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from netlab.agent import agent_argv
from netlab.cluster_lab import copy_logs
from netlab.lab import _NAME, unique_name
from netlab.probes import rewritten
from netlab.wait import WaitTimeout, wait_for


def test_kept_logs_leave_the_agents_sockets_behind(tmp_path: Path) -> None:
    work = tmp_path / "lab"
    (work / "n1").mkdir(parents=True)
    (work / "n1" / "agent.log").write_text("ready\n")
    with socket.socket(socket.AF_UNIX) as sock:  # what made ClusterLab.close fail with keep-logs
        sock.bind(str(work / "n1" / "cni.sock"))
        copy_logs(work, tmp_path / "kept")
    assert (tmp_path / "kept" / "n1" / "agent.log").read_text() == "ready\n"
    assert not (tmp_path / "kept" / "n1" / "cni.sock").exists()


def test_wait_for_returns_the_first_true_value_and_names_what_timed_out() -> None:
    values = iter([0, None, 7])
    assert wait_for(lambda: next(values), 5, "a value", interval=0) == 7
    with pytest.raises(WaitTimeout, match="waiting for the moon"):
        wait_for(lambda: False, 0.05, "the moon", interval=0.01)


def test_unique_names_are_valid_lab_names() -> None:
    names = {unique_name("tt") for _ in range(50)}
    assert len(names) == 50 and all(_NAME.fullmatch(n) for n in names)


def test_agent_argv_without_node_ip_lets_the_agent_detect_it() -> None:
    argv = agent_argv("n1", None, cni_socket="/s", state_dir="/d", log_level="warning", extra=["--bgp"])
    assert "--node-ip" not in argv and argv[-3:] == ["--log-level", "warning", "--bgp"]
    assert agent_argv("n1", "198.18.0.11", cni_socket="/s", state_dir="/d")[3:5] == ["--node-ip", "198.18.0.11/24"]


def test_rewritten_names_changed_and_new_chains_but_not_a_lingering_chain_gone() -> None:
    """The "no rule was rewritten" checks of the policy lab tests: a chain whose policy stopped
    being used by a previous test lingers, then goes (felix_agent.dataplane.linger); its going
    between the two readings is no rewrite, a new handle or a new chain is."""
    before = {"to-a": ["accept # handle 4"], "pol-old-out": ["drop # handle 9"]}
    assert rewritten(before, {"to-a": ["accept # handle 4"]}) == {}
    assert rewritten(before, {**before, "to-a": ["accept # handle 12"]}) == {"to-a": ["accept # handle 12"]}
    assert rewritten(before, {**before, "to-b": ["drop # handle 13"]}) == {"to-b": ["drop # handle 13"]}
