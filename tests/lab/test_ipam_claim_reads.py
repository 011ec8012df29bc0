"""A block claim costs no etcd round trip besides the batch's fresh read and its commit
(``ipam.batch``, ``IPAM.snapshot``): the free blocks, the requested address's block and the node's
affinities come in that read. Each test counts the round trips of one assignment and checks that
etcd holds exactly what the caller was told: one block, created with the node's confirmed affinity."""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from datastore import keys
from datastore.etcd import EtcdClient
from ipam.allocator import IPAM, AssignRequest
from ipam.block import Block
from ipam.handles import attachment_handle
from tests.lab.ipam_support import add_pool, allocated

pytestmark = pytest.mark.lab


class _Counting:
    """A client passing every call on to ``client``, recording each round trip to etcd by name."""

    ROUND_TRIPS = frozenset({"read", "get", "get_many", "list", "count", "commit"})

    def __init__(self, client: EtcdClient) -> None:
        self.client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if name not in self.ROUND_TRIPS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)
        return counted

    def counting(self, call: Callable[[], Any]) -> tuple[Any, list[str]]:
        self.calls = []
        return call(), self.calls


def _node() -> str:
    return f"rt-{uuid.uuid4().hex[:8]}"  # no kept snapshot, no block hints of an earlier test


def _assign(ipam: IPAM, node: str, cid: str, *addresses: str) -> str:
    attrs = {"network": "net", "containerID": cid, "ifname": "eth0"}
    req = AssignRequest(attachment_handle("net", cid, "eth0"), node, attrs=attrs,
                        addresses=[ipaddress.ip_address(a) for a in addresses])
    (got,) = ipam.assign(req)
    return str(got.address)


def _owners(client: EtcdClient) -> dict[str, str | None]:
    kvs, _ = client.list(keys.block_prefix(4))
    return {str(Block.from_json(kv.value).cidr): Block.from_json(kv.value).node for kv in kvs}


def _affinity(client: EtcdClient, node: str, cidr: str) -> dict[str, Any] | None:
    kv = client.get(keys.affinity_key(node, ipaddress.ip_network(cidr)))
    return json.loads(kv.value) if kv is not None else None


def test_an_automatic_claim_is_one_read_and_the_commit(etcd_client: EtcdClient) -> None:
    """Cold (a serializable read first) and warm (the kept snapshot): the free block is chosen on the
    listing that came with the fresh read, never on a block another node holds."""
    add_pool(etcd_client, "p", "10.244.0.0/28", blockSize=30)  # four blocks of four addresses
    other = _node()
    told = {_assign(IPAM(etcd_client), other, f"o{i}", f"10.244.0.{4 * i + 1}"):
            attachment_handle("net", f"o{i}", "eth0") for i in (0, 2)}  # the other node holds blocks 0 and 2
    node, client = _node(), _Counting(etcd_client)
    ipam = IPAM(client)  # type: ignore[arg-type]
    first, calls = client.counting(lambda: _assign(ipam, node, "c0"))
    assert calls == ["read", "read", "commit"]  # the serializable plan wanted a block: the fresh read lists them
    told[first] = attachment_handle("net", "c0", "eth0")
    for i in (1, 2, 3):  # the rest of the block, on the snapshot kept after the claim: one commit each
        address, calls = client.counting(lambda i=i: _assign(ipam, node, f"c{i}"))
        assert calls == ["commit"]
        told[address] = attachment_handle("net", f"c{i}", "eth0")
    fifth, calls = client.counting(lambda: _assign(ipam, node, "c4"))
    assert calls == ["read", "commit"]  # the kept plan wanted a block; the claimed one is hinted: no more reads
    told[fifth] = attachment_handle("net", "c4", "eth0")
    sixth, calls = client.counting(lambda: _assign(ipam, node, "c5"))
    assert calls == ["commit"]
    told[sixth] = attachment_handle("net", "c5", "eth0")
    assert allocated(etcd_client) == told
    mine = {str(ipaddress.ip_network(f"{a}/30", strict=False)) for a in (first, fifth, sixth)}
    assert mine == {"10.244.0.4/30", "10.244.0.12/30"}
    assert _owners(etcd_client) == {"10.244.0.0/30": other, "10.244.0.4/30": node,
                                    "10.244.0.8/30": other, "10.244.0.12/30": node}
    assert all((_affinity(etcd_client, node, c) or {}).get("state") == "confirmed" for c in mine)


def test_a_specific_address_claiming_its_block_is_one_read_and_the_commit(etcd_client: EtcdClient) -> None:
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    node, client = _node(), _Counting(etcd_client)
    ipam = IPAM(client)  # type: ignore[arg-type]
    got, calls = client.counting(lambda: _assign(ipam, node, "c1", "10.244.0.70"))
    assert got == "10.244.0.70"
    assert calls == ["read", "read", "commit"]  # cold: the serializable read, then the fresh one with the block
    got, calls = client.counting(lambda: _assign(ipam, node, "c2", "10.244.0.200"))
    assert got == "10.244.0.200"
    assert calls == ["read", "commit"]  # warm: the kept plan wanted the block; the fresh read brought it
    got, calls = client.counting(lambda: _assign(ipam, node, "c3", "10.244.0.201"))
    assert (got, calls) == ("10.244.0.201", ["commit"])  # the snapshot kept after the claim holds it
    assert allocated(etcd_client) == {"10.244.0.70": attachment_handle("net", "c1", "eth0"),
                                      "10.244.0.200": attachment_handle("net", "c2", "eth0"),
                                      "10.244.0.201": attachment_handle("net", "c3", "eth0")}
    assert _owners(etcd_client) == {"10.244.0.64/26": node, "10.244.0.192/26": node}
    assert (_affinity(etcd_client, node, "10.244.0.192/26") or {}).get("state") == "confirmed"


def test_a_claim_over_a_stale_affinity_confirms_it(etcd_client: EtcdClient) -> None:
    """The node's affinity for the pool's only block, left without its block (a crashed claim of an
    older scheme): the claim updates it at the revision the fresh read listed, in its commit."""
    add_pool(etcd_client, "p", "10.244.0.0/26", blockSize=26)
    node, client = _node(), _Counting(etcd_client)
    cidr = ipaddress.ip_network("10.244.0.0/26")
    etcd_client.put(keys.affinity_key(node, cidr), json.dumps({"state": "pending"}).encode())
    got, calls = client.counting(lambda: _assign(IPAM(client), node, "c1"))  # type: ignore[arg-type]
    # (get_many: the block the affinity names, which this process had no hint of; it is not there)
    assert calls == ["read", "get_many", "read", "commit"]  # (the second read had it: absent)
    assert allocated(etcd_client) == {got: attachment_handle("net", "c1", "eth0")}
    assert _owners(etcd_client) == {str(cidr): node}
    assert (_affinity(etcd_client, node, str(cidr)) or {}).get("state") == "confirmed"


def test_a_stale_affinity_written_after_the_read_fails_the_commit_once(etcd_client: EtcdClient) -> None:
    """The affinity appears between the fresh read (which listed none) and the commit that creates it:
    the commit fails, the next read lists it, and the claim updates it: no loop."""
    add_pool(etcd_client, "p", "10.244.0.0/26", blockSize=26)
    node, client = _node(), _Counting(etcd_client)
    ipam = IPAM(client)  # type: ignore[arg-type]
    affinity_op = ipam.affinity_op
    written: list[str] = []

    def appearing(cidr: Any, owner: str, snap: Any = None) -> Any:
        op = affinity_op(cidr, owner, snap)
        if not written:
            written.append(str(cidr))
            etcd_client.put(keys.affinity_key(owner, cidr), json.dumps({"state": "pending"}).encode())
        return op

    ipam.affinity_op = appearing  # type: ignore[method-assign]
    got, calls = client.counting(lambda: _assign(ipam, node, "c1"))
    assert written == ["10.244.0.0/26"]
    assert calls == ["read", "read", "commit", "read", "get_many", "commit"]  # the first commit fails
    assert allocated(etcd_client) == {got: attachment_handle("net", "c1", "eth0")}
    assert _owners(etcd_client) == {"10.244.0.0/26": node}
    assert (_affinity(etcd_client, node, "10.244.0.0/26") or {}).get("state") == "confirmed"


def test_a_specific_address_whose_block_another_node_creates_meanwhile_is_borrowed(etcd_client: EtcdClient) -> None:
    """The block the fresh read found absent is created by another node before the commit: the
    Create of the block fails the commit, and the address is planned again in the other's block."""
    add_pool(etcd_client, "p", "10.244.0.0/24", blockSize=26)
    node, other = _node(), _node()
    ipam = IPAM(etcd_client)
    affinity_op = ipam.affinity_op

    def raced(cidr: Any, owner: str, snap: Any = None) -> Any:
        if not _owners(etcd_client):
            _assign(IPAM(etcd_client), other, "o1", "10.244.0.71")
        return affinity_op(cidr, owner, snap)

    ipam.affinity_op = raced  # type: ignore[method-assign]
    assert _assign(ipam, node, "c1", "10.244.0.70") == "10.244.0.70"
    assert allocated(etcd_client) == {"10.244.0.70": attachment_handle("net", "c1", "eth0"),
                                      "10.244.0.71": attachment_handle("net", "o1", "eth0")}
    assert _owners(etcd_client) == {"10.244.0.64/26": other}
    assert _affinity(etcd_client, node, "10.244.0.64/26") is None
