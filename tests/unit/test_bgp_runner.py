"""felix-agent's BGP runner without a speaker running: which datastore view it takes, and the
encapsulation it derives for learned routes from the pools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datastore import codec
from datastore.model import Resource
from felix_agent.bgp_runner import BGPRunner
from felix_agent.calc.snapshot import Snapshot, Update


def pool(name: str, cidr: str, ipip: str) -> Resource:
    doc: dict[str, Any] = {"apiVersion": "tortie.dev/v1", "kind": "IPPool", "metadata": {"name": name},
                           "spec": {"cidr": cidr, "ipipMode": ipip}}
    return codec.decode(doc)


def view(revision: int, *resources: Resource) -> Snapshot:
    snap = Snapshot.of(resources)  # no Node with an address: no speaker configuration, nothing started
    snap.revision = revision
    return snap


def test_encapsulation_follows_the_pool_of_the_prefix(tmp_path: Path) -> None:
    runner = BGPRunner("n1", tmp_path, client=None)
    assert runner.encap_for("10.244.1.0/26") is None  # no view yet
    runner.update(view(1, pool("a", "10.244.0.0/16", "Always"), pool("b", "10.245.0.0/16", "CrossSubnet"),
                       pool("c", "10.246.0.0/16", "Never")))
    assert runner.encap_for("10.244.1.0/26") == "ipip"
    assert runner.encap_for("10.245.1.7/32") == "ipip-cross-subnet"
    assert runner.encap_for("10.246.1.0/26") is None
    assert runner.encap_for("10.96.0.10/32") is None  # in no pool (a service from a router)
    assert runner.encap_for("fd00::/122") is None


def test_an_older_view_never_undoes_a_newer_one(tmp_path: Path) -> None:
    runner = BGPRunner("n1", tmp_path, client=None)
    # The syncer's thread applies revision 7; the dataplane loop then brings its copy of revision 6.
    runner.on_datastore([Update("IPPool", "a", None)], view(7, pool("a", "10.244.0.0/16", "Always")))
    runner.update(view(6, pool("a", "10.244.0.0/16", "Never")))
    assert runner.encap_for("10.244.1.0/26") == "ipip"
    runner.update(view(7, pool("a", "10.244.0.0/16", "Always")))  # the same view again: fine
    runner.on_datastore([Update("WorkloadEndpoint", "w", None)],  # not a BGP input
                        view(8, pool("a", "10.244.0.0/16", "Never")))
    assert runner.encap_for("10.244.1.0/26") == "ipip"
    runner.update(view(9, pool("a", "10.244.0.0/16", "Never")))
    assert runner.encap_for("10.244.1.0/26") is None


def test_an_own_claim_is_handed_over_unless_the_runner_is_busy(tmp_path: Path) -> None:
    import ipaddress
    import json

    from datastore import keys
    from felix_agent.syncer import Syncer, decode
    from ipam.block import Block

    cidr = ipaddress.ip_network("10.244.3.0/26")
    updates = [decode(keys.block_key(cidr), Block.empty(cidr, "n1").to_json(), 9),
               decode(keys.affinity_key("n1", cidr), json.dumps({"state": "confirmed"}).encode(), 9)]
    runner = BGPRunner("n1", tmp_path, client=None)
    syncer = Syncer(None, on_update=None)  # type: ignore[arg-type]  # never started
    syncer.in_sync.set()

    def hand_over(then: Any) -> bool:
        return syncer.put_own_then(updates, 9, then)

    # Busy (the syncer's thread announcing, say): the ADD does not wait, the watch delivers.
    runner._lock.acquire()
    try:
        assert not runner.announce_own(updates, hand_over, 0.0)
    finally:
        runner._lock.release()
    assert keys.block_key(cidr) not in syncer.snapshot.blocks
    # Not configured yet (no Node address): taken in by the syncer all the same, nothing to announce.
    assert runner.announce_own(updates, hand_over, 0.0)
    assert syncer.snapshot.mod_revisions[keys.block_key(cidr)] == 9
    assert not runner.announce_own(updates, hand_over, 0.0)  # held already: the watch's copy, too
