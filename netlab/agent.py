"""felix-agent in a lab node's namespace: its command line, built in one place, and the process.

Owns the agent's argv (``netctl lab``, the lab tests' clusters and the benchmarks all start it
through :func:`agent_argv`) and :class:`Agent`, one agent started, waited for, stopped or killed
through the ``Lab`` that records it, with the log it wrote since its last start. Must not decide
what the agent is for (pools, pods, BGP resources): the caller's lab does that. Runs nothing
outside the lab's namespaces.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from netlab.lab import UNDERLAY_LEN, Lab, LabNode
from netlab.wait import wait_for

FELIX_AGENT = Path(sys.executable).parent / "felix-agent"  # the virtual environment's script
START_TIMEOUT = 30.0  # a healthy agent makes its socket or answers /readiness in seconds


def agent_argv(nodename: str, address: str | None, *, cni_socket: Path | str, state_dir: Path | str,
               log_level: str | None = "info", extra: Sequence[str] = ()) -> list[str]:
    """The felix-agent command line for node ``nodename`` at fabric ``address`` (None: let the agent
    detect it), with its CNI socket and state directory (never the host's /run/tortie). ``log_level``
    None leaves the level to FelixConfiguration (a flag would override its logSeverityScreen)."""
    return [str(FELIX_AGENT), "--nodename", nodename,
            *(["--node-ip", f"{address}/{UNDERLAY_LEN}"] if address is not None else []),
            "--cni-socket", str(cni_socket), "--state-dir", str(state_dir),
            *(["--log-level", log_level] if log_level is not None else []), *extra]


class Agent:
    """One felix-agent of a lab node, started and stopped through the lab (which records its PID).

    ``args`` are added to every start's command line; ``start`` may add more for one run."""

    def __init__(self, lab: Lab, node: LabNode, *, cni_socket: Path, state_dir: Path, log: Path,
                 env: Mapping[str, str], args: Sequence[str] = (), log_level: str | None = "info",
                 node_ip: bool = True) -> None:
        self.lab, self.node = lab, node
        self.cni_socket, self.state_dir, self.log = cni_socket, state_dir, log
        self.env, self.args, self.log_level, self.node_ip = dict(env), list(args), log_level, node_ip
        self.pid: int | None = None
        self._log_offset = 0

    def argv(self, extra: Sequence[str] = ()) -> list[str]:
        return agent_argv(self.node.name, self.node.address if self.node_ip else None, cni_socket=self.cni_socket,
                          state_dir=self.state_dir, log_level=self.log_level, extra=[*self.args, *extra])

    def start(self, extra: Sequence[str] = (), env: Mapping[str, str] | None = None) -> int:
        """Start the agent; return its PID without waiting for it (see ``wait_socket`` and
        ``wait_ready``)."""
        if self.running():
            raise AssertionError(f"the agent of node {self.node.name} is already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        self.pid = self.lab.start_process(self.node.netns, self.argv(extra), self.log,
                                          self.env if env is None else env)
        return self.pid

    def running(self) -> bool:
        return self.pid is not None and self.lab.process_running(self.pid)

    def stop(self) -> None:
        """SIGTERM (the agent leaves its dataplane in place) and wait until it has exited."""
        pid, self.pid = self.pid, None
        if pid is not None:
            self.lab.stop_process(pid)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and wait until it is gone."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.lab.process_running(pid), 10, f"agent {pid} to die")
        self.lab.stop_process(pid)  # reaps it and forgets it; it is gone already

    def output(self) -> str:
        """What the agent logged since its last start."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def _alive(self) -> None:
        if not self.running():
            raise AssertionError(f"felix-agent of node {self.node.name} exited while starting:\n"
                                 f"{self.output()[-4000:]}")

    def wait_socket(self, timeout: float = START_TIMEOUT) -> None:
        """Until its CNI socket exists (its start-up cleanup runs before the socket is made)."""
        def made() -> bool:
            self._alive()
            return self.cni_socket.exists()

        wait_for(made, timeout, f"node {self.node.name}'s agent to make its CNI socket",
                 describe=lambda: self.output()[-4000:])

    def wait_ready(self, readiness: Callable[[], int], timeout: float = START_TIMEOUT) -> None:
        """Until ``readiness()`` (the HTTP status of its /readiness, asked in its namespace) is 200."""
        def ready() -> bool:
            self._alive()
            return readiness() == 200

        wait_for(ready, timeout, f"node {self.node.name}'s agent to become ready", interval=0.1,
                 describe=lambda: self.output()[-4000:])
