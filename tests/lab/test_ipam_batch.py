"""A node's concurrent assignments and releases in one process, coalesced into batches
(``ipam.batch``): no address twice, the blocks and handles in etcd exactly what the callers were
told, a failing request failing alone, the same attachment twice in one batch served once."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from datastore import keys
from datastore.etcd import EtcdClient
from ipam import batch
from ipam.allocator import IPAM, AssignRequest
from ipam.batch import node_lock
from ipam.errors import AddressInUse
from ipam.handles import attachment_handle
from tests.lab.ipam_support import add_pool, allocated, handles

pytestmark = pytest.mark.lab


def _request(node: str, cid: str, **kw: Any) -> AssignRequest:
    attrs = {"network": "net", "containerID": cid, "ifname": "eth0"}
    return AssignRequest(attachment_handle("net", cid, "eth0"), node, attrs=attrs, **kw)


def test_three_nodes_eight_threads_assign_and_release(etcd_client: EtcdClient) -> None:
    add_pool(etcd_client, "p", "10.244.0.0/22", blockSize=26)
    nodes = ["n1", "n2", "n3"]

    def worker(node: str, k: int) -> dict[str, str]:
        ipam = IPAM(etcd_client)
        kept: dict[str, str] = {}
        for i in range(12):
            cid = f"{node}-{k}-{i}"
            (got,) = ipam.assign(_request(node, cid))
            if i % 3 == 0:  # releases racing the other threads' assignments on the same blocks
                handles_, released = ipam.release_attachment("net", cid, "eth0", node=node)
                assert released == [got.address] and handles_ == [attachment_handle("net", cid, "eth0")]
            else:
                kept[str(got.address)] = attachment_handle("net", cid, "eth0")
        return kept

    with ThreadPoolExecutor(24) as pool:
        results = [f.result() for f in [pool.submit(worker, n, k) for n in nodes for k in range(8)]]
    kept: dict[str, str] = {}
    for part in results:
        assert not set(part) & set(kept), "an address was handed out twice"
        kept.update(part)
    assert len(kept) == 24 * 8
    assert allocated(etcd_client) == kept  # the blocks hold exactly what the callers were told
    assert set(handles(etcd_client)) == set(kept.values())


def _batched(node: str, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` in threads that all wait in the node's queue before any batch runs: they
    form one batch (the first of them to get the node's turn takes the others with it)."""
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with node_lock(node):
        for t in threads:
            t.start()
        queue = None
        while queue is None or len(queue.jobs) < len(calls):  # every caller is queued
            queue = batch._QUEUES.get(node)
            threading.Event().wait(0.001)
    for t in threads:
        t.join()
    return out


def test_one_batch_one_transaction_a_failure_fails_alone(etcd_client: EtcdClient) -> None:
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    ipam = IPAM(etcd_client)
    (old,) = ipam.assign(_request("n1", "old"))
    (keep,) = ipam.assign(_request("n1", "keep"))
    calls: list[Callable[[], Any]] = [
        lambda: IPAM(etcd_client).assign(_request("n1", "a")),
        lambda: IPAM(etcd_client).assign(_request("n1", "clash", addresses=[keep.address])),  # in use: fails alone
        lambda: IPAM(etcd_client).assign(_request("n1", "b")),
        lambda: IPAM(etcd_client).assign(_request("n1", "b")),  # the same attachment again: same address
        lambda: IPAM(etcd_client).release_attachment("net", "old", "eth0", node="n1"),
    ]
    a, clash, b1, b2, released = _batched("n1", calls)
    assert isinstance(clash, AddressInUse)
    assert b1[0].address == b2[0].address
    assert released == ([attachment_handle("net", "old", "eth0")], [old.address])
    held = allocated(etcd_client)
    assert held == {str(keep.address): attachment_handle("net", "keep", "eth0"),
                    str(a[0].address): attachment_handle("net", "a", "eth0"),
                    str(b1[0].address): attachment_handle("net", "b", "eth0")}
    # a, b and the release went in one transaction: their handles were written at one revision.
    written = [etcd_client.get(keys.handle_key(attachment_handle("net", c, "eth0"))) for c in ("a", "b")]
    assert len({kv.mod_revision for kv in written if kv is not None}) == 1


def test_a_claim_writes_its_block_once_with_the_address_affinity_and_handle(etcd_client: EtcdClient) -> None:
    """Every agent's watch hears of a claim once (one transaction), not twice (the empty block,
    then the address): the BGP mesh's other nodes wake once per claim."""
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    (got,) = IPAM(etcd_client).assign(_request("n1", "first"))
    block = etcd_client.get(keys.block_key(got.block))
    affinity = etcd_client.get(keys.affinity_key("n1", got.block))
    handle = etcd_client.get(keys.handle_key(attachment_handle("net", "first", "eth0")))
    assert block is not None and affinity is not None and handle is not None
    assert block.version == 1  # created holding the address: never written empty first
    assert block.mod_revision == affinity.mod_revision == handle.mod_revision
    assert allocated(etcd_client) == {str(got.address): attachment_handle("net", "first", "eth0")}
    assert b'"confirmed"' in affinity.value


def test_a_block_created_by_another_while_claiming_is_left_alone(etcd_client: EtcdClient) -> None:
    """The claim's block appears (another node's claim) between planning and commit: the
    transaction fails, the batch plans again, the address comes from another block, and the other
    node's block and affinity stay as they were."""
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    ipam = IPAM(etcd_client)
    raced: list[str] = []
    affinity_op = ipam.affinity_op

    def race(cidr: Any, node: str, snap: Any = None) -> Any:
        if not raced:  # the first claim loses: n2 creates that block first
            IPAM(etcd_client).assign(_request("n2", "other", addresses=[cidr[1]]))
            raced.append(str(cidr))
        return affinity_op(cidr, node, snap)

    ipam.affinity_op = race  # type: ignore[method-assign]
    (got,) = ipam.assign(_request("n1", "mine"))
    assert raced and str(got.block) != raced[0]
    lost = ipaddress.ip_network(raced[0])
    assert etcd_client.get(keys.affinity_key("n2", lost)) is not None
    assert etcd_client.get(keys.affinity_key("n1", lost)) is None
    held = allocated(etcd_client)
    assert held[str(got.address)] == attachment_handle("net", "mine", "eth0")
    assert len(held) == 2  # n2's address and ours, nothing else
