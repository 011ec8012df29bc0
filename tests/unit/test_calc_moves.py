"""Which datastore batches the agent may skip a dataplane pass for (``felix_agent.calc.moves``):
skipping must equal computing. For random pools (every encapsulation, disabled or not), nodes
(the owner known or not), WireGuard on or off, with and without BGP, and random sequences of block
claims, moves between owners, borrowed addresses, releases and affinity changes: whenever the gate
says a batch cannot move the state, the state computed from nothing after it is the one before."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from datastore import codec, keys
from datastore.model import Resource
from felix_agent.calc.graph import compute
from felix_agent.calc.model import DesiredState
from felix_agent.calc.moves import StateMoves
from felix_agent.calc.settings import settings as felix_settings
from felix_agent.calc.snapshot import AFFINITY, BLOCK, Affinity, Snapshot, Update
from felix_agent.calc.wireguard import wireguard
from ipam.block import Block

ME = "node-a"
MACS = {"node-a": "66:00:00:00:00:0a", "node-b": "66:00:00:00:00:0b", "node-c": "66:00:00:00:00:0c"}
CIDRS = ["10.244.0.0/26", "10.244.0.64/26", "10.244.1.0/26", "10.245.0.0/26", "fd00:10:244::/122"]
OWNERS = [ME, "node-b", "node-c", "node-x", None]  # node-x has no Node resource
# (vxlanMode, ipipMode): one encapsulation per pool at most
ENCAPS = [("Never", "Never"), ("Always", "Never"), ("CrossSubnet", "Never"), ("Never", "Always"),
          ("Never", "CrossSubnet")]


def res(kind: str, name: str, spec: dict[str, Any], status: dict[str, Any] | None = None) -> Resource:
    doc: dict[str, Any] = {"apiVersion": "tortie.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}
    return codec.decode(doc | ({"status": status} if status else {}))


def nodes(wireguard_keys: bool) -> list[Resource]:
    status = {"wireguardPublicKey": "a" * 43 + "="} if wireguard_keys else None
    return [res("Node", name, {"bgp": {"ipv4Address": ip, **({"ipv6Address": ip6} if ip6 else {})},
                               "ipv4VXLANTunnelAddr": vtep, "vxlanTunnelMACAddr": MACS[name]}, status)
            for name, ip, ip6, vtep in (("node-a", "10.0.0.1/24", "fd00:1::a/64", "10.244.200.1"),
                                        ("node-b", "10.0.0.2/24", None, "10.244.201.1"),
                                        ("node-c", "10.0.1.3/24", "fd00:2::c/64", "10.244.202.1"))]


def block(cidr: str, owner: str | None, borrowed: str | None) -> Block:
    b = Block.empty(ipaddress.ip_network(cidr), owner)
    b = b.assign_address(b.address(1), "h.own", {"node": owner} if owner else {})
    if borrowed is not None:
        b = b.assign_address(b.address(2), "h.borrowed", {"node": borrowed})
    return b


def full_state(snapshot: Snapshot, bgp: bool) -> DesiredState:
    """What the agent's ``calculate`` gives, computed from nothing."""
    state = compute(snapshot, ME, bgp_owns_remote=bgp)
    return state.__class__(**{**state.__dict__, "wireguard": wireguard(snapshot, ME, [])})


pools = st.lists(st.tuples(st.sampled_from(["10.244.0.0/16", "10.245.0.0/16", "fd00:10:244::/48"]),
                           st.sampled_from(ENCAPS), st.booleans()),
                 min_size=1, max_size=3, unique_by=lambda p: p[0])
change = st.one_of(
    st.tuples(st.just("block"), st.sampled_from(CIDRS), st.sampled_from(OWNERS),
              st.one_of(st.none(), st.sampled_from(OWNERS[:4]))),
    st.tuples(st.just("gone"), st.sampled_from(CIDRS), st.none(), st.none()),
    st.tuples(st.just("affinity"), st.sampled_from(CIDRS), st.sampled_from(OWNERS[:4]), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(pools=pools, bgp=st.booleans(), wg=st.booleans(), initial=st.lists(change, max_size=4),
       batches=st.lists(st.lists(change, min_size=1, max_size=2), min_size=1, max_size=6))
def test_a_skipped_batch_leaves_the_state_as_it_was(pools: list[tuple[str, tuple[str, str], bool]], bgp: bool,
                                                   wg: bool,
                                                   initial: list[tuple[str, str, Any, Any]],
                                                   batches: list[list[tuple[str, str, Any, Any]]]) -> None:
    resources = nodes(wg) + [res("IPPool", f"p{i}", {"cidr": cidr, "vxlanMode": vx, "disabled": disabled,
                                                     "ipipMode": ipip if ":" not in cidr else "Never"})
                             for i, (cidr, (vx, ipip), disabled) in enumerate(pools)]
    if wg:
        resources.append(res("FelixConfiguration", "default", {"wireguardEnabled": True}))
    snapshot = Snapshot.of(resources)
    gate = StateMoves(ME, bgp_owns_remote=bgp,
                      wireguard_on=lambda view: bool(felix_settings(view, ME, []).wireguard_enabled))

    def updates(changes: list[tuple[str, str, Any, Any]]) -> list[Update]:
        out = []
        for what, cidr, owner, borrowed in changes:
            net = ipaddress.ip_network(cidr)
            if what == "affinity":
                out.append(Update(AFFINITY, keys.affinity_key(owner, net), Affinity(owner, net, "pending")))
            else:
                value = block(cidr, owner, borrowed) if what == "block" else None
                out.append(Update(BLOCK, keys.block_key(net), value))
        return out

    listing = list(snapshot.updates()) + updates(initial)
    for u in listing:
        snapshot.apply(u)
    assert gate.moves(listing, snapshot)  # the first batch, the syncer's listing, always moves it
    for batch in batches:
        before = full_state(snapshot, bgp)
        batch_updates = updates(batch)
        for u in batch_updates:
            snapshot.apply(u)
        if not gate.moves(batch_updates, snapshot):
            assert full_state(snapshot, bgp) == before, batch


def test_another_nodes_claim_skips_the_pass_with_bgp_only() -> None:
    """The mesh's case: node-b claims a block of a pool without encapsulation (its affinity, then
    the block); a node running BGP needs no pass, one without needs the route; a claim of its own
    moves it, and so does WireGuard on (its peers' allowed IPs)."""
    def gate(bgp: bool, wg: bool = False) -> tuple[StateMoves, Snapshot]:
        snapshot = Snapshot.of(nodes(wg) + [res("IPPool", "p", {"cidr": "10.244.0.0/16"})])
        moves = StateMoves(ME, bgp_owns_remote=bgp, wireguard_on=lambda view: wg)
        assert moves.moves(list(snapshot.updates()), snapshot)
        return moves, snapshot

    def claim(moves: StateMoves, snapshot: Snapshot, cidr: str, owner: str) -> bool:
        net = ipaddress.ip_network(cidr)
        batch = [Update(AFFINITY, keys.affinity_key(owner, net), Affinity(owner, net, "pending")),
                 Update(BLOCK, keys.block_key(net), block(cidr, owner, None)),
                 Update(AFFINITY, keys.affinity_key(owner, net), Affinity(owner, net))]
        for u in batch:
            snapshot.apply(u)
        return moves.moves(batch, snapshot)

    moves, snapshot = gate(bgp=True)
    assert not claim(moves, snapshot, "10.244.0.0/26", "node-b")
    assert claim(moves, snapshot, "10.244.0.64/26", ME)  # our own blackhole
    assert claim(*gate(bgp=False), "10.244.0.0/26", "node-b")  # the agent programs the route itself
    assert claim(*gate(bgp=True, wg=True), "10.244.0.0/26", "node-b")
