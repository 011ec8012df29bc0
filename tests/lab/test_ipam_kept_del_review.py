"""Adversarial review of the DEL planned on what a process wrote (``ipam.kept_writes``): DELs and
ADDs batched together, and the batch's transaction against etcd's limits, against a real etcd."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from datastore.etcd import EtcdClient
from datastore.gateway import GatewayClient
from ipam import batch
from ipam.handles import attachment_handle
from tests.lab.ipam_support import add_pool, allocated
from tests.lab.test_ipam_interleavings import (
    _core_problems,
    _endpoint_key,
    _endpoints,
    _handle_key,
    _pod_add,
    _pod_del,
    _Process,
    agent_env,
    own_etcd,
)

pytestmark = pytest.mark.lab

__all__ = ["agent_env", "own_etcd"]  # the fixtures, imported for their names


def _together(node: str, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` on threads of one process so that they all land in ONE batch of ``node``: the
    node's batch lock is held until every call has queued its job (``ipam.batch``), as a burst of
    DELs reaching an agent while its previous batch commits does. Each result or its exception."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 - the test asserts on it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with batch.node_lock(node):
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while True:  # a condition, not a sleep: every job queued behind the held lock
            queue = batch._QUEUES.get(node)
            if queue is not None and len(queue.jobs) == len(calls):
                break
            assert time.monotonic() < deadline, "the calls never queued"
            time.sleep(0.005)
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("block_size", [30, 26])
def test_a_burst_of_kept_dels_in_one_batch_fits_one_transaction(
        etcd_client: EtcdClient, agent_env: tuple[str, GatewayClient], block_size: int) -> None:
    """A DEL planned on kept values compares each handle and endpoint by revision AND bytes: two
    comparisons each where a DEL planned on a read made one. A full batch of such DELs (24 jobs)
    over several blocks (or with an ADD) must still commit, not fail every DEL of the burst with
    etcd's --max-txn-ops (128 comparisons)."""
    node, gateway = agent_env
    from datastore import keys
    from datastore.resources import IPPool

    etcd_client.delete_prefix(keys.resource_prefix(IPPool.PLURAL))  # the fixture's pool: ours instead
    add_pool(etcd_client, "q", "10.244.0.0/24", blockSize=block_size)
    agent = _Process(gateway, node)
    pods = [f"c{i}" for i in range(24 if block_size == 30 else 23)]
    told = {_pod_add(agent, cid): cid for cid in pods}
    with agent as ipam:
        calls: list[Callable[[], Any]] = [
            (lambda cid=cid: _pod_del_in(ipam, node, cid)) for cid in pods]
        if block_size == 26:  # one block: an ADD in the same batch brings the kept snapshot's comparisons
            from ipam.allocator import AssignRequest
            from ipam.handles import legacy_handle

            calls.append(lambda: ipam.assign(AssignRequest(
                attachment_handle("net", "n1", "eth0"), node, attrs={"network": "net", "containerID": "n1",
                                                                     "ifname": "eth0"},
                legacy_handle=legacy_handle("net", "n1"))))
        results = _together(node, calls)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert sorted(a for r in results[:len(pods)] for a in r) == sorted(told)
    left = allocated(etcd_client)
    assert set(left.values()) <= {attachment_handle("net", "n1", "eth0")}
    assert _endpoints(etcd_client) == {}
    assert _core_problems(etcd_client) == []


def _pod_del_in(ipam: Any, node: str, cid: str) -> list[str]:
    """``_pod_del`` inside an already entered process (its kept state swapped in by the caller)."""
    from cni_plugins.tortie_ops import _endpoint_deletion

    key = _endpoint_key(node, cid)
    _, released = ipam.release_attachment("net", cid, "eth0", node=node, also_read=[key],
                                          also_write=lambda values: _endpoint_deletion(values.get(key), cid))
    return sorted(map(str, released))



def test_a_kept_del_after_a_legacy_handle_of_the_attachment_appeared(
        etcd_client: EtcdClient, agent_env: tuple[str, GatewayClient]) -> None:
    """The ADD kept the legacy ``<network>.<container>`` handle as absent. An older plugin then
    wrote one for the same attachment, holding an address of another node's block (so nothing
    this process kept of its own node's blocks moved): the DEL must release it too, not delete the
    handle it knows and report success with the legacy handle's address still assigned."""
    from ipam.allocator import IPAM, AssignRequest
    from ipam.handles import legacy_handle

    node, gateway = agent_env
    agent = _Process(gateway, node)
    first, own = _pod_add(agent, "c0"), _pod_add(agent, "c1")
    attrs = {"network": "net", "containerID": "c1", "ifname": "eth0"}
    (old,) = IPAM(etcd_client, serializable_snapshot=False).assign(
        AssignRequest(legacy_handle("net", "c1"), f"{node}-b", attrs=attrs))
    assert sorted(_pod_del(agent, "c1")) == sorted([own, str(old.address)])
    assert allocated(etcd_client) == {first: attachment_handle("net", "c0", "eth0")}
    assert _endpoints(etcd_client) == {_endpoint_key(node, "c0"): "c0"}
    assert _core_problems(etcd_client) == []


@pytest.mark.parametrize("kind", ["grpc", "gateway"])
def test_a_deletion_and_a_comparison_with_expected_bytes_refuse_other_bytes(
        etcd_client: EtcdClient, etcd_server: Any, kind: str) -> None:
    """``Delete``/``Unchanged`` with ``expected`` (what a kept DEL sends) through each client's
    encoding (the gateway's base64): the key at the right revision but with other bytes fails the
    transaction and leaves it; the right bytes pass."""
    from datastore.config import EtcdConfig
    from datastore.errors import Conflict
    from datastore.kv import Delete, Unchanged

    config = EtcdConfig.from_env(etcd_server.env())
    with (EtcdClient(config) if kind == "grpc" else GatewayClient(config)) as client:
        rev = client.put("/tortie/review/a", b"\x00written\xff")
        for op in (Unchanged("/tortie/review/a", rev, b"\x00other\xff"), Delete("/tortie/review/a", rev, b"other")):
            with pytest.raises(Conflict):
                client.commit([op])
        assert etcd_client.get("/tortie/review/a") is not None
        client.commit([Unchanged("/tortie/review/a", rev, b"\x00written\xff")])
        client.commit([Delete("/tortie/review/a", rev, b"\x00written\xff")])
        assert etcd_client.get("/tortie/review/a") is None


def test_a_kept_del_whose_kept_block_does_not_hold_the_kept_handle(own_etcd: Any) -> None:
    """The one input of a kept DEL that its commit does not compare: a block it frees nothing in
    (not written, so not compared). A cluster restored from a backup taken before the pod's ADD,
    then written again: the pod's handle and endpoint with the very bytes at the very revisions
    this process kept, this process's next ADD on a fresh read (its kept snapshot: the block
    without the pod's address), then the pod's address put in the block under its handle. The
    DEL must free it, not delete the handle and endpoint and leave the address assigned."""
    import shutil
    import uuid
    from pathlib import Path

    from datastore import keys
    from datastore.config import EtcdConfig
    from datastore.kv import Create, Update
    from ipam.block import Block

    env = own_etcd.env()
    node = f"restore-{uuid.uuid4().hex[:8]}"
    with EtcdClient(EtcdConfig.from_env(env)) as operator:
        add_pool(operator, "p", "10.244.0.0/24", blockSize=26)
        with GatewayClient(EtcdConfig.from_env(env)) as gateway:
            agent = _Process(gateway, node)
            zero = _pod_add(agent, "c0")
        backup = Path(own_etcd.work_dir) / "backup.data"
        own_etcd.stop()
        shutil.copytree(own_etcd.data_dir, backup)
        own_etcd.start()
    with GatewayClient(EtcdConfig.from_env(env)) as gateway:
        agent.ipam = _ipam_of(gateway)
        _pod_add(agent, "c1")  # handle (and block) at R+1, endpoint at R+2: kept
    with EtcdClient(EtcdConfig.from_env(env)) as operator:
        handle, endpoint = operator.get(_handle_key("c1")), operator.get(_endpoint_key(node, "c1"))
        assert handle is not None and endpoint is not None
    own_etcd.stop()
    shutil.rmtree(own_etcd.data_dir)
    shutil.copytree(backup, own_etcd.data_dir)
    own_etcd.start()
    with EtcdClient(EtcdConfig.from_env(env)) as operator:
        assert operator.commit([Create(handle.key, handle.value)]) == handle.mod_revision
        assert operator.commit([Create(endpoint.key, endpoint.value)]) == endpoint.mod_revision
        with GatewayClient(EtcdConfig.from_env(env)) as gateway:
            agent.ipam = _ipam_of(gateway)
            two = _pod_add(agent, "c2")  # loses its kept comparison, plans on a fresh read, keeps that
            block_key = keys.block_key(ipaddress.ip_network(f"{zero}/26", strict=False))
            kv = operator.get(block_key)
            assert kv is not None
            block, (back,) = Block.from_json(kv.value).assign(1, attachment_handle("net", "c1", "eth0"), {})
            operator.commit([Update(block_key, block.to_json(), kv.mod_revision)])
            assert _pod_del(agent, "c1") == [str(back)]
        assert allocated(operator) == {zero: attachment_handle("net", "c0", "eth0"),
                                       two: attachment_handle("net", "c2", "eth0")}
        assert _endpoints(operator) == {_endpoint_key(node, "c0"): "c0", _endpoint_key(node, "c2"): "c2"}


def _ipam_of(client: Any) -> Any:
    from ipam.allocator import IPAM

    return IPAM(client)


def test_one_batch_of_kept_and_unkept_dels_and_a_restarted_agent(
        etcd_client: EtcdClient, agent_env: tuple[str, GatewayClient], etcd_server: Any) -> None:
    """DELs of one batch: one pod whose ADD this process served (kept), one whose ADD another
    process served (nothing kept: the batch reads), one already deleted by another process (kept,
    stale); then a restarted agent (nothing kept) deletes the last pod. Each DEL frees exactly its
    own pod's address; nothing is left."""
    from datastore.config import EtcdConfig

    node, gateway = agent_env
    agent = _Process(gateway, node)
    mine, gone, last = _pod_add(agent, "c1"), _pod_add(agent, "c3"), _pod_add(agent, "c4")
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as elsewhere:
        other = _Process(elsewhere, node)
        theirs = _pod_add(other, "c2")
        assert _pod_del(other, "c3") == [gone]
    with agent as ipam:
        results = _together(node, [lambda cid=cid: _pod_del_in(ipam, node, cid) for cid in ("c1", "c2", "c3")])
    assert results == [[mine], [theirs], []]
    assert allocated(etcd_client) == {last: attachment_handle("net", "c4", "eth0")}
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as restarted:
        assert _pod_del(_Process(restarted, node), "c4") == [last]
    assert allocated(etcd_client) == {}
    assert _endpoints(etcd_client) == {}
    assert _core_problems(etcd_client) == []
