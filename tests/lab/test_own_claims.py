"""A block this node's own IPAM claims, taken in by its agent at the commit (``felix_agent.own_claims``
through ``ipam.claim_listeners``), against a real etcd: a real syncer, watching, and real IPAM
batches in the same process, as in felix-agent serving a pod's ADD. The syncer's watch is held
(its batches wait at a gate before the syncer sees them), so what the syncer holds when the claim
returns can only have come from the commit. A commit that fails hands nothing over."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from datastore import keys
from datastore.errors import DatastoreUnavailable
from datastore.etcd import EtcdClient, Resync, WatchEvent
from datastore.kv import Create, Op
from felix_agent.calc.snapshot import Snapshot, Update
from felix_agent.own_claims import OwnClaims
from felix_agent.syncer import Syncer
from ipam.allocator import IPAM, AssignRequest
from tests.lab.ipam_support import add_pool

pytestmark = pytest.mark.lab

NODE = "own-n1"
TIMEOUT = 10.0


class HeldWatch:
    """The real watch, its batches passed on only while ``gate`` is open."""

    def __init__(self, inner: Any, gate: threading.Event) -> None:
        self.inner, self.gate = inner, gate

    def batches(self) -> Iterator[list[WatchEvent] | Resync]:
        for batch in self.inner.batches():
            self.gate.wait()
            yield batch

    def cancel(self) -> None:
        self.gate.set()
        self.inner.cancel()


class Holding:
    """An etcd client whose watches can be held (``gate`` cleared)."""

    def __init__(self, client: EtcdClient) -> None:
        self.client = client
        self.gate = threading.Event()
        self.gate.set()

    def watch(self, prefix: str, start_revision: int) -> HeldWatch:
        return HeldWatch(self.client.watch(prefix, start_revision), self.gate)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


class FailingCommits:
    """An etcd client whose commits that create a block fail as an unreachable etcd would: the
    transaction never reaches etcd."""

    def __init__(self, client: EtcdClient) -> None:
        self.client = client

    def commit(self, ops: Sequence[Op]) -> int:
        if any(isinstance(op, Create) and op.key.startswith(keys.BLOCKS) for op in ops):
            raise DatastoreUnavailable("the test's etcd", "its transaction never left")
        return self.client.commit(ops)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


class Delivered:
    """The keys of every update the syncer delivered (its watch's batches)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, updates: list[Update], snapshot: Snapshot) -> None:
        with self.lock:
            self.keys += [u.key for u in updates]


def wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def agent(etcd_client: EtcdClient) -> Iterator[tuple[Holding, Syncer, Delivered, OwnClaims]]:
    add_pool(etcd_client, "own-pool", "10.244.0.0/16", blockSize=26)
    holding = Holding(etcd_client)
    delivered = Delivered()
    syncer = Syncer(holding, on_update=delivered)  # type: ignore[arg-type]
    own = OwnClaims(NODE, lambda: syncer, lambda: None, lambda: None)
    syncer.start()
    own.start()
    try:
        assert syncer.in_sync.wait(TIMEOUT)
        yield holding, syncer, delivered, own
    finally:
        own.stop()
        syncer.stop()


def claim(client: Any, address: str) -> None:
    IPAM(client).assign(AssignRequest(f"own-{address}", NODE, num_v4=0, addresses=[ipaddress.ip_address(address)]))


def test_a_claim_is_in_the_syncer_at_its_commit_and_the_watch_copy_is_a_no_op(
        agent: tuple[Holding, Syncer, Delivered, OwnClaims], etcd_client: EtcdClient) -> None:
    holding, syncer, delivered, _ = agent
    cidr = ipaddress.ip_network("10.244.9.0/26")
    block, affinity = keys.block_key(cidr), keys.affinity_key(NODE, cidr)
    holding.gate.clear()  # the syncer's watch sees nothing from here
    claim(holding, "10.244.9.1")
    stored = etcd_client.get_many([block, affinity])
    revision = stored[block].mod_revision
    assert stored[affinity].mod_revision == revision  # one transaction
    # The watch is held: the syncer can hold the claim only from the commit's hand-over.
    view = syncer.copy_snapshot()
    assert view.blocks[block].node == NODE and view.affinities[affinity].state == "confirmed"
    assert view.mod_revisions[block] == view.mod_revisions[affinity] == revision
    assert block not in delivered.keys and affinity not in delivered.keys
    holding.gate.set()
    wait(lambda: syncer.copy_snapshot().revision >= revision, "the watch to pass the claim's commit")
    assert block not in delivered.keys and affinity not in delivered.keys  # its copy changed nothing
    # A later change of the block (an address released by someone else, say) comes through as usual.
    etcd_client.delete_prefix(block)
    wait(lambda: block in delivered.keys, "the block's deletion from the watch")
    assert block not in syncer.copy_snapshot().blocks


def test_a_claim_whose_commit_fails_is_never_handed_over(
        agent: tuple[Holding, Syncer, Delivered, OwnClaims], etcd_client: EtcdClient) -> None:
    holding, syncer, delivered, own = agent
    cidr = ipaddress.ip_network("10.244.10.0/26")
    with pytest.raises(DatastoreUnavailable):
        claim(FailingCommits(etcd_client), "10.244.10.1")
    assert keys.block_key(cidr) not in syncer.copy_snapshot().blocks and own.taken == 0
    assert etcd_client.get_many([keys.block_key(cidr)]) == {}
    # A claim after it (held watch again) is taken in; the failed one never appears.
    holding.gate.clear()
    claim(holding, "10.244.11.1")
    view = syncer.copy_snapshot()
    assert keys.block_key(ipaddress.ip_network("10.244.11.0/26")) in view.blocks and own.taken == 1
    assert keys.block_key(cidr) not in view.blocks
    holding.gate.set()
    revision = etcd_client.list("/tortie/")[1]
    wait(lambda: syncer.copy_snapshot().revision >= revision, "the watch to catch up")
    assert keys.block_key(cidr) not in syncer.copy_snapshot().blocks and keys.block_key(cidr) not in delivered.keys
