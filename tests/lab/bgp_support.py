"""Lab support for the BGP speaker tests: a driver that runs one ``Speaker`` (with its ExaBGP) and
``LearnedRoutes`` inside a node namespace, the test's client for it, and the BIRD 2 configuration
these tests use (BIRD itself, reading and watching a namespace's kernel routes are
``netlab.bird``'s; waiting is ``netlab.wait``'s).

The driver (``python -m tests.lab.bgp_support drive ...``) is started by ``Lab.start_process``
inside the node's namespace, so ExaBGP (its child) runs there too. The test talks to it over a
unix socket (filesystem sockets cross network namespaces): one JSON request, one JSON answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from bgp.learned import LearnedRoutes
from bgp.model import Export, Peer, PeerOptions, SessionStatus, SpeakerConfig
from bgp.speaker import Speaker
from netlab.bird import RouteMonitor, kernel_routes
from netlab.lab import Lab
from netlab.wait import wait_for

__all__ = ["Node", "RouteMonitor", "bird_config", "config_to_json", "drive"]

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


# -- the driver (runs inside a node namespace) ---------------------------------------------------


def config_from_json(doc: dict[str, Any]) -> SpeakerConfig:
    return SpeakerConfig(**{**doc, "peers": tuple(_peer(p) for p in doc.get("peers", ()))})


def _peer(doc: dict[str, Any]) -> Peer:
    options = dict(doc.get("options", {}))
    assert not options.get("filters"), "the driver does not carry BGPFilters"
    return Peer(**{**doc, "options": PeerOptions(**{**options, "filters": ()})})


def config_to_json(config: SpeakerConfig) -> dict[str, Any]:
    return asdict(config)


class Driver:
    def __init__(self, state_dir: Path, control: Path, adopt: float | None) -> None:
        from kernel.rtnl_bulk import BulkRTNL

        self.learned = LearnedRoutes(BulkRTNL.open(), resync_interval=5.0)
        if adopt is not None:
            self.adopted = self.learned.adopt(adopt)
        self.attrs: dict[str, dict[str, Any]] = {}  # "peer prefix" -> attributes last received
        self.speaker = Speaker(state_dir, on_route=self.on_route, on_session=self.on_session,
                               on_end_of_rib=self.learned.on_end_of_rib)
        self.control = control
        self.done = threading.Event()

    def on_route(self, peer: str, prefix: str, next_hop: str | None, withdrawn: bool, attrs: dict[str, Any]) -> None:
        self.learned.on_route(peer, prefix, next_hop, withdrawn, attrs)
        if withdrawn:
            self.attrs.pop(f"{peer} {prefix}", None)
        else:
            self.attrs[f"{peer} {prefix}"] = {**attrs, "next-hop": next_hop}

    def on_session(self, status: SessionStatus) -> None:
        self.learned.on_session(status, self.speaker.restart_time(status.peer))

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "configure":
            self.speaker.configure(config_from_json(request["config"]))
        elif op == "announce":
            self.speaker.announce(frozenset(Export(p, nh) for p, nh in request["exports"]))
        elif op == "stop":
            self.learned.stop()  # first: a graceful stop leaves the kernel's routes as they are
            self.speaker.stop(graceful=request.get("graceful", True))
            self.done.set()
        elif op != "status":
            return {"error": f"unknown op {op!r}"}
        m = self.speaker.metrics()
        return {"sessions": [asdict(s) for s in self.speaker.sessions()], "learned": self.speaker.learned(),
                "attrs": self.attrs, "installed": sorted(self.learned.installed()),
                "exabgp": self.speaker.exabgp_pid, "pid": os.getpid(), "metrics": asdict(m),
                "counters": asdict(self.learned.stats())}

    def serve(self) -> None:
        self.learned.start()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.unlink(missing_ok=True)
        binding = self.control.with_name(self.control.name + ".new")
        binding.unlink(missing_ok=True)
        server.bind(str(binding))
        server.listen(8)
        binding.rename(self.control)  # appears only once it accepts connections
        server.settimeout(0.2)
        while not self.done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                request = json.loads(conn.makefile("rb").readline())
                try:
                    answer = self.handle(request)
                except Exception as e:  # the test wants to see it, not a dead driver
                    logging.exception("request %s failed", request.get("op"))
                    answer = {"error": repr(e)}
                conn.sendall(json.dumps(answer).encode() + b"\n")
        server.close()
        self.control.unlink(missing_ok=True)


def drive(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bgp_support drive")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--control", type=Path, required=True)
    parser.add_argument("--adopt", type=float, help="adopt protocol-81 routes left in the kernel for this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    driver = Driver(args.state, args.control, args.adopt)
    signal.signal(signal.SIGTERM, lambda *_: driver.done.set())
    driver.serve()
    if driver.speaker.exabgp_pid is not None:
        driver.speaker.stop(graceful=True)
    return 0


# -- the test's side -----------------------------------------------------------------------------


class Node:
    """A speaker driver in lab node ``k``."""

    def __init__(self, lab: Lab, k: int, root: Path) -> None:
        self.lab = lab
        self.k = k
        self.netns = lab.node(k).netns
        self.address = lab.node_ip(k)
        self.dir = root / f"n{k}"
        self.control = self.dir / "control.sock"
        self.pid: int | None = None

    def start(self, config: SpeakerConfig, exports: list[tuple[str, str]] | None = None,
              adopt: float | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [PYTHON, "-m", "tests.lab.bgp_support", "drive", "--state", str(self.dir / "state"),
                "--control", str(self.control)]
        argv += ["--adopt", str(adopt)] if adopt is not None else []
        env = {"PYTHONPATH": str(REPO), "HOME": "/root"}
        self.pid = self.lab.start_process(self.netns, argv, self.dir / "driver.log", env)
        wait_for(lambda: self.control.exists(), 20, f"the driver of node {self.k} to listen")
        self.request({"op": "configure", "config": config_to_json(config)})
        if exports is not None:
            self.announce(exports)

    def request(self, request: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.control))
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
        if "error" in answer:
            raise AssertionError(f"node {self.k}: {request['op']} failed: {answer['error']}")
        return answer

    def announce(self, exports: list[tuple[str, str]]) -> dict[str, Any]:
        return self.request({"op": "announce", "exports": exports})

    def status(self) -> dict[str, Any]:
        return self.request({"op": "status"})

    def stop(self, graceful: bool = True) -> None:
        if self.pid is None:
            return
        self.request({"op": "stop", "graceful": graceful})
        wait_for(lambda: not self.lab.process_running(self.pid or 0), 20, f"driver of node {self.k} to exit")
        self.lab.stop_process(self.pid)
        self.pid = None

    def kill(self, exabgp: bool = True) -> int | None:
        """SIGKILL the driver (a crashed node agent) and, with ``exabgp``, its ExaBGP too (a dead
        node). Returns ExaBGP's PID."""
        assert self.pid is not None
        exabgp_pid: int | None = self.status()["exabgp"]
        for pid in (self.pid, exabgp_pid if exabgp else None):
            if pid:
                os.kill(pid, signal.SIGKILL)
        self.lab.stop_process(self.pid)
        self.pid = None
        return exabgp_pid

    def wait_routes(self, want: dict[str, str], timeout: float, sessions: int | None = None) -> None:
        """Until this node's protocol-81 routes are exactly ``want`` (dst -> gateway) and, if
        given, ``sessions`` sessions are established."""
        def done() -> bool:
            return self.routes() == want and (sessions is None or len(self.established()) == sessions)

        wait_for(done, timeout, f"node {self.k}'s BGP routes {want}",
                   describe=lambda: f"{self.routes()} {self.status()['sessions']}")

    def wait_gone(self, prefix: str, timeout: float) -> None:
        wait_for(lambda: prefix not in self.routes(), timeout, f"{prefix} to leave node {self.k}")

    def established(self) -> set[str]:
        return {s["peer"] for s in self.status()["sessions"] if s["state"] == "Established"}

    def routes(self, proto: int | None = 81) -> dict[str, str]:
        return kernel_routes(self.lab, self.netns, proto)


def bird_config(router_id: str, asn: int, neighbors: list[tuple[str, int]], services: list[str],
                bulk: list[str] | None = None) -> str:
    """eBGP to every Tortie node: export static ``services`` (and ``bulk``, disabled until enabled
    with birdc), import everything. BIRD sets itself as next hop on eBGP."""
    lines = [
        "log stderr all;",
        f"router id {router_id};",
        "protocol device { scan time 10; }",
        "protocol static services {",
        "  ipv4;",
        *[f"  route {s} blackhole;" for s in services],
        "}",
    ]
    if bulk is not None:
        lines += ["protocol static bulk {", "  disabled;", "  ipv4;", *[f"  route {p} blackhole;" for p in bulk], "}"]
    lines += [
        "template bgp tortie {",
        f"  local {router_id} as {asn};",
        "  hold time 9;",
        "  graceful restart on;",
        '  ipv4 { import all; export where source = RTS_STATIC; };',
        "}",
    ]
    for k, (address, peer_asn) in enumerate(neighbors, 1):
        lines.append(f"protocol bgp node{k} from tortie {{ neighbor {address} as {peer_asn}; }}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["drive"]:
        sys.exit(drive(sys.argv[2:]))
    sys.exit("usage: python -m tests.lab.bgp_support drive --state DIR --control SOCK [--adopt SECONDS]")
