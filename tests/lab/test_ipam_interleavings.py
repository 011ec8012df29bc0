"""Adversarial interleavings around the IPAM batches' kept snapshot and their one-transaction
claims (``ipam.kept_snapshot``, ``ipam.batch``): whatever happens in etcd between the snapshot a
warm process plans on and its commit, no address is in two handles, no reservation is slipped
past, and every caller is told what etcd holds."""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datastore import codec
from datastore.config import EtcdConfig
from datastore.errors import Conflict
from datastore.etcd import EtcdClient
from datastore.gateway import GatewayClient
from datastore.resources import IPAMConfiguration
from datastore.store import ResourceStore
from ipam.allocator import IPAM, AssignRequest
from ipam.handles import attachment_handle, legacy_handle
from netlab.etcd import ETCD, EtcdServer
from tests.lab.ipam_support import add_pool, allocated

pytestmark = pytest.mark.lab


def _assign(ipam: IPAM, node: str, cid: str) -> str:
    attrs = {"network": "net", "containerID": cid, "ifname": "eth0"}
    # With the legacy handle, as ipam_ops asks: a DEL by the same process is then planned on what
    # the ADD wrote (``ipam.kept_writes``), without a read.
    (got,) = ipam.assign(AssignRequest(attachment_handle("net", cid, "eth0"), node, attrs=attrs,
                                       legacy_handle=legacy_handle("net", cid)))
    return str(got.address)


def _reserve(client: EtcdClient, name: str, cidr: str) -> None:
    ResourceStore(client).create(codec.decode({
        "apiVersion": "projectcalico.org/v3", "kind": "IPReservation", "metadata": {"name": name},
        "spec": {"reservedCIDRs": [cidr]}}))


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test alone: it is stopped and its data directory put back from a copy."""
    import os

    if os.geteuid() != 0 or not ETCD.exists():
        pytest.skip("needs root and etcd")
    with tempfile.TemporaryDirectory(prefix="tortie-restore-") as work, \
            EtcdServer(Path(work), name="restore") as server:
        yield server


def test_a_reservation_applied_after_a_restore_from_backup_is_respected(own_etcd: EtcdServer) -> None:
    """A cluster restored from a backup repeats revision numbers: a reservation written after the
    restore may carry a revision at or below the kept snapshot's, and a comparison of "nothing
    newer than the snapshot's revision" does not see it."""
    env = own_etcd.env()
    node = f"restore-{uuid.uuid4().hex[:8]}"
    with EtcdClient(EtcdConfig.from_env(env)) as operator:
        add_pool(operator, "p", "10.244.0.0/24", blockSize=26)
    with GatewayClient(EtcdConfig.from_env(env)) as agent:
        first = _assign(IPAM(agent), node, "c1")  # the node's block and its kept snapshot
    backup = Path(own_etcd.work_dir) / "backup.data"
    own_etcd.stop()
    shutil.copytree(own_etcd.data_dir, backup)
    own_etcd.start()
    with EtcdClient(EtcdConfig.from_env(env)) as operator:
        for i in range(20):  # the cluster lives on: other writers move its revision
            operator.put(f"/tortie/elsewhere/{i}", b"x")
    with GatewayClient(EtcdConfig.from_env(env)) as agent:
        assert _assign(IPAM(agent), node, "c1") == first  # a repeated ADD: kept again, read now
    own_etcd.stop()
    shutil.rmtree(own_etcd.data_dir)
    shutil.copytree(backup, own_etcd.data_dir)  # restored: the revision goes back ~20
    own_etcd.start()
    following = str(ipaddress.ip_address(first) + 1)  # the address the node would hand out next
    with EtcdClient(EtcdConfig.from_env(env)) as operator:
        _reserve(operator, "r", f"{following}/32")
        with GatewayClient(EtcdConfig.from_env(env)) as agent:
            second = _assign(IPAM(agent), node, "c2")
        assert second != following, "a reserved address was handed out"
        assert allocated(operator) == {first: attachment_handle("net", "c1", "eth0"),
                                       second: attachment_handle("net", "c2", "eth0")}


_CORE = {"leaked-address", "address-in-reservation", "block-without-affinity", "handle-without-addresses",
         "unindexed-address", "affinity-without-block"}


def _core_problems(client: EtcdClient) -> list[str]:
    """``netctl ipam check``'s problems of IPAM itself (the test writes no endpoints or nodes)."""
    from ipam.check import check

    return [p.description for p in check(client).problems if p.kind in _CORE]


class _Process:
    """One process of a node: its own kept snapshots and kept writes (``ipam.kept_snapshot``,
    ``ipam.kept_writes``: both per process)."""

    def __init__(self, client: GatewayClient, node: str) -> None:
        self.ipam, self.node, self.kept, self.writes = IPAM(client), node, {}, {}  # type: ignore[var-annotated]

    def __enter__(self) -> IPAM:
        from ipam import kept_snapshot, kept_writes

        self.saved, kept_snapshot._KEPT = kept_snapshot._KEPT, self.kept
        self.saved_writes, kept_writes._KEPT = kept_writes._KEPT, self.writes
        return self.ipam

    def __exit__(self, *exc: object) -> None:
        from ipam import kept_snapshot, kept_writes

        kept_snapshot._KEPT = self.saved
        kept_writes._KEPT = self.saved_writes


@pytest.mark.parametrize("seed", range(4))
def test_random_interleavings_of_processes_nodes_and_an_operator(etcd_client: EtcdClient,
                                                                 etcd_server: EtcdServer, seed: int) -> None:
    """Two processes of node a (separate kept snapshots), node b borrowing from a's blocks, and an
    operator releasing handles, deleting empty blocks with their affinities, adding reservations,
    lowering maxBlocksPerHost and collecting garbage, in a random order: etcd holds exactly what
    each caller was told, no address is in two handles or reserved when handed out, and
    ``netctl ipam check`` finds nothing wrong."""
    import random

    from datastore import keys
    from datastore.kv import Delete
    from ipam.block import Block
    from ipam.errors import IPAMError
    from ipam.gc import gc

    rng = random.Random(seed)
    add_pool(etcd_client, "p", "10.244.0.0/26", blockSize=29)  # 8 blocks of 8 addresses
    store = ResourceStore(etcd_client)

    def max_blocks(n: int) -> None:
        doc = codec.decode({"apiVersion": "tortie.dev/v1", "kind": "IPAMConfiguration",
                            "metadata": {"name": "default"}, "spec": {"maxBlocksPerHost": n}})
        current = store.get(IPAMConfiguration, "default")
        store.update(doc, current) if current is not None else store.create(doc)

    max_blocks(4)
    env = etcd_server.env()
    gateways = [GatewayClient(EtcdConfig.from_env(env)) for _ in range(3)]
    procs = [_Process(gateways[0], "a"), _Process(gateways[1], "a"), _Process(gateways[2], "b")]
    operator = IPAM(etcd_client, serializable_snapshot=False)
    told: dict[str, str] = {}  # address → handle, as the callers were told
    attached: dict[str, tuple[_Process, str]] = {}  # container → (its node's process, address)
    reserved: set[str] = set()
    try:
        for step in range(160):
            roll = rng.random()
            if roll < 0.45 or not attached:
                proc, cid = rng.choice(procs), f"c{step}"
                with proc as ipam:
                    try:
                        address = _assign(ipam, proc.node, cid)
                    except IPAMError:
                        continue
                assert address not in told, f"{address} handed out twice"
                assert address not in reserved, f"reserved {address} handed out"
                told[address] = attachment_handle("net", cid, "eth0")
                attached[cid] = (proc, address)
            elif roll < 0.55:  # a repeated ADD, by the node's other process when it has one
                cid = rng.choice(sorted(attached))
                proc, address = attached[cid]
                other = next(p for p in procs if p.node == proc.node and (p is not proc or proc.node == "b"))
                with other as ipam:
                    try:
                        again = _assign(ipam, other.node, cid)
                    except IPAMError:  # released behind its back, and no address is left now
                        assert told.get(address) != attachment_handle("net", cid, "eth0")
                        attached.pop(cid)
                        continue
                if told.get(address) == attachment_handle("net", cid, "eth0"):
                    assert again == address
                else:  # released behind its back since: a new address, which nobody else holds
                    assert again not in told and again not in reserved
                    told[again] = attachment_handle("net", cid, "eth0")
                    attached[cid] = (proc, again)
            elif roll < 0.75:  # DEL, by either process of the node
                cid = rng.choice(sorted(attached))
                proc, _ = attached.pop(cid)
                other = rng.choice([p for p in procs if p.node == proc.node])
                with other as ipam:
                    _, released = ipam.release_attachment("net", cid, "eth0", node=other.node)
                for a in released:
                    assert told.pop(str(a)) == attachment_handle("net", cid, "eth0")
            elif roll < 0.82:  # netctl ipam release
                cid = rng.choice(sorted(attached))
                for a in operator.release_handle(attachment_handle("net", cid, "eth0")):
                    assert told.pop(str(a)) == attachment_handle("net", cid, "eth0")
            elif roll < 0.88:  # an operator deletes an empty block and its affinity
                kvs, _ = etcd_client.list(keys.block_prefix(4))
                empty = [(kv, Block.from_json(kv.value)) for kv in kvs if not Block.from_json(kv.value).allocations]
                if empty:
                    kv, block = rng.choice(empty)
                    ops = [Delete(kv.key, kv.mod_revision)]
                    if block.node is not None:
                        ops.append(Delete(keys.affinity_key(block.node, block.cidr)))
                    with contextlib.suppress(Conflict):  # assigned from since: left alone
                        etcd_client.commit(ops)
            elif roll < 0.93:  # a reservation of the address a block would hand out next
                kvs, _ = etcd_client.list(keys.block_prefix(4))
                free = []
                for kv in kvs:
                    block = Block.from_json(kv.value)
                    free += [a for a in (str(block.address(i)) for i in range(8)) if a not in told][:1]
                free = [a for a in free if a not in reserved]
                if free:
                    address = rng.choice(free)
                    _reserve(etcd_client, f"r{step}", f"{address}/32")
                    reserved.add(address)
            elif roll < 0.96:  # maxBlocksPerHost lowered (or raised back)
                max_blocks(rng.choice([1, 2, 4]))
            else:  # netctl ipam gc: no endpoints here, so every handle past the grace is collected
                for a, handle in gc(etcd_client, grace_seconds=0).released:
                    assert told.pop(str(a)) == handle
            assert allocated(etcd_client) == told, f"step {step}"
    finally:
        for g in gateways:
            g.close()
    assert _core_problems(etcd_client) == []


def test_a_reservation_applied_after_a_plain_assignment_is_respected(etcd_client: EtcdClient,
                                                                     etcd_server: EtcdServer) -> None:
    """The kept snapshot of an assignment that claimed nothing (its next commit is not failed by the
    node's new affinity): a reservation of the address it would take next is seen all the same."""
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    node = f"plain-{uuid.uuid4().hex[:8]}"
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as agent:
        ipam = IPAM(agent)
        _assign(ipam, node, "c1")  # claims the block
        second = _assign(ipam, node, "c2")  # from the block: kept, brought up to date, no claim
        following = str(ipaddress.ip_address(second) + 1)
        _reserve(etcd_client, "r", f"{following}/32")
        assert _assign(ipam, node, "c3") != following, "a reserved address was handed out"


def _workers(env: dict[str, str], plans: list[tuple[str, list[list[str]]]]) -> list[list[dict[str, Any]]]:
    """Run one process per (node, work) at the same time; what each one's callers were told."""
    import json
    import os
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-m", "tests.lab.ipam_worker", node, json.dumps(work)],
                              env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
             for node, work in plans]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        out.append([json.loads(line) for line in stdout.splitlines()])
    return out


def test_processes_of_one_node_adding_and_deleting_the_same_attachments_at_once(etcd_client: EtcdClient,
                                                                                etcd_server: EtcdServer) -> None:
    """Two processes of node a (each its own kept snapshot) ADD the same attachments at the same
    time while node b claims and borrows in the same pool; then one deletes them while the other
    ADDs new ones: every attachment has one address, both processes were told it, and etcd holds
    exactly what the callers were told."""
    add_pool(etcd_client, "p", "10.244.0.0/25", blockSize=27)  # 4 blocks of 32: claims race, kept plans
    env = etcd_server.env()
    same = [["add", f"c{i}"] for i in range(24)]
    a1, a2, b = _workers(env, [("a", same), ("a", same[::-1]), ("b", [["add", f"b{i}"] for i in range(24)])])
    mine = {told["cid"]: told["addresses"] for told in a1}
    assert mine == {told["cid"]: told["addresses"] for told in a2}, "one attachment, two answers"
    expected = {address: attachment_handle("net", told["cid"], "eth0")
                for told in [*a1, *b] for address in told.get("addresses", [])}
    assert allocated(etcd_client) == expected
    assert _core_problems(etcd_client) == []
    # DEL of every c* by one process racing ADDs of new attachments by the other and by node b.
    dels, adds, b2 = _workers(env, [("a", [["del", f"c{i}"] for i in range(24)]),
                                    ("a", [["add", f"d{i}"] for i in range(24)]),
                                    ("b", [[op, f"b{i}"] for i in range(24) for op in ("del", "add")])])
    released = sorted(a for told in dels for a in told["addresses"])
    assert released == sorted(a for told in a1 for a in told["addresses"])
    held: dict[str, str] = {}
    for told in [*adds, *b2]:
        if told["op"] == "add":
            for address in told.get("addresses", []):
                assert address not in held, f"{address} handed out twice"
                held[address] = attachment_handle("net", told["cid"], "eth0")
    assert allocated(etcd_client) == held
    assert _core_problems(etcd_client) == []


class _Interleaved(IPAM):
    """An IPAM that lets something else happen between planning a claim and committing it."""

    def __init__(self, client: Any, meanwhile: Any, *, after_reading: bool = False) -> None:
        super().__init__(client)
        self.meanwhile, self.after_reading = meanwhile, after_reading

    def affinity_op(self, cidr: Any, node: str, snap: Any = None) -> Any:
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None and not self.after_reading:
            meanwhile(cidr)
        op = super().affinity_op(cidr, node, snap)  # the affinity a crashed claim may have left, as read
        if meanwhile is not None and self.after_reading:
            meanwhile(cidr)
        return op


def test_a_claim_racing_another_nodes_claim_of_the_same_block(etcd_client: EtcdClient,
                                                              etcd_server: EtcdServer) -> None:
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    other = IPAM(etcd_client, serializable_snapshot=False)
    taken: dict[str, str] = {}

    def b_claims_it_first(cidr: Any) -> None:
        from ipam.allocator import AssignRequest as Req

        attrs = {"network": "net", "containerID": "b1", "ifname": "eth0"}
        (got,) = other.assign(Req(attachment_handle("net", "b1", "eth0"), "b", addresses=[cidr[5]], attrs=attrs))
        taken[str(got.address)] = attachment_handle("net", "b1", "eth0")

    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as agent:
        ipam = _Interleaved(agent, b_claims_it_first)
        mine = _assign(ipam, "a", "a1")
    assert mine not in taken
    assert allocated(etcd_client) == {**taken, mine: attachment_handle("net", "a1", "eth0")}
    assert _core_problems(etcd_client) == []
    from ipam.check import scan

    owners = {cidr: block.node for cidr, (block, _) in scan(etcd_client).blocks.items()}
    assert ipaddress.ip_network(f"{mine}/26", strict=False) in owners
    assert owners[ipaddress.ip_network(f"{mine}/26", strict=False)] in ("a", "b")


def test_a_pool_deleted_while_a_block_of_it_is_claimed(etcd_client: EtcdClient, etcd_server: EtcdServer) -> None:
    from datastore.resources import IPPool

    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)

    def pool_deleted(cidr: Any) -> None:
        ResourceStore(etcd_client).delete(IPPool, "p")

    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as agent:
        ipam = _Interleaved(agent, pool_deleted)
        try:
            got = _assign(ipam, "a", "a1")
        except Exception as e:  # noqa: BLE001 - the expected outcome: no pool, no address
            got = repr(e)
    assert allocated(etcd_client) == {}, f"assigned {got} from a pool deleted before the commit"
    from ipam.check import check

    assert [p.description for p in check(etcd_client).problems if p.kind == "block-outside-pools"] == []


def test_a_stale_affinity_of_a_crashed_claim_and_gc_racing_the_next_claim(etcd_client: EtcdClient,
                                                                         etcd_server: EtcdServer) -> None:
    """Node a's affinity for a block that was never written (a claim that crashed, by an older
    scheme) and ``netctl ipam gc`` deleting it while node a claims that very block."""
    import json

    from datastore import keys
    from ipam.gc import gc

    add_pool(etcd_client, "p", "10.244.0.0/26", blockSize=28)  # 4 blocks
    for cidr in ("10.244.0.0/28", "10.244.0.16/28", "10.244.0.32/28", "10.244.0.48/28"):
        etcd_client.put(keys.affinity_key("a", ipaddress.ip_network(cidr)), json.dumps({"state": "pending"}).encode())

    def collected(cidr: Any) -> None:
        assert gc(etcd_client, grace_seconds=0).deleted_affinities

    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as agent:
        ipam = _Interleaved(agent, collected, after_reading=True)
        told = {_assign(ipam, "a", f"a{i}"): attachment_handle("net", f"a{i}", "eth0") for i in range(20)}
    assert len(told) == 20
    assert allocated(etcd_client) == told
    assert _core_problems(etcd_client) == []


# ---- DEL planned on what the process wrote (``ipam.kept_writes``): no read ----------------------

def _handle_key(cid: str) -> str:
    from datastore import keys

    return keys.handle_key(attachment_handle("net", cid, "eth0"))


def _endpoint(node: str, cid: str, addresses: list[str], container: str = "") -> Any:
    return codec.decode({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
                         "metadata": {"name": f"{node}-{cid}", "namespace": "default"},
                         "spec": {"node": node, "containerID": container or cid, "interfaceName": f"tor{cid}",
                                  "network": "net", "endpoint": "eth0", "ipNetworks": [f"{a}/32" for a in addresses]}})


def _endpoint_key(node: str, cid: str) -> str:
    from datastore.resources import WorkloadEndpoint

    return ResourceStore.key(WorkloadEndpoint, f"{node}-{cid}", "default")


def _pod_add(proc: _Process, cid: str) -> str:
    """ADD as the CNI service serves it: the address, then the endpoint written while the handle
    exists (``tortie_ops._write_endpoint``, which keeps it for the DEL)."""
    from cni_plugins.tortie_ops import _write_endpoint

    attrs = {"network": "net", "containerID": cid, "ifname": "eth0", "plugin": "tortie"}  # gc knows it
    with proc as ipam:
        (got,) = ipam.assign(AssignRequest(attachment_handle("net", cid, "eth0"), proc.node, attrs=attrs,
                                           legacy_handle=legacy_handle("net", cid)))  # as ipam_ops asks
        address = str(got.address)
        _write_endpoint(ResourceStore(ipam.client), _endpoint(proc.node, cid, [address]), _handle_key(cid))
    return address


def _pod_del(proc: _Process, cid: str) -> list[str]:
    """DEL as ``tortie_ops`` does it: the addresses and the endpoint (if it is this container's) together."""
    from cni_plugins.tortie_ops import _endpoint_deletion

    key = _endpoint_key(proc.node, cid)
    with proc as ipam:
        _, released = ipam.release_attachment("net", cid, "eth0", node=proc.node, also_read=[key],
                                              also_write=lambda values: _endpoint_deletion(values.get(key), cid))
    return sorted(map(str, released))


def _endpoints(client: EtcdClient) -> dict[str, str]:
    """Each endpoint's key → the container it names."""
    import json

    from datastore import keys
    from datastore.resources import WorkloadEndpoint

    kvs, _ = client.list(keys.resource_prefix(WorkloadEndpoint.PLURAL))
    return {kv.key: json.loads(kv.value)["spec"]["containerID"] for kv in kvs}


@pytest.fixture
def agent_env(etcd_client: EtcdClient, etcd_server: EtcdServer) -> Iterator[tuple[str, GatewayClient]]:
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as gateway:
        yield f"del-{uuid.uuid4().hex[:8]}", gateway


def test_a_kept_del_leaves_an_endpoint_another_process_rewrote_for_another_container(
        etcd_client: EtcdClient, agent_env: tuple[str, GatewayClient]) -> None:
    node, gateway = agent_env
    agent = _Process(gateway, node)
    first, second = _pod_add(agent, "c1"), _pod_add(agent, "c2")
    store = ResourceStore(etcd_client)  # another process: c2's endpoint now names another container
    store.update(_endpoint(node, "c2", [second], container="other"), current=None)
    assert _pod_del(agent, "c2") == [second]
    assert allocated(etcd_client) == {first: attachment_handle("net", "c1", "eth0")}
    assert _endpoints(etcd_client) == {_endpoint_key(node, "c1"): "c1", _endpoint_key(node, "c2"): "other"}


def test_a_kept_del_after_the_endpoint_was_deleted_by_another_process(
        etcd_client: EtcdClient, agent_env: tuple[str, GatewayClient]) -> None:
    node, gateway = agent_env
    agent = _Process(gateway, node)
    first, second = _pod_add(agent, "c1"), _pod_add(agent, "c2")
    etcd_client.delete(_endpoint_key(node, "c2"))
    assert _pod_del(agent, "c2") == [second]
    assert _pod_del(agent, "c2") == []  # idempotent: a DEL of something gone is success
    assert allocated(etcd_client) == {first: attachment_handle("net", "c1", "eth0")}
    assert _endpoints(etcd_client) == {_endpoint_key(node, "c1"): "c1"}


@pytest.mark.parametrize("how", ["netctl ipam release", "gc"])
def test_a_kept_del_after_its_handle_was_released_and_the_address_handed_to_another_pod(
        etcd_client: EtcdClient, etcd_server: EtcdServer, agent_env: tuple[str, GatewayClient], how: str) -> None:
    from ipam.gc import gc

    node, gateway = agent_env
    agent = _Process(gateway, node)
    first, second = _pod_add(agent, "c1"), _pod_add(agent, "c2")
    if how == "gc":  # c2's endpoint gone (say, a crashed DEL), then the garbage collector
        etcd_client.delete(_endpoint_key(node, "c2"))
        assert [str(a) for a, _ in gc(etcd_client, grace_seconds=0).released] == [second]
    else:
        assert [str(a) for a in IPAM(etcd_client, serializable_snapshot=False).release_handle(
            attachment_handle("net", "c2", "eth0"))] == [second]
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as elsewhere, \
            _Process(elsewhere, node) as other:  # another process of the node: a pod asking for that address
        attrs = {"network": "net", "containerID": "d1", "ifname": "eth0"}
        (third,) = other.assign(AssignRequest(attachment_handle("net", "d1", "eth0"), node,
                                              addresses=[ipaddress.ip_address(second)], attrs=attrs))
    assert _pod_del(agent, "c2") == []
    assert allocated(etcd_client) == {first: attachment_handle("net", "c1", "eth0"),
                                      second: attachment_handle("net", "d1", "eth0")}
    assert _endpoints(etcd_client) == {_endpoint_key(node, "c1"): "c1"}


def test_a_kept_del_after_another_process_changed_the_block(
        etcd_client: EtcdClient, agent_env: tuple[str, GatewayClient]) -> None:
    """Its handle and endpoint as kept, its block not: an in-process plugin (or an operator)
    assigned the next address of the block meanwhile."""
    from datastore import keys
    from datastore.kv import Update
    from ipam.block import Block

    node, gateway = agent_env
    agent = _Process(gateway, node)
    first, second = _pod_add(agent, "c1"), _pod_add(agent, "c2")
    kvs, _ = etcd_client.list(keys.block_prefix(4))
    (kv,) = [kv for kv in kvs if Block.from_json(kv.value).node == node]
    block, (taken,) = Block.from_json(kv.value).assign(1, "other", {})
    etcd_client.commit([Update(kv.key, block.to_json(), kv.mod_revision)])
    assert _pod_del(agent, "c2") == [second]
    assert allocated(etcd_client) == {first: attachment_handle("net", "c1", "eth0"), str(taken): "other"}


def test_a_kept_del_after_another_process_deleted_and_added_the_same_attachment(
        etcd_client: EtcdClient, etcd_server: EtcdServer, agent_env: tuple[str, GatewayClient]) -> None:
    node, gateway = agent_env
    agent = _Process(gateway, node)
    first, second = _pod_add(agent, "c1"), _pod_add(agent, "c2")
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as elsewhere:
        other = _Process(elsewhere, node)
        assert _pod_del(other, "c2") == [second]
        again = _pod_add(other, "c2")
    assert _pod_del(agent, "c2") == [again]  # the attachment as it is now, not as this process left it
    assert allocated(etcd_client) == {first: attachment_handle("net", "c1", "eth0")}
    assert _endpoints(etcd_client) == {_endpoint_key(node, "c1"): "c1"}


@pytest.mark.parametrize("differs", ["block", "handle", "endpoint"])
def test_a_kept_del_after_a_restore_from_backup_that_repeats_its_revisions(own_etcd: EtcdServer,
                                                                           differs: str) -> None:
    """A cluster restored from a backup taken before the pod's ADD, then written again: the block,
    the handle and the endpoint at exactly the revisions this process kept, one of them with other
    contents. The DEL must act on what etcd holds, not on what this process wrote."""
    import json

    from datastore import keys
    from datastore.kv import Create, Update
    from ipam.block import Block

    env = own_etcd.env()
    node = f"restore-{uuid.uuid4().hex[:8]}"
    with EtcdClient(EtcdConfig.from_env(env)) as operator:
        add_pool(operator, "p", "10.244.0.0/24", blockSize=26)
        with GatewayClient(EtcdConfig.from_env(env)) as gateway:
            agent = _Process(gateway, node)
            zero = _pod_add(agent, "c0")  # the node's block, and the agent's kept snapshot
            other_node = IPAM(operator, serializable_snapshot=False)
            (b0,) = other_node.assign(AssignRequest(attachment_handle("net", "b0", "eth0"), "b", attrs={}))
        backup = Path(own_etcd.work_dir) / "backup.data"
        own_etcd.stop()
        shutil.copytree(own_etcd.data_dir, backup)
        own_etcd.start()
    with GatewayClient(EtcdConfig.from_env(env)) as gateway:
        agent.ipam = IPAM(gateway)  # the same process (its kept state), connected again
        first = _pod_add(agent, "c1")  # block and handle at R+1, endpoint at R+2: all kept
    with EtcdClient(EtcdConfig.from_env(env)) as operator:
        block_key = keys.block_key(ipaddress.ip_network(f"{zero}/26", strict=False))
        kept_block, kept_handle = operator.get(block_key), operator.get(_handle_key("c1"))
        kept_endpoint = operator.get(_endpoint_key(node, "c1"))
        assert kept_block is not None and kept_handle is not None and kept_endpoint is not None
    own_etcd.stop()
    shutil.rmtree(own_etcd.data_dir)
    shutil.copytree(backup, own_etcd.data_dir)
    own_etcd.start()
    with EtcdClient(EtcdConfig.from_env(env)) as operator:
        before = operator.get(block_key)
        assert before is not None and before.mod_revision < kept_block.mod_revision
        block_value, handle_value, endpoint_value = kept_block.value, kept_handle.value, kept_endpoint.value
        ops: list[Any] = []
        told = {zero: attachment_handle("net", "c0", "eth0"), str(b0.address): attachment_handle("net", "b0", "eth0")}
        if differs == "block":  # c1 holds the next address instead
            restored = Block.from_json(before.value)
            block, (moved,) = restored.assign(1, attachment_handle("net", "c1", "eth0"), {},
                                              reserved={restored.ordinal(ipaddress.ip_address(first))})
            block_value, expected = block.to_json(), [str(moved)]
        elif differs == "handle":  # c1 also holds an address of node b's block
            handle = json.loads(kept_handle.value)
            other_key = keys.block_key(b0.block)
            other = operator.get(other_key)
            assert other is not None
            block_b, (extra,) = Block.from_json(other.value).assign(1, attachment_handle("net", "c1", "eth0"), {})
            handle["blocks"][str(b0.block)] = 1
            handle_value = json.dumps(handle).encode()
            ops.append(Update(other_key, block_b.to_json(), other.mod_revision))
            expected = sorted([first, str(extra)])
        else:  # c1's endpoint names another container
            doc = json.loads(kept_endpoint.value)
            doc["spec"]["containerID"] = "other"
            endpoint_value, expected = json.dumps(doc).encode(), [first]
        rev = operator.commit([Update(block_key, block_value, before.mod_revision),
                               Create(_handle_key("c1"), handle_value), *ops])
        assert rev == kept_block.mod_revision == kept_handle.mod_revision
        assert operator.commit([Create(_endpoint_key(node, "c1"), endpoint_value)]) == kept_endpoint.mod_revision
        with GatewayClient(EtcdConfig.from_env(env)) as gateway:
            agent.ipam = IPAM(gateway)
            assert _pod_del(agent, "c1") == expected
        assert allocated(operator) == told
        assert _endpoints(operator) == ({_endpoint_key(node, "c0"): "c0", _endpoint_key(node, "c1"): "other"}
                                        if differs == "endpoint" else {_endpoint_key(node, "c0"): "c0"})
        assert _core_problems(operator) == []


def test_processes_of_one_node_adding_and_deleting_pods_planned_on_what_they_wrote(
        etcd_client: EtcdClient, etcd_server: EtcdServer) -> None:
    """Two processes of node a serve ADD, DEL and ADD again of the same pods at the same time (each
    DEL of a process that served the pod's ADD planned on what it wrote; ADD and DEL of one pod also
    racing inside a process, on its 4 threads), node b its own: every address a caller was told it
    got and not told it lost is in etcd under its handle, nothing else is; then a DEL of every pod
    of node a by a third process leaves no endpoint and no address of them. (Node b's endpoints
    are not checked: an ADD repeated while the DEL of the same pod runs writes its endpoint
    unconditionally, as runtimes never do; its addresses are.)"""
    from collections import Counter

    add_pool(etcd_client, "p", "10.244.0.0/25", blockSize=27)
    env = etcd_server.env()
    pods = [f"c{i}" for i in range(16)]
    first = [["podadd", c] for c in pods] + [[op, c] for c in pods for op in ("poddel", "podadd")]
    second = [[op, c] for c in pods[::-1] for op in ("poddel", "podadd")] + [["poddel", c] for c in pods[::2]]
    b = [[op, f"b{i}"] for i in range(16) for op in ("podadd", "poddel", "podadd")]
    net: Counter[tuple[str, str]] = Counter()  # (address, handle) → told added − told released

    def count(told: list[dict[str, Any]]) -> None:
        for t in told:
            handle = attachment_handle("net", t["cid"], "eth0")
            if t["op"] == "podadd" and not t.get("reused") and "addresses" in t:
                net.update((a, handle) for a in t["addresses"])
            released = t.get("undone", []) if t["op"] == "podadd" else t.get("addresses", [])
            net.subtract((a, handle) for a in released)

    for told in _workers(env, [("a", first), ("a", second), ("b", b)]):
        count(told)
    assert all(n in (0, 1) for n in net.values()), f"told twice, or released what it was not told: {net}"
    assert allocated(etcd_client) == {a: h for (a, h), n in net.items() if n == 1}
    assert _core_problems(etcd_client) == []
    (last,) = _workers(env, [("a", [["poddel", c] for c in pods])])
    count(last)
    assert allocated(etcd_client) == {a: h for (a, h), n in net.items() if n == 1}
    assert all(h.startswith("net.b") for (_, h), n in net.items() if n == 1)
    assert not [k for k in _endpoints(etcd_client) if k.startswith(_endpoint_key("a", ""))]
