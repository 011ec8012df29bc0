"""``ipam check`` and ``ipam gc`` decided from a snapshot (ipam.check.analyse, ipam.gc.plan_gc): pure
functions of a hand-built Snapshot, so every kind of damage is made here without etcd."""

from __future__ import annotations

import ipaddress

from datastore import keys
from ipam import check
from ipam.block import Block
from ipam.check import EndpointRecord, Snapshot, analyse
from ipam.gc import plan_gc
from ipam.handles import Handle
from ipam.pools import Pool

POOL = Pool("default-ipv4", ipaddress.ip_network("10.244.0.0/16"), 26, False, "all()", False)
B1 = ipaddress.ip_network("10.244.0.0/26")
B2 = ipaddress.ip_network("10.244.0.64/26")
NOW = 10_000.0


def attrs(container: str, *, stamp: float = 0.0, plugin: str = "tortie") -> dict[str, str]:
    return {"network": "net", "containerID": container, "ifname": "eth0", "plugin": plugin,
            "timestamp": str(int(stamp))}


def healthy() -> Snapshot:
    """node-1 owns B1; pod "a" holds 10.244.0.0 through its handle and carries it on its endpoint."""
    block, _ = Block.empty(B1, "node-1").assign(1, "net.a.eth0", attrs("a"))
    return Snapshot(
        revision=7,
        blocks={B1: (block, 3)},
        handles={"net.a.eth0": (Handle({str(B1): 1}, "node-1", attrs("a")), 4)},
        affinities={("node-1", B1): 2},
        pools=[POOL],
        nodes={"node-1"},
        endpoints={("net", "a", "eth0"): EndpointRecord("default/a", frozenset({"10.244.0.0"}))},
    )


def kinds(snap: Snapshot) -> list[str]:
    return sorted(p.kind for p in analyse(snap).problems)


def test_a_healthy_state_has_no_problem_and_counts_its_usage() -> None:
    report = analyse(healthy())
    assert report.problems == [] and report.revision == 7
    assert [(u.name, u.in_use) for u in report.pools] == [("default-ipv4", 1)]
    assert [(u.cidr, u.total, u.in_use) for u in report.blocks] == [(B1, 64, 1)]


def test_an_address_whose_handle_is_gone_is_leaked() -> None:
    snap = healthy()
    del snap.handles["net.a.eth0"]
    assert kinds(snap) == [check.ENDPOINT_ADDRESS_NOT_RESERVED, check.LEAKED_ADDRESS]


def test_a_handle_that_counts_more_than_its_blocks_hold() -> None:
    snap = healthy()
    snap.handles["net.a.eth0"] = (Handle({str(B1): 2}, "node-1", attrs("a")), 4)
    assert kinds(snap) == [check.HANDLE_WITHOUT_ADDRESSES]


def test_a_tortie_handle_without_its_endpoint() -> None:
    snap = healthy()
    snap.endpoints.clear()
    assert kinds(snap) == [check.ENDPOINTLESS_HANDLE]
    snap.handles["net.a.eth0"][0].attrs["plugin"] = "bridge"  # another plugin's attachment has no endpoint
    assert kinds(snap) == []


def test_affinities_blocks_nodes_and_pools_that_do_not_match() -> None:
    snap = healthy()
    snap.affinities[("node-2", B2)] = 5  # no such block, no such node
    assert kinds(snap) == [check.AFFINITY_WITHOUT_BLOCK, check.UNKNOWN_NODE]
    snap = healthy()
    snap.affinities.clear()
    assert kinds(snap) == [check.BLOCK_WITHOUT_AFFINITY]
    snap = healthy()
    snap.pools = []
    assert check.BLOCK_OUTSIDE_POOLS in kinds(snap)


def test_an_unreadable_handle_still_owns_its_addresses() -> None:
    snap = healthy()
    del snap.handles["net.a.eth0"]
    snap.unreadable.add(keys.handle_key("net.a.eth0"))
    snap.endpoints.clear()
    assert check.LEAKED_ADDRESS not in kinds(snap)
    assert plan_gc(snap, 0, NOW).addresses == {}


def test_gc_frees_a_leak_only_after_the_grace_period_and_names_the_sequence_read() -> None:
    block, _ = Block.empty(B1, "node-1").assign(2, "net.gone.eth0", attrs("gone", stamp=NOW - 100))
    snap = Snapshot(revision=1, blocks={B1: (block, 3)}, affinities={("node-1", B1): 2}, pools=[POOL],
                    nodes={"node-1"})
    young = plan_gc(snap, grace_seconds=600, now=NOW)
    assert young.addresses == {} and young.waiting == 2
    old = plan_gc(snap, grace_seconds=60, now=NOW)
    assert old.addresses == {B1[0]: block.sequence, B1[1]: block.sequence}
    assert set(old.owners.values()) == {"net.gone.eth0"} and old.waiting == 0


def test_gc_plans_empty_handles_blockless_affinities_and_endpointless_handles() -> None:
    snap = healthy()
    snap.handles["net.empty.eth0"] = (Handle({}, "node-1", attrs("empty", plugin="bridge")), 9)
    snap.affinities[("node-1", B2)] = 11
    snap.endpoints.clear()  # pod a's endpoint is gone: its handle is endpointless
    plan = plan_gc(snap, grace_seconds=60, now=NOW)
    assert plan.handles == {"net.empty.eth0": 9}
    assert plan.affinities == {("node-1", B2): 11}
    assert plan.endpointless == {"net.a.eth0": 4}
    assert plan.addresses == {}  # a leak needs its handle gone, not only its endpoint
