"""Which block and affinity changes can move a node's exports (``bgp.export_inputs``): a batch
it says cannot must leave ``bgp.config.exports`` as it was. Random blocks of several nodes (owned,
orphaned, with addresses borrowed by this node or others), affinities in every state, deletions."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bgp.config import exports
from bgp.export_inputs import AFFINITY, BLOCK, ExportInputs
from datastore import codec, keys
from felix_agent.calc.snapshot import Affinity, Snapshot, Update
from ipam.block import Block

ME = "n1"
NODES = [ME, "n2", "n3", None]
CIDRS = ["10.244.0.0/26", "10.244.0.64/26", "10.244.1.0/26", "10.244.2.0/26"]


def node(name: str, ip: str) -> Any:
    return codec.decode({"apiVersion": "tortie.dev/v1", "kind": "Node", "metadata": {"name": name},
                         "spec": {"bgp": {"ipv4Address": ip}}})


def block(cidr: str, owner: str | None, holders: list[str | None]) -> Block:
    b = Block.empty(ipaddress.ip_network(cidr), owner)
    for i, holder in enumerate(holders):
        b = b.assign_address(b.address(i + 1), f"h{i}", {"node": holder} if holder else {})
    return b


change = st.one_of(
    st.tuples(st.just(BLOCK), st.sampled_from(CIDRS), st.sampled_from(NODES),
              st.lists(st.sampled_from(NODES), max_size=3)),
    st.tuples(st.just("gone"), st.sampled_from(CIDRS), st.none(), st.just([])),
    st.tuples(st.just(AFFINITY), st.sampled_from(CIDRS), st.sampled_from(NODES[:3]),
              st.sampled_from([["pending"], ["confirmed"], []])),  # []: the affinity is deleted
)


def as_updates(changes: list[tuple[str, str, Any, list[Any]]]) -> list[Update]:
    out = []
    for what, cidr, who, extra in changes:
        net = ipaddress.ip_network(cidr)
        if what == AFFINITY:
            out.append(Update(AFFINITY, keys.affinity_key(who, net), Affinity(who, net, extra[0]) if extra else None))
        else:
            out.append(Update(BLOCK, keys.block_key(net), block(cidr, who, extra) if what == BLOCK else None))
    return out


@settings(max_examples=400, deadline=None)
@given(initial=st.lists(change, max_size=6), batches=st.lists(st.lists(change, min_size=1, max_size=3), max_size=8))
def test_a_batch_said_not_to_move_the_exports_leaves_them_as_they_were(
        initial: list[tuple[str, str, Any, list[Any]]], batches: list[list[tuple[str, str, Any, list[Any]]]]) -> None:
    snapshot = Snapshot.of([node(ME, "10.0.0.1/24"), node("n2", "10.0.0.2/24"), node("n3", "10.0.0.3/24")])
    for u in as_updates(initial):
        snapshot.apply(u)
    inputs = ExportInputs(ME)
    assert inputs.moves([(BLOCK, "k", None)])  # not seeded yet: everything moves them
    inputs.reset(snapshot.blocks)
    for batch in batches:
        before = exports(snapshot, ME)
        updates = as_updates(batch)
        for u in updates:
            snapshot.apply(u)
        if not inputs.moves([(u.kind, u.key, u.value) for u in updates]):
            assert exports(snapshot, ME) == before, batch


def test_another_nodes_claim_does_not_move_them_and_ours_does() -> None:
    inputs = ExportInputs(ME)
    inputs.reset({})
    net = ipaddress.ip_network("10.244.0.0/26")
    theirs = [(AFFINITY, keys.affinity_key("n2", net), Affinity("n2", net, "pending")),
              (BLOCK, keys.block_key(net), block("10.244.0.0/26", "n2", ["n2"])),
              (AFFINITY, keys.affinity_key("n2", net), Affinity("n2", net))]
    assert not inputs.moves(theirs)
    assert inputs.moves([(BLOCK, keys.block_key(net), block("10.244.0.0/26", "n2", ["n2", ME]))])  # we borrow
    assert inputs.moves([(BLOCK, keys.block_key(net), block("10.244.0.0/26", "n2", ["n2"]))])  # and give it back
    assert not inputs.moves([(BLOCK, keys.block_key(net), None)])
    assert inputs.moves([(AFFINITY, keys.affinity_key(ME, net), Affinity(ME, net, "pending"))])
    assert inputs.moves([("BGPConfiguration", "default", None)])
