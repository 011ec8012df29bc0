"""The compiled front end when no agent starts the call: with the agent absent, refusing
connections (a dead agent's socket file), or stopped (SIGSTOP of a real felix-agent), it execs the
Python in-process path, and every command (ADD, CHECK, GC, DEL, VERSION, STATUS) gets the answer
the Python in-process path gives. A stopped agent that wakes up afterwards does not do the call a
second time (the relay exchange's accept deadline)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab.cni import Attachment, exec_plugin, network_config
from netlab.wait import wait_for
from tests.lab.tortie_support import TortieLab, host_ifname

pytestmark = pytest.mark.lab

ACCEPT = "0.3"  # seconds a stopped agent gets to start a call (the default is 2)
COMMANDS = ("ADD", "CHECK", "GC", "DEL", "VERSION", "STATUS")


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="tf") as tl:
        tl.use_front_end("compiled")
        yield tl


@pytest.fixture(autouse=True)
def empty_node(tl: TortieLab) -> Iterator[None]:
    yield
    tl.use_agent(False)
    tl.reset()


def normalized(value: Any) -> Any:
    """An answer without what differs between two identical ADDs: the container side's random MAC."""
    if isinstance(value, dict):
        return {k: "MAC" if k == "mac" and "sandbox" in value else normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def answers(tl: TortieLab, plugin: str, sock: str, box_path: str, container_id: str,
            env: dict[str, str] | None = None) -> list[tuple[str, int, Any]]:
    """Each command's (exit status, decoded answer) for one attachment of a fixed address."""
    conflist = tl.conflist(version="1.1.0", ipv6=False, agent_socket=sock)
    attachment = Attachment(container_id, box_path, "eth0", {"IP": "10.244.200.7"})
    results: list[tuple[str, int, Any]] = []
    prev: dict[str, Any] | None = None
    for command in COMMANDS:
        extra = ({"cni.dev/valid-attachments": [{"containerID": container_id, "ifname": "eth0"}]}
                 if command == "GC" else None)
        config: Any = network_config(conflist, 0, prev_result=prev if command in ("CHECK", "DEL") else None,
                                     extra=extra)
        if command == "VERSION":
            config = {"cniVersion": "1.0.0"}
        run = exec_plugin(tl.bin_dir / plugin, command, config, attachment, cni_path=tl.cni_path,
                          in_netns=tl.node(1).netns, extra_env=env)
        if command == "ADD" and run.ok:
            prev = run.output
        results.append((command, run.returncode, normalized(run.output)))
    return results


@contextlib.contextmanager
def refusing_socket(tl: TortieLab) -> Iterator[str]:
    """A socket file nobody listens on: what a crashed agent leaves."""
    path = tl.work / "refusing.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def stopped_agent(tl: TortieLab) -> Iterator[str]:
    """A real felix-agent, frozen by SIGSTOP with its socket open; thawed on exit."""
    tl.use_agent(True)
    pid = tl.agent_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 5,
                 "the agent to stop")
        yield str(tl.socket())
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("plugin", ["tortie", "tortie-ipam"])
@pytest.mark.parametrize("condition", ["absent", "refusing", "stopped"])
def test_compiled_front_end_answers_as_the_in_process_path(tl: TortieLab, condition: str, plugin: str) -> None:
    with tl.sandbox() as box:
        # The reference: today's Python front end on a node without an agent.
        tl.use_front_end("python")
        cid = f"fallback-{condition}-{plugin}"
        expected = answers(tl, plugin, str(tl.work / "absent.sock"), box.path, cid)
        assert [status for _, status, _ in expected] == [0] * len(COMMANDS), expected
        tl.use_front_end("compiled")
        env = {"TORTIE_RELAY_ACCEPT_TIMEOUT": ACCEPT}
        if condition == "absent":
            got = answers(tl, plugin, str(tl.work / "absent.sock"), box.path, cid, env)
        elif condition == "refusing":
            with refusing_socket(tl) as sock:
                got = answers(tl, plugin, sock, box.path, cid, env)
        else:
            with stopped_agent(tl) as sock:
                got = answers(tl, plugin, sock, box.path, cid, env)
            # Thawed, the agent finds every queued call past its accept deadline and starts none:
            # a call it did now would be a second one (an ADD after the DEL, say). A call of its
            # own afterwards shows it is awake and through its queue.
            with tl.sandbox() as other:
                served = Attachment("after-thaw", other.path, "eth0", {})
                conf = network_config(tl.conflist(), 0)
                assert tl.call("ADD", conf, served).ok
                assert "after-thaw" in tl.agent_output()
                assert tl.call("DEL", conf, served).ok
        assert got == expected
    tl.assert_clean()
    assert host_ifname(cid) not in tl.tor_links()
