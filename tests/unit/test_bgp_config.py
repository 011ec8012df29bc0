"""A node's speaker configuration and exports, from Node, BGPConfiguration and BGPPeer resources:
mesh, mesh disabled with reflectors wired by selectors, external peers (global, per node, by
selector), AS numbers, the passive rule, and the routes a node announces (borrowed addresses too)."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

from bgp.config import exports, speaker_config
from bgp.model import CLIENT, EXTERNAL, MESH, NODE_SPECIFIC, REFLECTOR, Export, Peer, PeerOptions, SpeakerConfig
from datastore import codec
from datastore.model import Resource
from felix_agent.calc.snapshot import Affinity, Snapshot
from ipam.block import Block

RR_LABEL = {"route-reflector": "true"}


def res(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> Resource:
    meta: dict[str, Any] = {"name": name} | ({"labels": labels} if labels else {})
    return codec.decode({"apiVersion": "tortie.dev/v1", "kind": kind, "metadata": meta, "spec": spec})


def node(name: str, ip: str | None, *, asn: int | None = None, rr: str | None = None, ip6: str | None = None,
         labels: dict[str, str] | None = None) -> Resource:
    bgp: dict[str, Any] = {}
    if ip:
        bgp["ipv4Address"] = ip
    if ip6:
        bgp["ipv6Address"] = ip6
    if asn:
        bgp["asNumber"] = asn
    if rr:
        bgp["routeReflectorClusterID"] = rr
    return res("Node", name, {"bgp": bgp}, labels)


def peer(name: str, **spec: Any) -> Resource:
    return res("BGPPeer", name, spec)


def bgpconfig(**spec: Any) -> Resource:
    return res("BGPConfiguration", "default", spec)


def cluster(n: int, **kwargs: Any) -> list[Resource]:
    return [node(f"n{i}", f"10.0.0.{i}/24", **kwargs) for i in range(1, n + 1)]


def configs(resources: list[Resource]) -> dict[str, SpeakerConfig]:
    snap = Snapshot.of(resources)
    out = {}
    for r in resources:
        if r.kind.KIND == "Node" and (config := speaker_config(snap, r.name)) is not None:
            out[r.name] = config
    return out


def sessions(config: SpeakerConfig) -> dict[str, tuple[str, str]]:
    """peer address → (kind, peer name)"""
    return {p.address: (p.kind, p.name) for p in config.peers}


def assert_symmetric(cfgs: dict[str, SpeakerConfig]) -> None:
    """Every session between two nodes exists on both, with exactly one passive side."""
    by_address = {c.local_address: c for c in cfgs.values()}
    for c in cfgs.values():
        for p in c.peers:
            other = by_address.get(p.address)
            if other is None:
                continue
            back = next(q for q in other.peers if q.address == c.local_address)
            assert p.passive != back.passive, (c.node, p, back)
            assert p.asn == other.asn and back.asn == c.asn


# ---- mesh ---------------------------------------------------------------------------------------


def test_full_mesh_of_three() -> None:
    cfgs = configs(cluster(3))
    assert set(cfgs) == {"n1", "n2", "n3"}
    n1 = cfgs["n1"]
    assert (n1.node, n1.router_id, n1.local_address, n1.asn, n1.listen_port, n1.cluster_id) == \
        ("n1", "10.0.0.1", "10.0.0.1", 64512, 179, None)
    assert n1.peers == (Peer("10.0.0.2", 64512, MESH, "n2", None, 179, passive=False),
                        Peer("10.0.0.3", 64512, MESH, "n3", None, 179, passive=False))
    assert [(p.address, p.passive) for p in cfgs["n2"].peers] == [("10.0.0.1", True), ("10.0.0.3", False)]
    assert [(p.address, p.passive) for p in cfgs["n3"].peers] == [("10.0.0.1", True), ("10.0.0.2", True)]
    assert_symmetric(cfgs)


def test_a_node_without_an_ipv4_address_has_no_speaker_and_no_sessions() -> None:
    resources = [*cluster(2), node("v6only", None, ip6="fd00::9/64")]
    snap = Snapshot.of(resources)
    assert speaker_config(snap, "v6only") is None
    assert speaker_config(snap, "missing") is None
    n1 = speaker_config(snap, "n1")
    assert n1 is not None and list(sessions(n1)) == ["10.0.0.2"]


def test_passive_side_is_the_numerically_higher_address() -> None:
    # Compared as strings, "10.0.0.10" < "10.0.0.9"; as addresses it is the higher one.
    cfgs = configs([node("a", "10.0.0.9/24"), node("b", "10.0.0.10/24")])
    assert cfgs["a"].peers[0].passive is False
    assert cfgs["b"].peers[0].passive is True


def test_peer_order_is_deterministic() -> None:
    resources = [node(f"n{i}", f"10.0.{i % 3}.{i}/16") for i in range(1, 9)]
    first = configs(resources)["n1"]
    again = configs(list(reversed(resources)))["n1"]
    assert first == again
    addresses = [ipaddress.ip_address(p.address) for p in first.peers]
    assert addresses == sorted(addresses)


# ---- AS numbers ---------------------------------------------------------------------------------


def test_as_number_node_then_global_then_default() -> None:
    assert configs(cluster(2))["n1"].asn == 64512
    cfgs = configs([node("n1", "10.0.0.1/24"), node("n2", "10.0.0.2/24", asn=65002), bgpconfig(asNumber=65001)])
    assert cfgs["n1"].asn == 65001
    assert cfgs["n2"].asn == 65002
    assert cfgs["n1"].peers[0].asn == 65002  # the peer's own AS: an eBGP mesh session
    assert cfgs["n2"].peers[0].asn == 65001
    assert configs([*cluster(1), bgpconfig(asNumber="1.10")])["n1"].asn == 65546


def test_listen_port_is_used_for_sessions_between_nodes() -> None:
    cfgs = configs([*cluster(2), bgpconfig(listenPort=1179)])
    assert cfgs["n1"].listen_port == 1179
    assert cfgs["n1"].peers[0].port == 1179


# ---- route reflectors ---------------------------------------------------------------------------


def rr_cluster(reflectors: dict[str, str], nodes: int = 4, mesh: bool = False) -> list[Resource]:
    """n1..n<nodes>; the ones in ``reflectors`` (name → cluster ID) are labelled reflectors, and
    every node peers with the reflectors (Calico's documented pattern)."""
    out = [node(f"n{i}", f"10.0.0.{i}/24", rr=reflectors.get(f"n{i}"),
                labels=RR_LABEL if f"n{i}" in reflectors else None) for i in range(1, nodes + 1)]
    return out + [bgpconfig(nodeToNodeMeshEnabled=mesh),
                  peer("peer-with-reflectors", nodeSelector="all()", peerSelector="route-reflector == 'true'")]


def test_mesh_disabled_one_reflector_wired_by_selectors() -> None:
    cfgs = configs(rr_cluster({"n1": "224.0.0.1"}))
    rr = cfgs["n1"]
    assert rr.cluster_id == "224.0.0.1"
    assert sessions(rr) == {"10.0.0.2": (CLIENT, "n2"), "10.0.0.3": (CLIENT, "n3"), "10.0.0.4": (CLIENT, "n4")}
    for name in ("n2", "n3", "n4"):
        assert cfgs[name].cluster_id is None
        assert sessions(cfgs[name]) == {"10.0.0.1": (REFLECTOR, "n1")}  # and no session between clients
    assert_symmetric(cfgs)


def test_reflectors_stay_out_of_the_mesh() -> None:
    cfgs = configs(rr_cluster({"n1": "224.0.0.1"}, mesh=True))
    assert sessions(cfgs["n2"]) == {"10.0.0.1": (REFLECTOR, "n1"), "10.0.0.3": (MESH, "n3"),
                                    "10.0.0.4": (MESH, "n4")}
    assert {kind for kind, _ in sessions(cfgs["n1"]).values()} == {CLIENT}
    assert_symmetric(cfgs)


def test_two_reflectors_of_one_cluster() -> None:
    cfgs = configs(rr_cluster({"n1": "224.0.0.1", "n2": "224.0.0.1"}, nodes=5))
    # Fellow reflectors peer (each one's own blocks must reach the other) but are not each other's
    # clients, so neither reflects its clients' routes to the other.
    assert sessions(cfgs["n1"]) == {"10.0.0.2": (REFLECTOR, "n2"), "10.0.0.3": (CLIENT, "n3"),
                                    "10.0.0.4": (CLIENT, "n4"), "10.0.0.5": (CLIENT, "n5")}
    assert sessions(cfgs["n2"])["10.0.0.1"] == (REFLECTOR, "n1")
    for name in ("n3", "n4", "n5"):
        assert sessions(cfgs[name]) == {"10.0.0.1": (REFLECTOR, "n1"), "10.0.0.2": (REFLECTOR, "n2")}
    assert_symmetric(cfgs)


def test_reflectors_of_different_clusters_are_each_others_clients() -> None:
    cfgs = configs(rr_cluster({"n1": "224.0.0.1", "n2": "224.0.0.2"}))
    assert sessions(cfgs["n1"])["10.0.0.2"] == (CLIENT, "n2")
    assert sessions(cfgs["n2"])["10.0.0.1"] == (CLIENT, "n1")
    assert_symmetric(cfgs)


def test_reflector_named_by_address_gets_the_reverse_sessions() -> None:
    # The pre-selector way: every node peers with the reflector's IP.
    resources = [node("n1", "10.0.0.1/24", rr="224.0.0.1"), *cluster(3)[1:], bgpconfig(nodeToNodeMeshEnabled=False),
                 peer("to-rr", peerIP="10.0.0.1", asNumber=64512)]
    cfgs = configs(resources)
    assert sessions(cfgs["n2"]) == {"10.0.0.1": (REFLECTOR, "n1")}
    assert sessions(cfgs["n1"]) == {"10.0.0.2": (CLIENT, "n2"), "10.0.0.3": (CLIENT, "n3")}
    assert_symmetric(cfgs)


# ---- explicit peers -----------------------------------------------------------------------------


def test_global_external_peer_applies_to_every_node() -> None:
    cfgs = configs([*cluster(3), peer("tor", peerIP="10.0.0.254", asNumber=65000,
                                      password={"file": {"path": "/etc/tortie/tor.key"}})])
    for c in cfgs.values():
        tor = next(p for p in c.peers if p.address == "10.0.0.254")
        assert tor == Peer("10.0.0.254", 65000, EXTERNAL, "tor", None, 179, passive=False,
                           options=PeerOptions(password_file="/etc/tortie/tor.key"))


def test_per_node_external_peer_with_port() -> None:
    cfgs = configs([*cluster(3), peer("tor-n2", node="n2", peerIP="10.0.0.254:1790", asNumber=65000)])
    assert "10.0.0.254" not in sessions(cfgs["n1"])
    assert "10.0.0.254" not in sessions(cfgs["n3"])
    tor = next(p for p in cfgs["n2"].peers if p.address == "10.0.0.254")
    assert (tor.kind, tor.name, tor.port, tor.asn) == (NODE_SPECIFIC, "tor-n2", 1790, 65000)


def test_external_peer_by_node_selector() -> None:
    resources = [node("n1", "10.0.0.1/24", labels={"rack": "a"}), node("n2", "10.0.0.2/24", labels={"rack": "b"}),
                 node("n3", "10.0.0.3/24", labels={"rack": "a"}),
                 peer("tor-a", nodeSelector="rack == 'a'", peerIP="10.0.0.253", asNumber=65000)]
    cfgs = configs(resources)
    assert sessions(cfgs["n1"])["10.0.0.253"] == (NODE_SPECIFIC, "tor-a")
    assert sessions(cfgs["n3"])["10.0.0.253"] == (NODE_SPECIFIC, "tor-a")
    assert "10.0.0.253" not in sessions(cfgs["n2"])


def test_global_peer_wins_over_a_node_specific_one_to_the_same_address() -> None:
    cfgs = configs([*cluster(2), peer("a-node", node="n1", peerIP="10.0.0.254", asNumber=65000),
                    peer("z-global", peerIP="10.0.0.254", asNumber=65001)])
    assert [(p.name, p.asn) for p in cfgs["n1"].peers if p.address == "10.0.0.254"] == [("z-global", 65001)]


def test_ibgp_external_peer_of_a_reflector_is_its_client() -> None:
    cfgs = configs([node("n1", "10.0.0.1/24", rr="224.0.0.1"), peer("bird", peerIP="10.0.0.200", asNumber=64512),
                    peer("ebgp", peerIP="10.0.0.201", asNumber=65000)])
    assert sessions(cfgs["n1"]) == {"10.0.0.200": (CLIENT, "bird"), "10.0.0.201": (EXTERNAL, "ebgp")}


def test_ipv6_and_self_peers_are_left_out() -> None:
    cfgs = configs([*cluster(2), peer("v6", peerIP="fd00::1", asNumber=65000), peer("me", node="n1",
                                                                                       peerIP="10.0.0.1", asNumber=1)])
    assert list(sessions(cfgs["n1"])) == ["10.0.0.2"]


# ---- exports ------------------------------------------------------------------------------------


def block(cidr: str, owner: str | None, held: dict[str, str] | None = None) -> Block:
    b = Block.empty(ipaddress.ip_network(cidr), owner)
    for address, holder in (held or {}).items():
        b = b.assign_address(ipaddress.ip_address(address), f"h.{address}", {"node": holder})
    return b


def test_exports_own_blocks_and_borrowed_addresses() -> None:
    nodes = [node("n1", "10.0.0.1/24", ip6="fd00::1/64"), node("n2", "10.0.0.2/24")]
    blocks = [
        block("10.244.0.0/26", "n1", {"10.244.0.5": "n1", "10.244.0.6": "n2"}),  # n2 borrowed .6
        block("10.244.0.64/26", "n2", {"10.244.0.70": "n1", "10.244.0.71": "n2"}),  # n1 borrowed .70
        block("10.244.1.0/26", None, {"10.244.1.9": "n1"}),  # no owner
        block("fd00:10::/122", "n1"),
        block("fd00:10::40/122", "n2", {"fd00:10::41": "n1"}),
    ]
    snap = Snapshot.of(nodes, blocks)
    assert exports(snap, "n1") == frozenset({
        Export("10.244.0.0/26", "10.0.0.1"), Export("10.244.0.70/32", "10.0.0.1"),
        Export("10.244.1.9/32", "10.0.0.1"), Export("fd00:10::/122", "fd00::1"),
        Export("fd00:10::41/128", "fd00::1")})
    # n2 has no IPv6 address: its IPv6 block is not announced.
    assert exports(snap, "n2") == frozenset({Export("10.244.0.64/26", "10.0.0.2"),
                                             Export("10.244.0.6/32", "10.0.0.2")})
    assert exports(snap, "nobody") == frozenset()


def test_exports_skip_unconfirmed_affinities_and_pools_not_exported() -> None:
    nodes = [node("n1", "10.0.0.1/24")]
    pools = [res("IPPool", "quiet", {"cidr": "10.250.0.0/16", "disableBGPExport": True}),
             res("IPPool", "loud", {"cidr": "10.244.0.0/16"})]
    blocks = [block("10.244.0.0/26", "n1"), block("10.244.0.64/26", "n1"), block("10.250.0.0/26", "n1")]
    pending = Affinity("n1", ipaddress.ip_network("10.244.0.64/26"), "pending")
    snap = Snapshot.of([*nodes, *pools], blocks, [pending])
    assert exports(snap, "n1") == frozenset({Export("10.244.0.0/26", "10.0.0.1")})


def test_every_pair_of_a_large_mesh_is_symmetric() -> None:
    resources = [node(f"n{i}", f"10.1.{i // 200}.{i % 200 + 1}/16", asn=65000 + i % 2) for i in range(12)]
    cfgs = configs(resources)
    assert_symmetric(cfgs)
    for a, b in itertools.combinations(cfgs.values(), 2):
        assert b.local_address in sessions(a)
