"""A warm process plans its next assignment on the node's kept IPAM snapshot, or on a serializable
read (``ipam.kept_snapshot``, ``ipam.batch``): whatever changed in etcd since, by another process of
the node, an operator or another node, no address is handed out twice, no deleted pool or new
reservation is slipped past, and a repeated ADD still gets its own addresses back."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterator

import pytest

from datastore import codec, keys
from datastore.config import EtcdConfig
from datastore.etcd import EtcdClient
from datastore.gateway import GatewayClient
from datastore.kv import Update
from datastore.resources import IPPool
from datastore.store import ResourceStore
from ipam.allocator import IPAM, AssignRequest
from ipam.block import Block
from ipam.errors import IPAMError
from ipam.handles import attachment_handle
from netlab.etcd import EtcdServer
from tests.lab.ipam_support import add_pool, allocated, handles

pytestmark = pytest.mark.lab


@pytest.fixture
def gateway(etcd_client: EtcdClient, etcd_server: EtcdServer) -> Iterator[GatewayClient]:
    """The agent's kind of client; ``etcd_client`` (which empties the key space) plays the others."""
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as client:
        yield client


def _node() -> str:
    return f"kept-{uuid.uuid4().hex[:8]}"  # a node no earlier test of the session kept a snapshot of


def _assign(ipam: IPAM, node: str, cid: str) -> str:
    attrs = {"network": "net", "containerID": cid, "ifname": "eth0"}
    (got,) = ipam.assign(AssignRequest(attachment_handle("net", cid, "eth0"), node, attrs=attrs))
    return str(got.address)


def _taken_behind_its_back(client: EtcdClient, node: str, handle: str) -> str:
    """Another process of the node (an in-process plugin) assigns the next free address itself."""
    kvs, _ = client.list(keys.block_prefix(4))
    (kv,) = [kv for kv in kvs if Block.from_json(kv.value).node == node]
    block, (address,) = Block.from_json(kv.value).assign(1, handle, {})
    client.commit([Update(kv.key, block.to_json(), kv.mod_revision)])
    return str(address)


def test_an_address_taken_by_another_process_since_is_never_handed_out_again(etcd_client: EtcdClient,
                                                                            gateway: GatewayClient) -> None:
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    node, ipam = _node(), IPAM(gateway)
    told = {_assign(ipam, node, "c1"): attachment_handle("net", "c1", "eth0")}
    for i in range(3):  # each time the kept snapshot's block is out of date
        told[_taken_behind_its_back(etcd_client, node, f"other{i}")] = f"other{i}"
        cid = f"c{i + 2}"
        address = _assign(ipam, node, cid)
        assert address not in told, "an address was handed out twice"
        told[address] = attachment_handle("net", cid, "eth0")
    assert allocated(etcd_client) == told


def test_a_pool_deleted_since_is_not_assigned_from(etcd_client: EtcdClient, gateway: GatewayClient) -> None:
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    node, ipam = _node(), IPAM(gateway)
    first = _assign(ipam, node, "c1")
    ResourceStore(etcd_client).delete(IPPool, "p")
    with pytest.raises(IPAMError):
        _assign(ipam, node, "c2")
    assert allocated(etcd_client) == {first: attachment_handle("net", "c1", "eth0")}


def test_a_reservation_applied_since_is_respected(etcd_client: EtcdClient, gateway: GatewayClient) -> None:
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    node, ipam = _node(), IPAM(gateway)
    first = _assign(ipam, node, "c1")  # the first address of the node's new block: a /28's start
    reserved = ipaddress.ip_network(f"{first}/28")
    ResourceStore(etcd_client).create(codec.decode({
        "apiVersion": "projectcalico.org/v3", "kind": "IPReservation", "metadata": {"name": "r"},
        "spec": {"reservedCIDRs": [str(reserved)]}}))
    assert ipaddress.ip_address(_assign(ipam, node, "c2")) not in reserved


def test_a_repeated_add_gets_its_own_address_back(etcd_client: EtcdClient, gateway: GatewayClient) -> None:
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    node, ipam = _node(), IPAM(gateway)
    first = _assign(ipam, node, "c1")
    _assign(ipam, node, "c2")
    assert _assign(ipam, node, "c1") == first
    assert sorted(allocated(etcd_client).values()).count(attachment_handle("net", "c1", "eth0")) == 1


def test_releases_between_assignments_leave_etcd_as_the_callers_were_told(etcd_client: EtcdClient,
                                                                          gateway: GatewayClient) -> None:
    """Releases by attachment (the batches, which bring the kept snapshot up to date), by handle
    and by an operator elsewhere (which it does not see) between a warm process's assignments."""
    add_pool(etcd_client, "p", "10.244.0.0/26", blockSize=26)
    node, ipam, other = _node(), IPAM(gateway), IPAM(etcd_client, serializable_snapshot=False)
    held: dict[str, str] = {}
    for i in range(40):
        cid = f"c{i}"
        held[_assign(ipam, node, cid)] = attachment_handle("net", cid, "eth0")
        if i % 3 == 0:
            _, released = ipam.release_attachment("net", cid, "eth0", node=node)
            held.pop(str(released[0]))
        elif i % 3 == 1:
            released = other.release_handle(attachment_handle("net", cid, "eth0"))
            held.pop(str(released[0]))
    assert allocated(etcd_client) == held
    assert set(handles(etcd_client)) == set(held.values())


def test_a_del_of_nothing_releases_nothing_and_succeeds(etcd_client: EtcdClient, gateway: GatewayClient) -> None:
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    node, ipam = _node(), IPAM(gateway)
    kept = _assign(ipam, node, "c1")
    assert ipam.release_attachment("net", "gone", "eth0", node=node) == ([], [])
    assert allocated(etcd_client) == {kept: attachment_handle("net", "c1", "eth0")}
