"""WireGuard between three nodes through the WireGuard, route and IPIP managers, over an IPIP pool and
over one without encapsulation (needs the wireguard and ipip modules: ``test_wireguard_in_vm.py``
runs this file inside the VM).

The underlay of ``tests.vm.underlay``: n1 and n2 on 10.9.1.0/24, n3 behind a router that knows no
pod routes. The overlay is IPIP Always (the route manager's routes in the main table); WireGuard's
table and rule take pod traffic between nodes that have keys over it, as in Calico. A capture on
n1's underlay shows what crossed it: UDP to port 51820 only, never a pod address in clear nor an
IPIP packet while WireGuard is on. Turning it off and on again is a new state handed to the same
managers (what a live FelixConfiguration change does to a running agent).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from felix_agent.calc.model import DesiredState, Route, WireGuard, WireGuardPeer
from felix_agent.dataplane.ipip import IPIPManager
from felix_agent.dataplane.routes import RouteManager
from felix_agent.dataplane.wireguard import WireGuardManager
from felix_agent.wireguard_key import KeyPair, load_or_create
from kernel.netns import netns
from kernel.rtnl_bulk import BulkRTNL
from kernel.wireguard import WireGuard as WireGuardFamily
from tests.vm.probes import Capture, echo, ping_until
from tests.vm.underlay import PodNode, ns_path, underlay, wire_pod
from tests.vm.vm_prerequisites import inner_file_marks

PORT = 51820

pytestmark = inner_file_marks("wireguard", "tests/vm/test_wireguard_in_vm.py")


@dataclass
class Node(PodNode):
    k: int
    netns: str
    underlay: str
    pod_netns: str
    pod_if: str
    driver: BulkRTNL
    state_dir: Path

    def __post_init__(self) -> None:
        self.key: KeyPair = load_or_create(self.state_dir)
        self.routes = RouteManager(self.driver)
        self.ipip = IPIPManager(self.driver, underlay_ip=self.underlay)
        self.wg = WireGuardManager(self.driver, self.key.private, underlay_ip=self.underlay,
                                   netns_path=ns_path(self.netns))

    def restart(self) -> None:
        """A new agent process: key read back from the state directory, fresh managers and sockets."""
        self.wg.close()
        self.__post_init__()


@dataclass
class Cluster:
    nodes: list[Node]
    # The pool's mode: "ipip" (Always) or "direct" (no encapsulation: a route to a node of the same
    # subnet only; the router between the subnets knows no pods, and no BGP tells it).
    mode: str = "ipip"

    def state(self, node: Node, enabled: set[str]) -> DesiredState:
        routes = {Route(node.block, "blackhole", node=node.name),
                  Route(f"{node.pod_ip}/32", "local", device=node.pod_if, node=node.name)}
        if self.mode == "ipip":
            routes |= {Route(o.block, "ipip", gateway=o.underlay, node=o.name) for o in self.nodes if o is not node}
        else:
            routes |= {Route(o.block, "direct", gateway=o.underlay, node=o.name) for o in self.nodes
                       if o is not node and same_subnet(o, node)}
        # A node publishes its key only while WireGuard is on there (Calico clears it otherwise).
        peers = frozenset(WireGuardPeer(o.name, o.key.public_b64, f"{o.underlay}:{PORT}", (o.block,))
                          for o in self.nodes if o is not node and o.name in enabled)
        return DesiredState(node=node.name, routes=frozenset(routes), ipip_enabled=self.mode == "ipip",
                            wireguard=WireGuard(enabled=node.name in enabled, listen_port=PORT, peers=peers))

    def apply(self, enabled: set[str]) -> int:
        writes = 0
        for n in self.nodes:
            state = self.state(n, enabled)
            for m in (n.ipip, n.routes, n.wg):
                m.on_update(state)
            for m in (n.ipip, n.routes, n.wg):
                writes += m.apply(resync=False)
        return writes


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes: list[Node] = []
    with underlay("wgv") as u:
        try:
            for host in u.hosts:
                pod_if = wire_pod(u, host, 1420)
                nodes.append(Node(host.k, host.netns, host.underlay, host.pod_netns, pod_if,
                                  BulkRTNL.open(ns_path(host.netns)), tmp_path / f"state-{host.k}"))
            yield Cluster(nodes)
        finally:
            for node in nodes:
                node.wg.close()
                node.driver.close()


def same_subnet(a: Node, b: Node) -> bool:
    return a.underlay.rsplit(".", 1)[0] == b.underlay.rsplit(".", 1)[0]  # the underlay's /24s


def ping(pod_ns: str, address: str, timeout: float = 8.0) -> bool:
    return ping_until(ns_path(pod_ns), address, timeout)


def pod_addresses_in_clear(cap: Capture, cluster: Cluster) -> list[object]:
    pods = {n.pod_ip for n in cluster.nodes}
    return [p for p in cap.packets if p.src in pods or p.dst in pods or p.inner_src in pods or p.inner_dst in pods]


def all_pairs_reach(cluster: Cluster) -> bool:
    return all(ping(a.pod_netns, b.pod_ip) for a in cluster.nodes for b in cluster.nodes if a is not b)


def test_pod_traffic_between_nodes_is_only_wireguard_udp(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    everyone = {n.name for n in cluster.nodes}
    assert cluster.apply(everyone) > 0
    assert all(n.wg.status == "ok" for n in cluster.nodes)
    link = n1.driver.link("wg.tortie")
    assert link is not None and link.kind == "wireguard" and link.up and link.mtu == 1500 - 60
    with netns(ns_path(n1.netns)), WireGuardFamily() as family:
        device = family.device("wg.tortie")
    assert device.listen_port == PORT and device.fwmark == 0x100000
    assert device.public_key == n1.key.public
    assert {p.public_key: p.allowed_ips for p in device.peers} == {n2.key.public: (n2.block,),
                                                                    n3.key.public: (n3.block,)}
    with Capture(ns_path(n1.netns), "eth0") as cap:
        assert all_pairs_reach(cluster)
    assert not pod_addresses_in_clear(cap, cluster)
    assert not cap.encapsulated("ipip")
    udp = {(p.src, p.dst) for p in cap.packets if p.proto == 17}
    assert ("10.9.1.11", "10.9.1.12") in udp and ("10.9.1.12", "10.9.1.11") in udp
    assert ("10.9.1.11", "10.9.2.13") in udp and ("10.9.2.13", "10.9.1.11") in udp
    assert all(p.proto == 17 for p in cap.packets if p.proto != 1 and {p.src, p.dst} <= {"10.9.1.11", "10.9.1.12",
                                                                                        "10.9.2.13"})
    # handshakes and counters, read back over generic netlink (what `netctl node status` shows)
    n1.wg.apply(resync=True)
    assert n1.wg.device is not None
    assert all(p.last_handshake > 0 and p.rx_bytes > 0 and p.tx_bytes > 0 for p in n1.wg.device.peers)
    assert cluster.apply(everyone) == 0  # nothing left to write


def test_turning_wireguard_off_and_on_live(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    everyone = {n.name for n in cluster.nodes}
    cluster.apply(everyone)
    assert all_pairs_reach(cluster)

    lost = 0
    cluster.apply(set())  # off everywhere: the managers delete the devices and rules
    for _ in range(5):
        lost += not echo(ns_path(n1.pod_netns), n3.pod_ip, timeout=1.0)
    assert n1.driver.link("wg.tortie") is None
    with Capture(ns_path(n1.netns), "eth0") as cap:
        assert all_pairs_reach(cluster)
    tunnelled = {(p.inner_src, p.inner_dst) for p in cap.encapsulated("ipip")}
    assert (n1.pod_ip, n3.pod_ip) in tunnelled and (n3.pod_ip, n1.pod_ip) in tunnelled
    print(f"WireGuard off: {lost} of 5 pings lost during the switch")

    started = time.monotonic()
    cluster.apply(everyone)  # on again: same keys, fresh devices
    with Capture(ns_path(n1.netns), "eth0") as cap:
        assert all_pairs_reach(cluster)
    print(f"WireGuard on again: every pair answered {time.monotonic() - started:.2f} s after the apply began")
    assert not pod_addresses_in_clear(cap, cluster) and not cap.encapsulated("ipip")


def test_without_encapsulation_wireguard_carries_pod_traffic_the_main_table_cannot(cluster: Cluster) -> None:
    """A pool without encapsulation: n1 and n2 (one subnet) route each other's blocks directly, and
    nothing routes n3's (the router knows no pods). WireGuard's table does not need the overlay: with
    it on, every pair answers, n3 included, and only WireGuard's UDP crosses the underlay."""
    cluster.mode = "direct"
    n1, n2, n3 = cluster.nodes
    cluster.apply(set())
    assert ping(n1.pod_netns, n2.pod_ip) and ping(n2.pod_netns, n1.pod_ip)
    assert not echo(ns_path(n1.pod_netns), n3.pod_ip, timeout=1.0)  # no route without WireGuard
    cluster.apply({n.name for n in cluster.nodes})
    with Capture(ns_path(n1.netns), "eth0") as cap:
        assert all_pairs_reach(cluster)
    assert not pod_addresses_in_clear(cap, cluster) and not cap.encapsulated("ipip")
    assert {("10.9.1.11", "10.9.2.13"), ("10.9.1.11", "10.9.1.12")} <= {(p.src, p.dst) for p in cap.packets
                                                                        if p.proto == 17}


def test_a_restarted_node_keeps_its_key_and_peers_reconnect(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    everyone = {n.name for n in cluster.nodes}
    cluster.apply(everyone)
    assert all_pairs_reach(cluster)
    before = n2.key.public
    key_file = n2.state_dir / "wireguard.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    n2.driver.delete_link("wg.tortie")  # the node's dataplane is gone (killed agent, rebooted node)
    n2.restart()
    assert n2.key.public == before
    assert base64.b64decode(n2.key.public_b64) == before
    cluster.apply(everyone)
    # n1 still holds a session with n2's old device and sends on it; WireGuard itself starts a new
    # handshake when nothing came back for ~15 s (keepalive 10 s + rekey timeout 5 s), or at once
    # when the restarted node sends first (n3 below).
    started = time.monotonic()
    assert ping(n1.pod_netns, n2.pod_ip, timeout=40)
    print(f"restarted node: its peer n1 reached it again after {time.monotonic() - started:.1f} s")
    assert ping(n2.pod_netns, n3.pod_ip, timeout=5) and ping(n3.pod_netns, n2.pod_ip, timeout=5)


def test_a_borrowed_address_whose_holder_is_not_a_peer_leaves_the_wireguard_table(cluster: Cluster) -> None:
    """A throw route in table 1 for an address inside n2's block that n2 does not hold (this node's
    own pod, or a keyless node's): the lookup falls back to the main table instead of the tunnel."""
    from dataclasses import replace

    from kernel.rtnl import RTNL

    n1, n2, _ = cluster.nodes
    everyone = {n.name for n in cluster.nodes}
    cluster.apply(everyone)
    borrowed = "10.244.2.9"  # in n2's 10.244.2.0/26

    def into_the_tunnel() -> bool:
        with netns(ns_path(n1.netns)):
            rtnl = RTNL()
        with rtnl:
            device = rtnl.link("wg.tortie")
            return device is not None and rtnl.route_to(borrowed).ifindex == device.index

    assert into_the_tunnel()  # n2's /26 in the WireGuard table
    state = cluster.state(n1, everyone)
    with_throw = replace(state, wireguard=replace(state.wireguard, throw=(f"{borrowed}/32",)))
    n1.wg.on_update(with_throw)
    assert n1.wg.apply() == 1
    assert n1.wg.apply() == 0  # read back and found equal: nothing to write
    assert not into_the_tunnel()  # thrown back to the main table (n2's block through tunl0)
    n1.wg.on_update(state)
    assert n1.wg.apply() == 1 and into_the_tunnel()
