"""Many nodes allocating at once through the tortie-ipam executable: no address twice, each node
in its own blocks while free blocks remain, borrowing only once they do not."""

from __future__ import annotations

import ipaddress
from concurrent.futures import ThreadPoolExecutor

import pytest

from datastore import codec
from datastore.etcd import EtcdClient
from datastore.store import ResourceStore
from ipam import check
from tests.lab.ipam_support import add_pool, allocated, handles, ipam, net_config

pytestmark = pytest.mark.lab

# A /22 cut into four /24 blocks. node-b and node-c need one block each; node-a needs more than
# the two that are left, so once its own blocks are full (512 addresses) it must borrow 28.
POOL = ipaddress.ip_network("10.244.0.0/22")
DEMAND = {"node-a": 540, "node-b": 30, "node-c": 30}
WORKERS_PER_NODE = 8


def test_three_nodes_eight_workers_600_addresses(etcd_client: EtcdClient, etcd_env: dict[str, str]) -> None:
    add_pool(etcd_client, "race", str(POOL), blockSize=24)
    for node in DEMAND:  # the nodes exist, as they do when agents run (ipam check asks for them)
        ResourceStore(etcd_client).create(codec.decode(
            {"apiVersion": "tortie.dev/v1", "kind": "Node", "metadata": {"name": node}, "spec": {}}))
    confs = {node: net_config(etcd_env, node=node) for node in DEMAND}
    jobs = [(node, f"{node}-{i}") for node, n in DEMAND.items() for i in range(n)]
    jobs.sort(key=lambda job: int(job[1].rsplit("-", 1)[1]))  # node-b and node-c start at once

    def add(job: tuple[str, str]) -> tuple[str, str, str]:
        node, cid = job
        run = ipam("ADD", confs[node], cid)
        assert run.ok, f"{cid}: {run.stdout} {run.stderr}"
        return node, cid, str(ipaddress.ip_interface(run.addresses()[0]).ip)

    # Eight workers per node, all nodes at once (one shared pool would run node-a's jobs first).
    pools = {node: ThreadPoolExecutor(WORKERS_PER_NODE) for node in DEMAND}
    try:
        futures = [pools[node].submit(add, (node, cid)) for node, cid in jobs]
        results = [f.result() for f in futures]
    finally:
        for executor in pools.values():
            executor.shutdown()

    got = [address for _, _, address in results]
    assert len(got) == 600 and len(set(got)) == 600, "an address was handed out twice"
    assert allocated(etcd_client) == {a: f"tnet.{cid}.eth0" for _, cid, a in results}

    owners = {}  # block → node, from the affinities
    kvs, _ = etcd_client.list("/tortie/ipam/v2/host/")
    for kv in kvs:  # /tortie/ipam/v2/host/<node>/ipv4/block/<cidr>
        node, _, _, cidr = kv.key[len("/tortie/ipam/v2/host/"):].split("/")
        owners[ipaddress.ip_network(cidr.replace("-", "/"))] = node
    assert sorted(owners.values()) == ["node-a", "node-a", "node-b", "node-c"], owners

    def own(node: str, address: str) -> bool:
        return any(ipaddress.ip_address(address) in b for b, n in owners.items() if n == node)

    for node in ("node-b", "node-c"):
        assert all(own(node, a) for n, _, a in results if n == node), f"{node} used a block not its own"
    mine = [a for n, _, a in results if n == "node-a" and own("node-a", a)]
    borrowed = [a for n, _, a in results if n == "node-a" and not own("node-a", a)]
    assert len(mine) == 512, "node-a filled both of its blocks before borrowing"
    assert len(borrowed) == 28

    def delete(job: tuple[str, str, str]) -> None:
        node, cid, _ = job
        run = ipam("DEL", confs[node], cid)
        assert run.ok, f"{cid}: {run.stdout}"

    with ThreadPoolExecutor(WORKERS_PER_NODE * len(DEMAND)) as pool:
        list(pool.map(delete, results))
    assert handles(etcd_client) == {} and allocated(etcd_client) == {}
    report = check.check(etcd_client)
    assert not report.problems, report.problems
