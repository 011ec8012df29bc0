"""The agent's own writes handed to the syncer (``Syncer.put_own``): in the snapshot at once, their
watch event a no-op when it comes, never able to undo a newer change. The syncer's event handling
is fed by hand here (no etcd): the same code its thread runs on each batch of watch events."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from datastore import codec, keys
from datastore.etcd import KeyValue, WatchEvent
from felix_agent.calc.snapshot import Update
from felix_agent.syncer import Syncer, decode

KEY = keys.resource_key("workloadendpoints", "pod-1", "default")


def endpoint(app: str, revision: int) -> tuple[Any, KeyValue]:
    doc = {"apiVersion": "tortie.dev/v1", "kind": "WorkloadEndpoint",
           "metadata": {"name": "pod-1", "namespace": "default", "labels": {"app": app}},
           "spec": {"node": "node-a", "interfaceName": "torpod1", "containerID": "c1",
                    "ipNetworks": ["10.244.0.2/32"]}}
    resource = codec.decode(doc)
    resource.metadata.resource_version = str(revision)
    raw = codec.stored_bytes(resource)
    return resource, KeyValue(KEY, raw, revision, revision, 1)


def in_sync_syncer() -> Syncer:
    syncer = Syncer(None, on_update=None)  # type: ignore[arg-type]  # never started: no client needed
    syncer.in_sync.set()
    return syncer


def test_own_write_is_held_at_once_and_its_event_changes_nothing() -> None:
    syncer = in_sync_syncer()
    written, kv = endpoint("web", 10)
    assert syncer.put_own("WorkloadEndpoint", KEY, written, 10)
    assert syncer.snapshot.endpoints[KEY] is written
    assert syncer._handle([WatchEvent(kv, deleted=False)]) == []
    assert syncer.snapshot.endpoints[KEY] is written and syncer.snapshot.mod_revisions[KEY] == 10
    assert not syncer.put_own("WorkloadEndpoint", KEY, written, 10)  # already held


def test_a_newer_change_wins_and_an_older_one_cannot_undo_it() -> None:
    syncer = in_sync_syncer()
    written, _ = endpoint("web", 10)
    syncer.put_own("WorkloadEndpoint", KEY, written, 10)
    # An event from before our write (a deletion of the earlier endpoint at 9) arrives late: ignored.
    _, older = endpoint("old", 9)
    assert syncer._handle([WatchEvent(older, deleted=True)]) == []
    assert KEY in syncer.snapshot.endpoints
    # Someone else's later change is applied as usual; our stale hand-over cannot undo it.
    _, newer = endpoint("db", 12)
    updates = syncer._handle([WatchEvent(newer, deleted=False)])
    assert [u.key for u in updates] == [KEY]
    assert syncer.snapshot.endpoints[KEY].metadata.labels["app"] == "db"
    assert not syncer.put_own("WorkloadEndpoint", KEY, written, 10)
    assert syncer.snapshot.endpoints[KEY].metadata.labels["app"] == "db"
    deleted = KeyValue(KEY, b"", 13, 0, 0)
    assert [u.value for u in syncer._handle([WatchEvent(deleted, deleted=True)])] == [None]
    assert KEY not in syncer.snapshot.endpoints


def test_not_taken_before_the_first_listing() -> None:
    syncer = Syncer(None, on_update=None)  # type: ignore[arg-type]
    written, _ = endpoint("web", 10)
    assert not syncer.put_own("WorkloadEndpoint", KEY, written, 10)  # the listing will bring it
    assert KEY not in syncer.snapshot.endpoints


# ---- a block this agent's IPAM claimed, with its affinity (felix_agent.own_claims) --------------

BLOCK_KEY = keys.block_key(ipaddress.ip_network("10.244.3.0/26"))
AFFINITY_KEY = keys.affinity_key("node-a", ipaddress.ip_network("10.244.3.0/26"))


def claim(revision: int) -> list[Update]:
    from ipam.block import Block

    block = Block.empty(ipaddress.ip_network("10.244.3.0/26"), "node-a")
    return [decode(BLOCK_KEY, block.to_json(), revision),
            decode(AFFINITY_KEY, json.dumps({"state": "confirmed"}).encode(), revision)]


def test_a_claim_is_held_all_together_and_its_watch_events_are_no_ops() -> None:
    syncer = in_sync_syncer()
    seen: list[set[str]] = []
    updates = claim(20)
    assert syncer.put_own_then(updates, 20, lambda snap: seen.append(set(snap.blocks) | set(snap.affinities)))
    assert seen == [{BLOCK_KEY, AFFINITY_KEY}]  # ``then`` saw both, at once
    assert syncer.snapshot.mod_revisions[BLOCK_KEY] == syncer.snapshot.mod_revisions[AFFINITY_KEY] == 20
    events = [WatchEvent(KeyValue(u.key, b"{}", 20, 20, 1), deleted=False) for u in updates]
    assert syncer._handle(events) == []  # the watch's copy of our own commit changes nothing
    assert not syncer.put_own_then(claim(20), 20, lambda snap: seen.append(set()))  # held already
    assert len(seen) == 1


def test_a_claim_the_watch_has_passed_or_overtaken_is_not_taken() -> None:
    syncer = in_sync_syncer()
    syncer._handle([WatchEvent(KeyValue("/tortie/other", b"", 25, 25, 1), deleted=False)])  # watch at 25
    assert not syncer.put_own_then(claim(20), 20, lambda snap: None)
    assert BLOCK_KEY not in syncer.snapshot.blocks and AFFINITY_KEY not in syncer.snapshot.affinities
    # One key already newer than the commit (say, the affinity released at 31): none of it is taken.
    syncer = in_sync_syncer()
    syncer.snapshot.apply(claim(31)[1], 31)
    assert not syncer.put_own_then(claim(30), 30, lambda snap: None)
    assert BLOCK_KEY not in syncer.snapshot.blocks


def test_no_claim_is_taken_before_in_sync() -> None:
    syncer = Syncer(None, on_update=None)  # type: ignore[arg-type]
    assert not syncer.put_own_then(claim(5), 5, lambda snap: None)
    assert len(syncer.snapshot) == 0
