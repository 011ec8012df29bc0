"""The calculation graph's routing side: blackholes for own blocks, local endpoint routes, remote
blocks by each pool's encapsulation (VXLAN, IPIP, CrossSubnet, direct), borrowed /32s, tunnel
peers, NAT pools, and node removal."""

from __future__ import annotations

import ipaddress
from typing import Any

from datastore import codec
from datastore.model import Resource
from felix_agent.calc.graph import compute
from felix_agent.calc.model import DesiredState, Route, VXLANPeer
from felix_agent.calc.routes import block_routing_key, link_local
from felix_agent.calc.snapshot import Snapshot
from ipam.block import Block

ME = "node-a"
MACS = {"node-a": "66:00:00:00:00:0a", "node-b": "66:00:00:00:00:0b", "node-c": "66:00:00:00:00:0c"}


def res(kind: str, name: str, spec: dict[str, Any], ns: str | None = None) -> Resource:
    meta = {"name": name} | ({"namespace": ns} if ns else {})
    return codec.decode({"apiVersion": "tortie.dev/v1", "kind": kind, "metadata": meta, "spec": spec})


def node(name: str, ip: str, vtep: str | None = None, ip6: str | None = None) -> Resource:
    spec: dict[str, Any] = {"bgp": {"ipv4Address": ip} | ({"ipv6Address": ip6} if ip6 else {})}
    if vtep:
        spec |= {"ipv4VXLANTunnelAddr": vtep, "vxlanTunnelMACAddr": MACS[name]}
    return res("Node", name, spec)


def pool(name: str, cidr: str, **spec: Any) -> Resource:
    return res("IPPool", name, {"cidr": cidr, **spec})


def block(cidr: str, owner: str | None, borrowed: dict[str, str] | None = None) -> Block:
    """A block owned by ``owner``, with addresses handed to other nodes (address → node)."""
    b = Block.empty(ipaddress.ip_network(cidr), owner)
    for address, holder in (borrowed or {}).items():
        b = b.assign_address(ipaddress.ip_address(address), f"h.{address}", {"node": holder})
    return b


def wep(name: str, ip: str, on: str = ME) -> Resource:
    return res("WorkloadEndpoint", name, {"node": on, "interfaceName": f"tor{name}", "containerID": name,
                                          "network": "tnet", "ipNetworks": [ip]}, "default")


# node-a and node-b share 10.0.0.0/24; node-c is behind a router in 10.0.1.0/24.
NODES = [node("node-a", "10.0.0.1/24", "10.244.0.1", "fd00:1::a/64"), node("node-b", "10.0.0.2/24", "10.244.1.1"),
         node("node-c", "10.0.1.3/24", "10.244.2.1", "fd00:2::c/64")]


def routes_of(ds: DesiredState) -> dict[str, Route]:
    return {r.dst: r for r in ds.routes}


def state(resources: list[Resource], blocks: list[Block], me: str = ME) -> DesiredState:
    return compute(Snapshot.of(resources, blocks), me)


def test_vxlan_always_routes_remote_blocks_through_vteps_and_blackholes_own() -> None:
    ds = state([*NODES, pool("vx", "10.244.0.0/16", vxlanMode="Always", natOutgoing=True),
                wep("pod-1", "10.244.0.5/32")],
               [block("10.244.0.0/26", "node-a"), block("10.244.1.0/26", "node-b"), block("10.244.2.0/26", "node-c")])
    assert routes_of(ds) == {
        "10.244.0.0/26": Route("10.244.0.0/26", "blackhole", node="node-a"),
        "10.244.0.5/32": Route("10.244.0.5/32", "local", device="torpod-1", node="node-a"),
        "10.244.1.0/26": Route("10.244.1.0/26", "vxlan", "10.244.1.1", "vxlan.tortie", "node-b"),
        "10.244.2.0/26": Route("10.244.2.0/26", "vxlan", "10.244.2.1", "vxlan.tortie", "node-c"),
    }
    assert ds.vxlan_peers == {VXLANPeer("node-b", "10.0.0.2", "10.244.1.1", MACS["node-b"]),
                              VXLANPeer("node-c", "10.0.1.3", "10.244.2.1", MACS["node-c"])}
    assert ds.local_vtep == VXLANPeer("node-a", "10.0.0.1", "10.244.0.1", MACS["node-a"])
    assert not ds.ipip_enabled
    assert ds.nat_pools == ds.all_pools == {"10.244.0.0/16"}
    assert ds.mtu is None


def test_cross_subnet_vxlan_is_native_within_the_subnet() -> None:
    ds = state([*NODES, pool("vx", "10.246.0.0/16", vxlanMode="CrossSubnet")],
               [block("10.246.1.0/26", "node-b"), block("10.246.2.0/26", "node-c")])
    routes = routes_of(ds)
    assert routes["10.246.1.0/26"] == Route("10.246.1.0/26", "direct", "10.0.0.2", None, "node-b")
    assert routes["10.246.2.0/26"] == Route("10.246.2.0/26", "vxlan", "10.244.2.1", "vxlan.tortie", "node-c")
    assert ds.local_vtep is not None


def test_ipip_always_and_cross_subnet() -> None:
    ds = state([*NODES, pool("always", "10.245.0.0/16", ipipMode="Always"),
                pool("cross", "10.248.0.0/16", ipipMode="CrossSubnet")],
               [block("10.245.1.0/26", "node-b"), block("10.248.1.0/26", "node-b"), block("10.248.2.0/26", "node-c")])
    routes = routes_of(ds)
    assert routes["10.245.1.0/26"] == Route("10.245.1.0/26", "ipip", "10.0.0.2", "tunl0", "node-b")
    assert routes["10.248.1.0/26"] == Route("10.248.1.0/26", "direct", "10.0.0.2", None, "node-b")
    assert routes["10.248.2.0/26"] == Route("10.248.2.0/26", "ipip", "10.0.1.3", "tunl0", "node-c")
    assert ds.ipip_enabled and ds.local_vtep is None and ds.vxlan_peers == frozenset()


def test_no_encapsulation_gives_direct_routes_and_unknown_pool_too() -> None:
    ds = state([*NODES, pool("plain", "10.247.0.0/16")],
               [block("10.247.2.0/26", "node-c"), block("10.99.0.0/26", "node-c")])
    routes = routes_of(ds)
    assert routes["10.247.2.0/26"] == Route("10.247.2.0/26", "direct", "10.0.1.3", None, "node-c")
    assert routes["10.99.0.0/26"].kind == "direct"  # its pool was deleted: no encapsulation known


def test_borrowed_addresses_get_host_routes_to_their_node() -> None:
    ds = state([*NODES, pool("vx", "10.244.0.0/16", vxlanMode="Always"), wep("pod-9", "10.244.1.9/32")],
               [block("10.244.0.0/26", "node-a", {"10.244.0.7": "node-b"}),
                block("10.244.1.0/26", "node-b", {"10.244.1.5": "node-c", "10.244.1.9": "node-a"})])
    routes = routes_of(ds)
    # node-b borrowed from our block: the /32 beats our blackhole
    assert routes["10.244.0.7/32"] == Route("10.244.0.7/32", "vxlan", "10.244.1.1", "vxlan.tortie", "node-b")
    # node-c borrowed from node-b's block: the /32 beats the route to node-b
    assert routes["10.244.1.5/32"] == Route("10.244.1.5/32", "vxlan", "10.244.2.1", "vxlan.tortie", "node-c")
    # we borrowed from node-b: our endpoint's local route is enough
    assert routes["10.244.1.9/32"] == Route("10.244.1.9/32", "local", device="torpod-9", node="node-a")
    assert routes["10.244.0.0/26"].kind == "blackhole" and routes["10.244.1.0/26"].kind == "vxlan"


def test_node_removal_removes_its_routes_and_peer() -> None:
    blocks = [block("10.244.1.0/26", "node-b"), block("10.244.2.0/26", "node-c", {"10.244.2.9": "node-b"})]
    vx = pool("vx", "10.244.0.0/16", vxlanMode="Always")
    before = state([*NODES, vx], blocks)
    after = state([n for n in NODES if n.name != "node-b"] + [vx], blocks)
    assert {"10.244.1.0/26", "10.244.2.9/32"} <= set(routes_of(before))
    assert set(routes_of(after)) == {"10.244.2.0/26"}
    assert {p.node for p in after.vxlan_peers} == {"node-c"}


def test_vxlan_needs_the_remote_vtep() -> None:
    bare = node("node-b", "10.0.0.2/24")  # no VXLAN address or MAC yet
    ds = state([NODES[0], bare, NODES[2], pool("vx", "10.244.0.0/16", vxlanMode="Always")],
               [block("10.244.1.0/26", "node-b"), block("10.244.2.0/26", "node-c")])
    assert set(routes_of(ds)) == {"10.244.2.0/26"}
    assert {p.node for p in ds.vxlan_peers} == {"node-c"}
    me_bare = state([node("node-a", "10.0.0.1/24"), *NODES[1:], pool("vx", "10.244.0.0/16", vxlanMode="Always")], [])
    assert me_bare.local_vtep is None


def test_ipv6_blocks_cross_vxlan_via_the_link_local_of_the_remote_vtep() -> None:
    ds = state([*NODES, pool("vx6", "fd00:244::/48", vxlanMode="Always"), pool("plain6", "fd00:247::/48")],
               [block("fd00:244:0:2::/122", "node-c"), block("fd00:247:0:2::/122", "node-c"),
                block("fd00:247:0:1::/122", "node-b")])
    routes = routes_of(ds)
    assert link_local("66:00:00:00:00:0c") == "fe80::6400:ff:fe00:c"
    assert routes["fd00:244:0:2::/122"] == Route("fd00:244:0:2::/122", "vxlan", "fe80::6400:ff:fe00:c",
                                                 "vxlan.tortie", "node-c")
    assert routes["fd00:247:0:2::/122"] == Route("fd00:247:0:2::/122", "direct", "fd00:2::c", None, "node-c")
    assert "fd00:247:0:1::/122" not in routes  # node-b has no IPv6 address to route through


def test_disabled_pools_count_only_while_they_hold_blocks() -> None:
    old = pool("old", "10.250.0.0/16", vxlanMode="Always", disabled=True)
    assert state([*NODES, old], []).local_vtep is None
    assert state([*NODES, old], [block("10.250.1.0/26", "node-b")]).local_vtep is not None


def test_with_bgp_the_peers_own_the_remote_routes_outside_vxlan() -> None:
    resources = [*NODES, pool("vx", "10.246.0.0/16", vxlanMode="CrossSubnet"),
                 pool("ipip", "10.245.0.0/16", ipipMode="Always"), wep("pod-1", "10.245.0.5/32")]
    blocks = [block("10.245.0.0/26", "node-a"), block("10.245.1.0/26", "node-b"),
              block("10.246.1.0/26", "node-b"), block("10.246.2.0/26", "node-c")]
    ds = compute(Snapshot.of(resources, blocks), ME, bgp_owns_remote=True)
    assert routes_of(ds) == {
        "10.245.0.0/26": Route("10.245.0.0/26", "blackhole", node="node-a"),
        "10.245.0.5/32": Route("10.245.0.5/32", "local", device="torpod-1", node="node-a"),
        "10.246.2.0/26": Route("10.246.2.0/26", "vxlan", "10.244.2.1", "vxlan.tortie", "node-c"),
    }  # the ipip and direct routes to node-b come from BGP (protocol 81)
    assert ds.ipip_enabled  # tunl0 is still needed: BGP's routes go through it
    without = compute(Snapshot.of(resources, blocks), ME)
    assert {r.kind for r in without.routes} == {"blackhole", "local", "vxlan", "ipip", "direct"}


def test_a_block_whose_routing_key_stays_gives_the_same_routes() -> None:
    """The agent skips the dataplane's pass for block updates that keep ``block_routing_key``: an
    owner's own assignments and releases must leave the routes as they were, a borrowed address not."""
    resources = [*NODES, pool("vx", "10.244.0.0/16", vxlanMode="Always"), wep("pod-1", "10.244.1.5/32")]
    for owner in ("node-a", "node-b"):
        before = block("10.244.1.0/26", owner, {"10.244.1.9": "node-c"})
        own, _ = before.assign(3, "h.own", {"node": owner, "pod": "x"})
        unattributed, _ = own.assign(1, "h.none", {})
        released, _ = unattributed.release_handle("h.own")
        for after in (own, unattributed, released):
            assert block_routing_key(after) == block_routing_key(before)
            assert state(resources, [after]).routes == state(resources, [before]).routes
        lent = before.assign_address(ipaddress.ip_address("10.244.1.20"), "h.lent", {"node": "node-c"})
        assert block_routing_key(lent) != block_routing_key(before)
        assert state(resources, [lent]).routes != state(resources, [before]).routes
