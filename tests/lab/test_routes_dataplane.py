"""The route, VXLAN, IPIP and MTU managers on three lab nodes, driven by hand-made desired states.

A ``netlab`` lab without etcd: a fabric bridge and nodes n1..n3 (198.18.0.11-13/24), each with two
pods wired by ``cni_plugins.wiring`` (IPv4 and IPv6, one block of each per node). Each node's
managers talk to a netlink socket opened inside the node's namespace, so nothing here touches the
root namespace; the lab (pods included) is torn down even when a test fails.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cni_plugins import wiring
from cni_plugins.naming import host_ifname
from felix_agent.calc.model import DesiredState, Route, VXLANPeer
from felix_agent.dataplane.ipip import IPIPManager
from felix_agent.dataplane.mtu import MTUManager
from felix_agent.dataplane.routes import RouteManager
from felix_agent.dataplane.vxlan import VXLANManager, vtep_link_local
from kernel.netns import netns
from kernel.rtnl_bulk import BulkRTNL
from netlab.lab import Lab
from tests.vm.probes import Capture, link_stats

pytestmark = pytest.mark.lab

POD_MTU = 1450


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


@dataclass
class Pod:
    netns: str
    host_if: str
    v4: str
    v6: str


@dataclass
class Node:
    """One lab node, its pods, and its dataplane managers (on a socket inside its namespace)."""

    k: int
    netns: str
    underlay: str
    driver: BulkRTNL
    mtu_file: Path
    pods: list[Pod] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.routes = RouteManager(self.driver)
        self.vxlan = VXLANManager(self.driver)
        self.ipip = IPIPManager(self.driver, underlay_ip=self.underlay)
        self.mtu = MTUManager(self.driver, self.mtu_file, underlay_ip=self.underlay)

    @property
    def name(self) -> str:
        return f"n{self.k}"

    @property
    def path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def block4(self) -> str:
        return f"10.244.{self.k}.0/26"

    @property
    def block6(self) -> str:
        return f"fd00:10:244:{self.k}::/122"

    @property
    def vtep(self) -> VXLANPeer:
        return VXLANPeer(self.name, self.underlay, f"10.244.{self.k}.1", f"66:74:6f:72:00:{self.k:02x}")

    def apply(self, state: DesiredState, resync: bool = False) -> int:
        """One batch, in the order the agent runs its managers: devices before the routes through them.
        ``resync``: the periodic resync's pass, which reads the kernel back (repairs out-of-band changes)."""
        writes = 0
        for manager in (self.vxlan, self.ipip, self.routes, self.mtu):
            manager.on_update(state)
        for manager in (self.vxlan, self.ipip, self.routes, self.mtu):
            writes += manager.apply(resync=resync)
        return writes

    def ip(self, *argv: str) -> str:
        return sh("ip", "-n", self.netns, *argv)


@dataclass
class Fabric:
    lab: Lab
    nodes: list[Node]

    def state(
        self, node: Node, mode: str = "vxlan", members: list[Node] | None = None, extra_pods: list[Pod] | None = None
    ) -> DesiredState:
        """What the calculation graph would hand ``node`` with ``members`` in the cluster."""
        members = self.nodes if members is None else members
        routes = {Route(node.block4, "blackhole", node=node.name), Route(node.block6, "blackhole", node=node.name)}
        for pod in [*node.pods, *(extra_pods or [])]:
            routes |= {
                Route(f"{pod.v4}/32", "local", device=pod.host_if, node=node.name),
                Route(f"{pod.v6}/128", "local", device=pod.host_if, node=node.name),
            }
        peers = frozenset(m.vtep for m in members if m is not node) if mode == "vxlan" else frozenset()
        for other in members:
            if other is node:
                continue
            if mode == "vxlan":
                routes |= {
                    Route(other.block4, "vxlan", gateway=other.vtep.vtep_ip, node=other.name),
                    Route(other.block6, "vxlan", node=other.name),
                }
            else:  # direct: IPv4 only, the underlay has no IPv6
                routes |= {Route(other.block4, "direct", gateway=other.underlay, node=other.name)}
        return DesiredState(
            node=node.name,
            routes=frozenset(routes),
            vxlan_peers=peers,
            local_vtep=node.vtep if mode == "vxlan" else None,
        )

    def apply_all(self, mode: str = "vxlan", members: list[Node] | None = None, resync: bool = False) -> int:
        members = self.nodes if members is None else members
        return sum(n.apply(self.state(n, mode, members), resync) for n in members)

    def add_pod(self, node: Node, j: int) -> Pod:
        name = f"{self.lab.name}-p{secrets.token_hex(4)}"  # the lab's pod pattern: destroy() takes it too
        sh("ip", "netns", "add", name)
        pod = Pod(name, host_ifname("rt", name, "eth0"), f"10.244.{node.k}.{j}", f"fd00:10:244:{node.k}::{j}")
        addresses = [ipaddress.ip_interface(f"{pod.v4}/26"), ipaddress.ip_interface(f"{pod.v6}/122")]
        with netns(node.path):
            wiring.setup(f"/run/netns/{name}", "eth0", pod.host_if, POD_MTU, addresses)
        return pod


def ping(pod: Pod, address: str, count: int = 2) -> bool:
    argv = ["ip", "netns", "exec", pod.netns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", address]
    return subprocess.run(argv, capture_output=True).returncode == 0


def eventually_pings(pod: Pod, address: str, timeout: float = 15.0) -> bool:
    """The first packets of a fresh path may be lost to neighbour resolution on the pod side (one
    echo waits up to 2 s: the bound leaves a loaded machine several tries)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(pod, address, count=1):
            return True
    return False


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    lab = Lab(f"rt{secrets.token_hex(3)}", tmp_path / "lab", nodes=3, etcd_members=0)
    nodes: list[Node] = []
    try:
        lab.create()
        for k, ln in enumerate(lab.nodes, 1):
            nodes.append(Node(k, ln.netns, ln.address, BulkRTNL.open(f"/run/netns/{ln.netns}"), tmp_path / f"mtu-{k}"))
        fab = Fabric(lab, nodes)
        for node in nodes:
            node.pods = [fab.add_pod(node, 2), fab.add_pod(node, 3)]
        yield fab
    finally:
        for node in nodes:
            node.driver.close()
        lab.destroy()


def test_pods_on_different_nodes_reach_each_other_over_vxlan(fabric: Fabric) -> None:
    n1, n2, n3 = fabric.nodes
    assert not ping(n1.pods[0], n2.pods[0].v4, count=1)  # nothing routes between nodes yet
    assert fabric.apply_all() > 0

    link = n1.ip("-d", "link", "show", "vxlan.tortie")
    for text in (
        "vxlan id 4096",
        "local 198.18.0.11",
        "dstport 4789",
        "nolearning",
        "mtu 1450",
        "link/ether 66:74:6f:72:00:01",
        "state UNKNOWN",
    ):
        assert text in link
    assert "inet 10.244.1.1/32" in n1.ip("addr", "show", "vxlan.tortie")
    fdb = sh("ip", "netns", "exec", n1.netns, "bridge", "fdb", "show", "dev", "vxlan.tortie")
    assert "66:74:6f:72:00:02 dst 198.18.0.12 self permanent" in fdb
    assert "66:74:6f:72:00:03 dst 198.18.0.13 self permanent" in fdb
    neigh = n1.ip("neigh", "show", "dev", "vxlan.tortie")
    assert "10.244.2.1 lladdr 66:74:6f:72:00:02 PERMANENT" in neigh
    assert f"{vtep_link_local(n3.vtep.vtep_mac)} lladdr 66:74:6f:72:00:03 PERMANENT" in neigh
    assert "10.244.2.0/26 via 10.244.2.1 dev vxlan.tortie proto 80 onlink" in n1.ip("route")
    assert "blackhole 10.244.1.0/26 proto 80" in n1.ip("route")
    assert f"fd00:10:244:3::/122 via {vtep_link_local(n3.vtep.vtep_mac)} dev vxlan.tortie proto 80" in n1.ip(
        "-6", "route"
    )
    assert n1.mtu_file.read_text() == "1450\n"

    tx_before, _ = link_stats(n1.netns, "vxlan.tortie")
    a, b = n1.pods[0], n2.pods[1]
    with Capture(n1.path, "eth0") as cap:
        assert eventually_pings(a, b.v4)
        assert eventually_pings(a, b.v6)
    tx_after, _ = link_stats(n1.netns, "vxlan.tortie")
    assert tx_after > tx_before
    tunnelled = {(p.src, p.dst, p.inner_src, p.inner_dst) for p in cap.encapsulated("vxlan")}
    assert ("198.18.0.11", "198.18.0.12", a.v4, b.v4) in tunnelled
    assert ("198.18.0.12", "198.18.0.11", b.v4, a.v4) in tunnelled
    assert ("198.18.0.11", "198.18.0.12", a.v6, b.v6) in tunnelled
    assert not cap.plain_between(a.v4, b.v4), "pod traffic crossed the underlay unencapsulated"

    for src, dst in ((n2.pods[0], n3.pods[1]), (n3.pods[0], n1.pods[1]), (n3.pods[1], n2.pods[0])):
        assert eventually_pings(src, dst.v4), f"{src.v4} -> {dst.v4}"
        assert eventually_pings(src, dst.v6), f"{src.v6} -> {dst.v6}"

    # In sync: the next batch (the CNI's identical /32 and /128 routes included) writes nothing.
    assert fabric.apply_all() == 0


def test_removing_a_node_removes_its_routes_fdb_and_neighbours(fabric: Fabric) -> None:
    n1, n2, n3 = fabric.nodes
    fabric.apply_all()
    assert eventually_pings(n1.pods[0], n3.pods[0].v4)

    fabric.apply_all(members=[n1, n2])
    for node in (n1, n2):
        assert n3.block4 not in node.ip("route")
        assert "fd00:10:244:3::" not in node.ip("-6", "route")
        assert "66:74:6f:72:00:03" not in sh(
            "ip", "netns", "exec", node.netns, "bridge", "fdb", "show", "dev", "vxlan.tortie"
        )
        neigh = node.ip("neigh", "show", "dev", "vxlan.tortie")
        assert "10.244.3.1 " not in neigh and vtep_link_local(n3.vtep.vtep_mac) not in neigh
    assert eventually_pings(n1.pods[0], n2.pods[0].v4)
    assert eventually_pings(n1.pods[0], n2.pods[0].v6)
    assert not ping(n1.pods[0], n3.pods[0].v4, count=1)


def test_out_of_band_changes_are_repaired_and_foreign_routes_left_alone(fabric: Fabric) -> None:
    n1, n2, _ = fabric.nodes
    fabric.apply_all()
    foreign = [
        ("route", "add", "10.250.0.0/24", "via", "198.18.0.1"),  # proto boot
        ("route", "add", "10.244.200.0/26", "via", "198.18.0.1", "proto", "81"),  # as if learned by BGP
        ("-6", "route", "add", "fd00:99::/64", "dev", "eth0", "proto", "static"),
    ]
    for argv in foreign:
        n1.ip(*argv)
    before = (n1.ip("route"), n1.ip("-6", "route"))
    foreign_lines = [
        line
        for table in before
        for line in table.splitlines()
        if "10.250.0.0/24" in line or "10.244.200.0/26" in line or "fd00:99::/64" in line
    ]
    assert len(foreign_lines) == 3

    n1.ip("route", "del", n2.block4, "proto", "80")
    n1.ip("-6", "route", "del", n2.block6, "proto", "80")
    n1.ip("neigh", "del", "10.244.2.1", "dev", "vxlan.tortie")
    sh(
        "ip",
        "netns",
        "exec",
        n1.netns,
        "bridge",
        "fdb",
        "del",
        "66:74:6f:72:00:02",
        "dev",
        "vxlan.tortie",
        "dst",
        "198.18.0.12",
    )
    assert not ping(n1.pods[0], n2.pods[0].v4, count=1)

    assert fabric.apply_all(resync=True) == 4  # the two routes, the FDB entry and the neighbour
    assert eventually_pings(n1.pods[0], n2.pods[0].v4)
    assert eventually_pings(n1.pods[0], n2.pods[0].v6)
    after = n1.ip("route") + n1.ip("-6", "route")
    assert all(line in after for line in foreign_lines)
    assert (n1.ip("route"), n1.ip("-6", "route")) == before
    assert fabric.apply_all() == 0


def test_a_local_route_is_kept_until_its_endpoint_is_known_to_be_gone(fabric: Fabric) -> None:
    n1 = fabric.nodes[0]
    fabric.apply_all()
    fresh = fabric.add_pod(n1, 10)  # a CNI ADD the agent has not heard of yet
    assert "proto 80 scope link" in n1.ip("route", "show", f"{fresh.v4}/32")
    n1.apply(fabric.state(n1))
    assert f"{fresh.v4} dev {fresh.host_if} proto 80 scope link" in n1.ip("route")
    assert fresh.v6 in n1.ip("-6", "route")

    assert n1.apply(fabric.state(n1, extra_pods=[fresh])) == 0  # now known: the CNI's routes are already right
    n1.apply(fabric.state(n1))  # the endpoint is deleted while its veth lingers
    assert fresh.v4 not in n1.ip("route")
    assert fresh.v6 not in n1.ip("-6", "route")
    assert host_ifname("rt", fresh.netns, "eth0") in n1.ip("link", "show")


def test_direct_routes_on_one_segment_and_vxlan_device_removed_when_unused(fabric: Fabric) -> None:
    n1, n2, n3 = fabric.nodes
    fabric.apply_all()
    assert eventually_pings(n1.pods[0], n2.pods[0].v4)

    fabric.apply_all(mode="direct")
    assert "vxlan.tortie" not in n1.ip("link", "show")
    assert f"{n2.block4} via 198.18.0.12 dev eth0 proto 80" in n1.ip("route")
    assert "fd00:10:244:2::" not in n1.ip("-6", "route")
    assert n1.mtu_file.read_text() == "1500\n"
    a, b = n1.pods[0], n3.pods[1]
    with Capture(n1.path, "eth0") as cap:
        assert eventually_pings(a, b.v4)
    assert cap.plain_between(a.v4, b.v4), "no pod-to-pod packet seen natively on the underlay"
    assert not cap.encapsulated("vxlan")
    assert eventually_pings(n2.pods[0], n3.pods[0].v4)
    assert fabric.apply_all(mode="direct") == 0


def test_ipip_on_a_kernel_without_the_module_is_reported_not_fatal(fabric: Fabric) -> None:
    if os.path.exists("/sys/module/ipip"):
        pytest.skip("this kernel has ipip: tests/vm covers it")
    n1 = fabric.nodes[0]
    routes = fabric.state(n1, mode="direct").routes | {Route("10.244.9.0/26", "ipip", gateway="198.18.0.19")}
    with_ipip = DesiredState(node=n1.name, routes=routes, ipip_enabled=True)
    n1.apply(with_ipip)
    assert n1.ipip.status == "unsupported"
    assert "10.244.9.0/26" not in n1.ip("route")
    assert n1.mtu_file.read_text() == "1480\n"


def test_a_resync_read_on_a_thread_repairs_while_a_new_pod_is_routed(fabric: Fabric) -> None:
    """The agent's route manager: the resync reads on a thread of its own (own socket in the node's
    namespace) and a later apply adopts the read; a pod added meanwhile is routed at once."""
    import threading

    n1, n2, _ = fabric.nodes
    fabric.apply_all()
    read_done = threading.Event()
    routes = RouteManager(n1.driver, reader=lambda: BulkRTNL.open(n1.path), wake=read_done.set)
    routes.on_update(fabric.state(n1))
    routes.apply(resync=True)  # the first apply reads on the loop: there is no view yet
    n1.ip("route", "del", n2.block4, "proto", "80")  # out of band
    assert routes.apply(resync=True) == 0 and read_done.wait(10)
    fresh = fabric.add_pod(n1, 11)  # a new pod while the read waits: the plugin routed it already
    routes.on_update(fabric.state(n1, extra_pods=[fresh]))
    assert routes.apply() == 1  # the adoption: the deleted block route, and nothing of the new pod's
    assert f"{n2.block4} via" in n1.ip("route")
    assert f"{fresh.v4} dev {fresh.host_if} proto 80 scope link" in n1.ip("route")
    assert eventually_pings(n1.pods[0], n2.pods[0].v4)
    assert routes.apply() == 0 and routes.apply(resync=True) == 0
