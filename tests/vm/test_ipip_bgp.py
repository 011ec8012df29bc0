"""IPIP over BGP (``ipipMode: Always``): pods on different nodes reach each other through routes the
nodes learned from each other over BGP, through ``tunl0`` (needs the ipip module).

The topology of ``test_ipip_dataplane.py``: n1 (10.9.1.11) and n2 (10.9.1.12) on 10.9.1.0/24, n3
(10.9.2.13) on 10.9.2.0/24 behind a router that knows nothing of the pods, one pod per node. Each
node runs ``tests.vm.bgp_node``: felix-agent's BGP and IPIP code (``BGPRunner``, the IPIP and route
managers) on one view of the datastore with a pool whose ``ipipMode`` is ``Always``, the mesh on,
and each node owning one block. The only routes to remote blocks are the ones BGP installs
(protocol 81, ``via <node> dev tunl0 onlink``); a capture on n1's underlay shows the pod traffic
inside IP-in-IP (protocol 4), even between the two nodes of one subnet. When a node's agent dies
its speaker withdraws its block and the others lose the route, and with it the path.

Runs inside the VM (``test_ipip_in_vm.py``), or directly on a host whose kernel has ipip loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kernel.rtnl import KernelRoute
from kernel.rtnl_bulk import BulkRTNL
from tests.vm.probes import Capture, link_stats, ping_until
from tests.vm.underlay import PodNode, ns_path, underlay, wire_pod
from tests.vm.vm_prerequisites import inner_file_marks

REPO = Path(__file__).resolve().parents[2]
BGP = 81
# Generous: under the VM's emulated CPU each node program and its ExaBGP take tens of seconds to
# import before the first session can come up.
CONVERGE = 300.0

pytestmark = inner_file_marks("ipip", "tests/vm/test_ipip_in_vm.py")

def resource(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "tortie.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


@dataclass
class Node(PodNode):
    k: int
    netns: str
    underlay: str
    pod_netns: str
    work: Path
    driver: BulkRTNL
    proc: subprocess.Popen[bytes] | None = None
    log: list[str] = field(default_factory=list)

    @property
    def ready_file(self) -> Path:
        return self.work / "ready"

    def start(self, view: Path) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "tests.vm.bgp_node", "--node", self.name,
                "--view", str(view), "--state", str(self.work / "state"), "--underlay", self.underlay,
                "--ready", str(self.ready_file)]
        with open(self.work / "node.log", "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         env=os.environ | {"PYTHONPATH": str(REPO)})

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop_exabgp(self) -> None:
        """ExaBGP outlives a killed node program for a few seconds (its dead man's switch); make sure."""
        try:
            pid = int((self.work / "state" / "exabgp.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return
        if str(self.work).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def bgp_routes(self) -> dict[str, KernelRoute]:
        return {r.dst: r for r in self.driver.routes() if r.proto == BGP}

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.work / "node.log").read_text()[-3000:]
        return ""


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    """Three nodes on the shared underlay, each with one pod, then one node program per node on
    the same datastore view."""
    built: list[Node] = []
    with underlay("ipb") as u:
        try:
            for host in u.hosts:
                wire_pod(u, host, 1480)
                built.append(Node(host.k, host.netns, host.underlay, host.pod_netns, tmp_path / f"n{host.k}",
                                  BulkRTNL.open(ns_path(host.netns))))

            view = tmp_path / "view.json"
            view.write_text(json.dumps({
                "resources": [
                    resource("IPPool", "default-ipv4", {"cidr": "10.244.0.0/16", "blockSize": 26, "ipipMode": "Always",
                                                        "vxlanMode": "Never", "natOutgoing": False}),
                    *[resource("Node", n.name, {"bgp": {"ipv4Address": f"{n.underlay}/24"}}) for n in built],
                ],
                "blocks": [{"cidr": n.block, "owner": n.name} for n in built],
            }))
            for node in built:
                node.start(view)
            yield built
        finally:
            for node in built:
                node.stop()
            for node in built:
                node.stop_exabgp()
                node.driver.close()


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               describe: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{describe()}")
        time.sleep(0.5)


def ping(pod_ns: str, address: str, timeout: float = 10.0) -> bool:
    return ping_until(ns_path(pod_ns), address, timeout)


def tunnel_route(node: Node) -> KernelRoute:
    """What a node learns for ``node``'s block: through tunl0 to its underlay address."""
    return KernelRoute(dst=node.block, gateway=node.underlay, device="tunl0", onlink=True, proto=BGP)


def test_pods_reach_each_other_through_bgp_learned_ipip_routes(nodes: list[Node]) -> None:
    n1, n2, n3 = nodes

    def learned(node: Node) -> dict[str, KernelRoute]:
        return {dst: KernelRoute(dst=r.dst, gateway=r.gateway, device=r.device, onlink=r.onlink, proto=r.proto)
                for dst, r in node.bgp_routes().items()}

    def converged() -> bool:
        return all(learned(n) == {o.block: tunnel_route(o) for o in nodes if o is not n} for n in nodes)

    wait_until(converged, CONVERGE, "every node to learn the other blocks over BGP, through tunl0",
               describe=lambda: "\n".join(f"{n.name}: {learned(n)}\n{n.output()}" for n in nodes))
    for node in nodes:
        assert json.loads(node.ready_file.read_text())["ipip"] == "ok"
        # One owner per route: the agent's route manager programs no route to a remote block.
        others = {o.block for o in nodes if o is not node}
        assert [r for r in node.driver.routes() if r.dst in others and r.proto != BGP] == []
        tunl = node.driver.link("tunl0")
        assert tunl is not None and tunl.up and tunl.mtu == 1480

    tx_before, _ = link_stats(n1.netns, "tunl0")
    with Capture(ns_path(n1.netns), "eth0") as cap:
        assert ping(n1.pod_netns, n2.pod_ip)  # same subnet: tunnelled all the same (Always)
        assert ping(n1.pod_netns, n3.pod_ip)  # through the router, which does not know the pods
        assert ping(n3.pod_netns, n1.pod_ip)
    tx_after, _ = link_stats(n1.netns, "tunl0")
    assert tx_after - tx_before >= 3
    tunnelled = {(p.src, p.dst, p.inner_src, p.inner_dst) for p in cap.encapsulated("ipip")}
    assert all(p.proto == 4 for p in cap.encapsulated("ipip"))
    assert (n1.underlay, n2.underlay, n1.pod_ip, n2.pod_ip) in tunnelled
    assert (n2.underlay, n1.underlay, n2.pod_ip, n1.pod_ip) in tunnelled
    assert (n1.underlay, n3.underlay, n1.pod_ip, n3.pod_ip) in tunnelled
    assert (n3.underlay, n1.underlay, n3.pod_ip, n1.pod_ip) in tunnelled
    assert not cap.plain_between(n1.pod_ip, n2.pod_ip) and not cap.plain_between(n1.pod_ip, n3.pod_ip)

    # The path is BGP's: node 3's agent dies, its speaker withdraws the block (the API process's
    # dead man's switch), the others drop the route, and n3's pod is out of reach.
    n3.stop(signal.SIGKILL)
    for node in (n1, n2):
        wait_until(lambda node=node: n3.block not in node.bgp_routes(), CONVERGE,  # type: ignore[misc]
                   f"{n3.block} to leave {node.name}", describe=lambda: str(learned(n1)))
    assert not ping(n1.pod_netns, n3.pod_ip, timeout=2)
    assert ping(n1.pod_netns, n2.pod_ip)
