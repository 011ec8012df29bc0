"""The syncer against a real etcd: list then watch, in order; in sync after the listing; a resync
after falling behind a compaction that ends equal to the datastore; undecodable values skipped;
stop() ends the thread."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from datastore import codec, keys
from datastore.etcd import EtcdClient
from datastore.resources import IPPool, Node, WorkloadEndpoint
from datastore.store import ResourceStore
from felix_agent.calc.snapshot import Affinity, Snapshot, Update
from felix_agent.syncer import Syncer
from ipam.block import Block

pytestmark = pytest.mark.lab

TIMEOUT = 10.0


def doc(kind: str, name: str, spec: dict[str, Any], ns: str | None = None,
        labels: dict[str, str] | None = None) -> Any:
    meta: dict[str, Any] = {"name": name} | ({"namespace": ns} if ns else {}) | ({"labels": labels} if labels else {})
    return codec.decode({"apiVersion": "tortie.dev/v1", "kind": kind, "metadata": meta, "spec": spec})


def wep(name: str, ip: str, **labels: str) -> Any:
    return doc("WorkloadEndpoint", name, {"node": "node-a", "interfaceName": f"tor{name}", "containerID": name,
                                          "ipNetworks": [ip]}, "default", labels)


class Recorder:
    """Collects the syncer's batches; ``wait_for`` polls a condition on them."""

    def __init__(self) -> None:
        self.batches: list[list[Update]] = []
        self.in_sync_at_batch: list[bool] = []
        self.lock = threading.Lock()
        self.syncer: Syncer | None = None

    def __call__(self, updates: list[Update], snapshot: Snapshot) -> None:
        with self.lock:
            self.batches.append(list(updates))
            self.in_sync_at_batch.append(self.syncer is not None and self.syncer.in_sync.is_set())

    @property
    def updates(self) -> list[Update]:
        with self.lock:
            return [u for batch in self.batches for u in batch]

    def wait_for(self, condition: Callable[[list[Update]], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if condition(self.updates):
                return
            time.sleep(0.02)
        got = [(u.kind, u.key, u.value is None) for u in self.updates]
        raise AssertionError(f"timed out waiting for {what}; got {got}")


def started(client: EtcdClient, **kwargs: Any) -> tuple[Syncer, Recorder]:
    recorder = Recorder()
    syncer = Syncer(client, on_update=recorder, **kwargs)
    recorder.syncer = syncer
    syncer.start()
    assert syncer.in_sync.wait(TIMEOUT), "never in sync"
    return syncer, recorder


@pytest.fixture
def syncers() -> Iterator[list[Syncer]]:
    """Every syncer a test starts is stopped, even when the test fails."""
    running: list[Syncer] = []
    yield running
    for s in running:
        s.stop()


def state_of(snapshot: Snapshot) -> dict[str, int]:
    return dict(snapshot.mod_revisions)


def datastore_state(client: EtcdClient, syncer: Syncer) -> dict[str, int]:
    kvs, _ = client.list(keys.ROOT)
    return {kv.key: kv.mod_revision for kv in kvs if any(kv.key.startswith(p) for p in syncer.prefixes)}


def test_lists_then_watches_creates_updates_deletes_in_order(etcd_client: EtcdClient,
                                                             syncers: list[Syncer]) -> None:
    store = ResourceStore(etcd_client)
    store.create(doc("IPPool", "pool-a", {"cidr": "10.244.0.0/16", "vxlanMode": "Always"}))
    store.create(doc("Node", "node-a", {"bgp": {"ipv4Address": "10.0.0.1/24"}}))
    cidr = ipaddress.ip_network("10.244.0.0/26")
    etcd_client.create(keys.block_key(cidr), Block.empty(cidr, "node-a").to_json())
    etcd_client.create(keys.affinity_key("node-a", cidr), json.dumps({"state": "confirmed"}).encode())
    etcd_client.create(keys.handle_key("tnet.c1"), b"{}")  # not something the syncer reads

    syncer, rec = started(etcd_client)
    syncers.append(syncer)
    first = rec.batches[0]
    assert {u.kind for u in first} == {"IPPool", "Node", "Block", "Affinity"}
    assert rec.in_sync_at_batch[0] is False  # in_sync is set after the listing was handed over
    block_update = next(u for u in first if u.kind == "Block")
    assert block_update.value.cidr == cidr and block_update.value.node == "node-a"
    assert next(u for u in first if u.kind == "Affinity").value == Affinity("node-a", cidr, "confirmed")

    created = store.create(wep("pod-1", "10.244.0.2/32", app="web"))
    updated = wep("pod-1", "10.244.0.2/32", app="db")
    store.update(updated, created)
    store.delete(WorkloadEndpoint, "pod-1", "default")
    key = keys.resource_key("workloadendpoints", "pod-1", "default")
    rec.wait_for(lambda us: any(u.key == key and u.value is None for u in us), "the deletion")
    seen = [u for u in rec.updates if u.key == key]
    assert [u.value.metadata.labels["app"] if u.value else None for u in seen] == ["web", "db", None]
    assert key not in syncer.snapshot.endpoints
    assert syncer.snapshot.ippools and syncer.snapshot.nodes
    assert state_of(syncer.snapshot) == datastore_state(etcd_client, syncer)
    copy = syncer.copy_snapshot()  # what another thread (the agent's loop) reads
    assert state_of(copy) == state_of(syncer.snapshot) and copy.tables is not syncer.snapshot.tables


def test_in_sync_with_an_empty_datastore(etcd_client: EtcdClient, syncers: list[Syncer]) -> None:
    syncer, rec = started(etcd_client)
    syncers.append(syncer)
    assert rec.batches[0] == [] and len(syncer.snapshot) == 0


def test_resync_after_compaction_equals_the_datastore(etcd_client: EtcdClient, syncers: list[Syncer]) -> None:
    store = ResourceStore(etcd_client)
    store.create(doc("IPPool", "kept", {"cidr": "10.244.0.0/16"}))
    store.create(doc("IPPool", "changed", {"cidr": "10.245.0.0/16"}))
    store.create(doc("Node", "gone", {"bgp": {"ipv4Address": "10.0.0.9/24"}}))
    first, _ = started(etcd_client)
    first.stop()
    behind = first.snapshot  # resume from here, as a syncer that fell behind would
    assert len(behind) == 3

    # While nobody watches: an update, a deletion, a creation; then compact the history away.
    changed = store.get(IPPool, "changed")
    assert changed is not None
    changed.spec.nat_outgoing = True
    store.update(changed)
    store.delete(Node, "gone")
    store.create(doc("IPPool", "new", {"cidr": "10.246.0.0/16"}))
    _, revision = etcd_client.list(keys.ROOT)
    etcd_client.compact(revision)

    second, rec = started(etcd_client, snapshot=behind.copy())
    syncers.append(second)
    changed_key = keys.resource_key("ippools", "changed")
    gone_key = keys.resource_key("nodes", "gone")
    new_key = keys.resource_key("ippools", "new")
    rec.wait_for(lambda us: any(u.key == gone_key and u.value is None for u in us), "the resync")
    resync = rec.updates[3:]  # after the replayed starting snapshot
    assert {(u.key, u.value is None) for u in resync} == {(changed_key, False), (gone_key, True), (new_key, False)}
    assert second.snapshot.ippools[changed_key].spec.nat_outgoing is True
    assert state_of(second.snapshot) == datastore_state(etcd_client, second)
    assert second.snapshot.revision >= revision
    assert second.resyncs == 1  # it re-listed: the events themselves were compacted away

    # and it keeps watching after the resync
    store.create(doc("IPPool", "after", {"cidr": "10.247.0.0/16"}))
    rec.wait_for(lambda us: any(u.key == keys.resource_key("ippools", "after") for u in us), "a later event")


def test_undecodable_values_are_skipped(etcd_client: EtcdClient, syncers: list[Syncer]) -> None:
    pool_key = keys.resource_key("ippools", "broken")
    etcd_client.put(pool_key, b"{not json")
    syncer, rec = started(etcd_client)
    syncers.append(syncer)
    assert rec.batches[0] == []

    store = ResourceStore(etcd_client)
    good = store.create(doc("IPPool", "good", {"cidr": "10.244.0.0/16"}))
    good_key = keys.resource_key("ippools", "good")
    etcd_client.put(keys.block_key(ipaddress.ip_network("10.244.0.0/26")), b'{"cidr": "nonsense"}')
    etcd_client.put(keys.resource_key("ippools", "wrong-kind"),
                    json.dumps({"apiVersion": "tortie.dev/v1", "kind": "Node", "metadata": {"name": "wrong-kind"},
                                "spec": {}}).encode())
    etcd_client.put(good_key, b"\xff garbage")  # a value that was good turns bad: it is dropped
    store.create(doc("IPPool", "later", {"cidr": "10.245.0.0/16"}))
    later_key = keys.resource_key("ippools", "later")
    rec.wait_for(lambda us: any(u.key == later_key for u in us), "the event after the bad ones")
    assert [(u.key, u.value is None) for u in rec.updates] == [(good_key, False), (good_key, True), (later_key, False)]
    assert set(syncer.snapshot.ippools) == {later_key} and not syncer.snapshot.blocks
    assert good.name == "good" and syncer.alive


def test_stop_ends_the_thread(etcd_client: EtcdClient) -> None:
    syncer, _ = started(etcd_client)
    assert syncer.alive
    syncer.stop()
    assert not syncer.alive
    syncer.stop()  # twice is harmless
