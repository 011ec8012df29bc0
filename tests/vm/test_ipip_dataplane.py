"""IPIP ``Always`` and ``CrossSubnet`` through the route, IPIP and MTU managers (needs the ipip module).

Two subnets joined by a router namespace: n1 (10.9.1.11) and n2 (10.9.1.12) on 10.9.1.0/24, n3
(10.9.2.13) on 10.9.2.0/24, each node with one pod wired by ``cni_plugins.wiring``. The router
knows nothing of the pod addresses, so pod traffic between the subnets only gets through inside
the tunnel. A capture on n1's underlay proves what was encapsulated and what was not.

This kernel-dependent half runs inside the VM (``test_ipip_in_vm.py`` starts it there), or
directly on a host whose kernel already has ipip loaded. It is skipped elsewhere: loading the
module on a host would add ``tunl0`` to the root namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from felix_agent.calc.model import DesiredState, Route
from felix_agent.dataplane.ipip import TUNNEL_ADDRESS_KEY, IPIPManager
from felix_agent.dataplane.mtu import MTUManager
from felix_agent.dataplane.routes import RouteManager
from kernel.rtnl_bulk import BulkRTNL
from tests.vm.probes import Capture, link_stats, ping_until
from tests.vm.underlay import PodNode, ns_path, underlay, wire_pod
from tests.vm.vm_prerequisites import inner_file_marks

pytestmark = inner_file_marks("ipip", "tests/vm/test_ipip_in_vm.py")


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass
class Node(PodNode):
    k: int
    netns: str
    underlay: str
    subnet: str
    pod_netns: str
    pod_if: str
    driver: BulkRTNL
    mtu_file: Path

    def __post_init__(self) -> None:
        self.routes = RouteManager(self.driver)
        self.ipip = IPIPManager(self.driver, underlay_ip=self.underlay)
        self.mtu = MTUManager(self.driver, self.mtu_file, underlay_ip=self.underlay)

    def apply(self, state: DesiredState, resync: bool = False) -> int:
        writes = 0
        for m in (self.ipip, self.routes, self.mtu):
            m.on_update(state)
        for m in (self.ipip, self.routes, self.mtu):
            writes += m.apply(resync=resync)
        return writes

    def ip(self, *argv: str) -> str:
        return sh("ip", "-n", self.netns, *argv)


@dataclass
class Cluster:
    prefix: str
    nodes: list[Node]

    def state(self, node: Node, mode: str, tunnel_addresses: bool = False) -> DesiredState:
        """``mode``: "always", "crosssubnet" (IPIP only between subnets) or "never" (IPIP off, and
        only same-subnet blocks routed: the router does not know the pods)."""
        routes = {
            Route(node.block, "blackhole", node=f"n{node.k}"),
            Route(f"{node.pod_ip}/32", "local", device=node.pod_if, node=f"n{node.k}"),
        }
        for other in self.nodes:
            if other is node:
                continue
            same_subnet = other.subnet == node.subnet
            if mode == "never" and not same_subnet:
                continue
            native = mode == "never" or (mode == "crosssubnet" and same_subnet)
            routes.add(Route(other.block, "direct" if native else "ipip", gateway=other.underlay, node=f"n{other.k}"))
        extra = ((TUNNEL_ADDRESS_KEY, f"10.244.{node.k}.1"),) if tunnel_addresses else ()
        return DesiredState(node=f"n{node.k}", routes=frozenset(routes), ipip_enabled=mode != "never", extra=extra)

    def apply(self, mode: str, tunnel_addresses: bool = False, resync: bool = False) -> int:
        """Every node's managers on the state of ``mode``; ``resync``: each re-reads the kernel first
        (the periodic resync, which is what repairs out-of-band changes between pods' applies)."""
        return sum(n.apply(self.state(n, mode, tunnel_addresses), resync) for n in self.nodes)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three nodes on the shared underlay, each with one pod wired by the CNI plugin's code."""
    nodes: list[Node] = []
    with underlay("ipv") as u:
        try:
            for host in u.hosts:
                pod_if = wire_pod(u, host, 1480)
                nodes.append(Node(host.k, host.netns, host.underlay, host.segment, host.pod_netns, pod_if,
                                  BulkRTNL.open(ns_path(host.netns)), tmp_path / f"mtu-{host.k}"))
            yield Cluster(u.prefix, nodes)
        finally:
            for node in nodes:
                node.driver.close()


def ping(pod_ns: str, address: str, timeout: float = 8.0) -> bool:
    return ping_until(ns_path(pod_ns), address, timeout)


def test_ipip_always_encapsulates_everything_between_nodes(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    assert not ping(n1.pod_netns, n3.pod_ip, timeout=1)
    assert cluster.apply("always", tunnel_addresses=True) > 0
    assert all(n.ipip.status == "ok" for n in cluster.nodes)
    tunl = n1.ip("-d", "link", "show", "tunl0")
    assert "mtu 1480" in tunl and ",UP" in tunl
    assert "inet 10.244.1.1/32" in n1.ip("addr", "show", "tunl0")
    routes = n1.ip("route")
    assert "10.244.2.0/26 via 10.9.1.12 dev tunl0 proto 80 onlink" in routes
    assert "10.244.3.0/26 via 10.9.2.13 dev tunl0 proto 80 onlink" in routes
    assert "blackhole 10.244.1.0/26 proto 80" in routes
    assert n1.mtu_file.read_text() == "1480\n"

    tx_before, _ = link_stats(n1.netns, "tunl0")
    with Capture(ns_path(n1.netns), "eth0") as cap:
        assert ping(n1.pod_netns, n2.pod_ip)  # same subnet
        assert ping(n1.pod_netns, n3.pod_ip)  # through the router
        assert ping(n3.pod_netns, n1.pod_ip)
    tx_after, _ = link_stats(n1.netns, "tunl0")
    assert tx_after - tx_before >= 3
    tunnelled = {(p.src, p.dst, p.inner_src, p.inner_dst) for p in cap.encapsulated("ipip")}
    assert ("10.9.1.11", "10.9.1.12", n1.pod_ip, n2.pod_ip) in tunnelled
    assert ("10.9.1.12", "10.9.1.11", n2.pod_ip, n1.pod_ip) in tunnelled
    assert ("10.9.1.11", "10.9.2.13", n1.pod_ip, n3.pod_ip) in tunnelled
    assert ("10.9.2.13", "10.9.1.11", n3.pod_ip, n1.pod_ip) in tunnelled
    assert not cap.plain_between(n1.pod_ip, n2.pod_ip) and not cap.plain_between(n1.pod_ip, n3.pod_ip)
    assert cluster.apply("always", tunnel_addresses=True) == 0


def test_ipip_crosssubnet_tunnels_only_between_subnets(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    cluster.apply("always")
    cluster.apply("crosssubnet")  # the same-subnet route is replaced by a native one
    routes = n1.ip("route")
    assert "10.244.2.0/26 via 10.9.1.12 dev eth0 proto 80" in routes
    assert "10.244.3.0/26 via 10.9.2.13 dev tunl0 proto 80 onlink" in routes
    assert "inet " not in n1.ip("addr", "show", "tunl0")  # no tunnel address given: onlink routes suffice

    with Capture(ns_path(n1.netns), "eth0") as cap:
        assert ping(n1.pod_netns, n2.pod_ip)
        assert ping(n1.pod_netns, n3.pod_ip)
        assert ping(n2.pod_netns, n3.pod_ip)
    assert {(p.src, p.dst) for p in cap.plain_between(n1.pod_ip, n2.pod_ip)} == {
        (n1.pod_ip, n2.pod_ip),
        (n2.pod_ip, n1.pod_ip),
    }
    assert not any({p.src, p.dst} == {"10.9.1.11", "10.9.1.12"} for p in cap.encapsulated("ipip"))
    tunnelled = {(p.src, p.dst, p.inner_src, p.inner_dst) for p in cap.encapsulated("ipip")}
    assert ("10.9.1.11", "10.9.2.13", n1.pod_ip, n3.pod_ip) in tunnelled
    assert ("10.9.2.13", "10.9.1.11", n3.pod_ip, n1.pod_ip) in tunnelled
    assert not cap.plain_between(n1.pod_ip, n3.pod_ip)
    assert cluster.apply("crosssubnet") == 0


def test_turning_ipip_off_removes_its_routes_and_address(cluster: Cluster) -> None:
    n1 = cluster.nodes[0]
    cluster.apply("always", tunnel_addresses=True)
    n1.ip("route", "del", "10.244.3.0/26", "proto", "80")  # out of band: repaired by the next resync
    assert cluster.apply("always", tunnel_addresses=True, resync=True) == 1
    cluster.apply("never")
    assert n1.ipip.status == "disabled"
    tunl = n1.ip("link", "show", "tunl0")
    assert ",UP" not in tunl and "inet " not in n1.ip("addr", "show", "tunl0")
    assert "tunl0" not in n1.ip("route")
    assert "10.244.2.0/26 via 10.9.1.12 dev eth0 proto 80" in n1.ip("route")
    assert n1.mtu_file.read_text() == "1500\n"
    assert ping(n1.pod_netns, cluster.nodes[1].pod_ip)
