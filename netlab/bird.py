"""BIRD 2 as a router in a lab namespace, and the kernel routes of a namespace as BGP left them.

Owns starting BIRD with a private configuration, control socket and PID file inside a lab node's
namespace, asking it (``birdc``) for its best routes, stopping it by the PID it started, and
reading a namespace's main routing table by route protocol, and watching it change
(``RouteMonitor``). Used by the BGP lab tests and
``bench.bgp_bench``. Must not touch anything outside the lab's namespaces and its own directory.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

from netlab.lab import Lab
from netlab.wait import wait_for


def kernel_routes(lab: Lab, netns: str, proto: int | None = 81) -> dict[str, str]:
    """dst -> gateway ("" when none) of the main table's routes (of protocol ``proto``)."""
    argv = ["ip", "-j", "route", "show", "table", "main"] + (["proto", str(proto)] if proto is not None else [])
    out = lab.exec(netns, *argv).stdout
    routes = json.loads(out) if out.strip() else []
    return {as_prefix(r["dst"]): r.get("gateway", "") for r in routes}


def as_prefix(dst: str) -> str:
    return dst if "/" in dst or dst == "default" else f"{dst}/{128 if ':' in dst else 32}"


class Bird:
    """BIRD 2 in a lab namespace with private config, control socket and PID file."""

    def __init__(self, lab: Lab, k: int, root: Path) -> None:
        self.lab = lab
        self.netns = lab.node(k).netns
        self.address = lab.node_ip(k)
        self.dir = root / f"bird{k}"
        self.conf = self.dir / "bird.conf"
        self.sock = self.dir / "bird.ctl"
        self.pid: int | None = None

    def start(self, text: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(text)
        check = subprocess.run(["bird", "-p", "-c", str(self.conf)], capture_output=True, text=True)
        assert check.returncode == 0, f"bird refused its configuration: {check.stderr}"
        # -f: foreground, so that the lab owns (and stops) the PID it started.
        self.pid = self.lab.start_process(self.netns, ["bird", "-f", "-c", str(self.conf), "-s", str(self.sock),
                                                       "-P", str(self.dir / "bird.pid")],
                                          self.dir / "bird.out", {})
        # The socket file appears a moment before BIRD answers on it (on a loaded machine, long
        # enough for a first `birdc` to be refused): ready means answering.
        wait_for(self.answers, 15, "BIRD to answer on its control socket")

    def answers(self) -> bool:
        if not self.sock.exists():
            return False
        done = subprocess.run(["birdc", "-s", str(self.sock), "show", "status"], capture_output=True, text=True,
                              check=False, timeout=30)
        return done.returncode == 0

    def birdc(self, *command: str) -> str:
        return subprocess.run(["birdc", "-s", str(self.sock), *command], capture_output=True, text=True,
                              check=True, timeout=30).stdout

    def routes(self) -> dict[str, str]:
        """prefix -> next hop of BIRD's best BGP routes (`birdc show route`, parsed)."""
        out = self.birdc("show", "route", "primary")
        routes: dict[str, str] = {}
        prefix = ""
        for line in out.splitlines():
            words = line.split()
            if not words or words[0] in ("BIRD", "Table") or line.startswith("Access"):
                continue
            if not line[0].isspace():
                prefix = words[0]
                rest = words[1:]
            else:
                rest = words
            if "via" in rest and prefix:
                routes[prefix] = rest[rest.index("via") + 1]
        return routes

    def stop(self) -> None:
        if self.pid is not None:
            self.lab.stop_process(self.pid)
            self.pid = None


class RouteMonitor:
    """``ip -n NS monitor route`` in a thread: every protocol-81 route added or deleted in a
    namespace, with the monotonic time it was seen (what the reference measured with)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.events: list[tuple[float, bool, str]] = []  # (time, added, dst)
        self._proc = subprocess.Popen(["ip", "-n", netns, "monitor", "route"], stdout=subprocess.PIPE, text=True,
                                      bufsize=1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.2)  # let it subscribe

    def _run(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.monotonic()
            if "proto 81" not in line:
                continue
            words = line.split()
            deleted = words[0] == "Deleted"
            self.events.append((now, not deleted, as_prefix(words[1] if deleted else words[0])))

    def first(self, dst: str, added: bool, since: float) -> float | None:
        return next((t for t, a, d in list(self.events) if d == dst and a == added and t >= since), None)

    def wait_first(self, dst: str, added: bool, since: float, timeout: float) -> float:
        seen = wait_for(lambda: self.first(dst, added, since), timeout, f"{dst} {'added' if added else 'deleted'}")
        assert seen is not None
        return seen

    def deletions(self, dst: str, since: float) -> list[float]:
        return [t for t, a, d in list(self.events) if d == dst and not a and t >= since]

    def __enter__(self) -> RouteMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.wait(5)
        self._thread.join(5)
