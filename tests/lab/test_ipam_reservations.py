"""IPReservation against a real etcd through the real tortie-ipam plugin: three nodes with eight
workers each never get a reserved address (not from their own blocks, not by borrowing, not from a
reservation applied while they allocate), a specific request for one gets code 105, and
``ipam show`` / ``ipam check`` count and report reserved addresses."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from datastore import codec, keys
from datastore.config import EtcdConfig
from datastore.errors import Conflict
from datastore.etcd import EtcdClient
from datastore.gateway import GatewayClient
from datastore.kv import Create, NothingNewer
from datastore.resources import IPReservation
from datastore.store import ResourceStore
from ipam import check
from netlab.etcd import EtcdServer
from tests.lab.ipam_support import add_pool, allocated, ipam, net_config

pytestmark = pytest.mark.lab

# A /24 in sixteen /28 blocks. Reserved from the start: a whole block (never claimed), one address
# and two whole blocks elsewhere (plus a v6 range, which must not disturb the v4 pool).
POOL = ipaddress.ip_network("10.244.0.0/24")
RESERVED = ["10.244.0.0/28", "10.244.0.20", "10.244.0.64/27", "fd00:10:244::/123"]
LATE = "10.244.0.128/26"  # applied while the nodes allocate
NETCTL = __import__("pathlib").Path(sys.executable).parent / "netctl"
NODES = ("node-a", "node-b", "node-c")
PER_NODE = 50  # 150 of the 207 addresses left; node blocks fill, some are borrowed
WORKERS_PER_NODE = 8


def _reservation(name: str, cidrs: list[str]) -> object:
    return codec.decode({"apiVersion": "projectcalico.org/v3", "kind": "IPReservation",
                         "metadata": {"name": name}, "spec": {"reservedCIDRs": cidrs}})


def _inside(address: str, cidrs: list[str]) -> bool:
    return any(ipaddress.ip_address(address) in ipaddress.ip_network(c) for c in cidrs)


def test_three_nodes_eight_workers_never_get_a_reserved_address(etcd_client: EtcdClient,
                                                                 etcd_env: dict[str, str]) -> None:
    store = ResourceStore(etcd_client)
    add_pool(etcd_client, "resv", str(POOL), blockSize=28)
    for node in NODES:
        store.create(codec.decode({"apiVersion": "tortie.dev/v1", "kind": "Node", "metadata": {"name": node},
                                   "spec": {}}))
    store.create(_reservation("fixed", RESERVED))  # type: ignore[arg-type]
    confs = {node: net_config(etcd_env, node=node, plugin_type="bridge") for node in NODES}
    jobs = [(node, f"{node}-{i}") for i in range(PER_NODE) for node in NODES]
    done = 0
    late_applied = threading.Event()
    lock = threading.Lock()

    def add(job: tuple[str, str]) -> tuple[str, str]:
        nonlocal done
        node, cid = job
        run = ipam("ADD", confs[node], cid)
        assert run.ok, f"{cid}: {run.stdout} {run.stderr}"
        with lock:
            done += 1
            if done == 30:  # a reservation lands while every node is busy allocating
                store.create(_reservation("late", [LATE]))  # type: ignore[arg-type]
                late_applied.set()
        return cid, str(ipaddress.ip_interface(run.addresses()[0]).ip)

    executors = {node: ThreadPoolExecutor(WORKERS_PER_NODE) for node in NODES}
    try:
        futures = [executors[job[0]].submit(add, job) for job in jobs]
        results = [f.result() for f in futures]
    finally:
        for executor in executors.values():
            executor.shutdown()
    assert late_applied.is_set()

    got = [address for _, address in results]
    assert len(set(got)) == len(jobs) == len(got)
    assert not [a for a in got if _inside(a, RESERVED)], "a reserved address was handed out"
    # An address inside the late reservation may only have been committed before the reservation was
    # (Calico's semantics: what was in use stays in use); never after it: the handle, written in the
    # same transaction as the allocation, says when.
    late = etcd_client.get(keys.resource_key(IPReservation.PLURAL, "late"))
    assert late is not None
    for cid, address in results:
        if _inside(address, [LATE]):
            handle = etcd_client.get(keys.handle_key(f"tnet.{cid}.eth0"))
            assert handle is not None and handle.create_revision < late.create_revision, \
                f"{address} was handed out after the reservation covering it"
    # borrowing happened (node blocks alone cannot hold 50 each in ten usable blocks) and skipped them too
    assert len(allocated(etcd_client)) == len(jobs)

    # a fresh allocation after the fact never lands in any reservation
    after = ipam("ADD", confs["node-a"], "after")
    assert after.ok, after.stdout
    assert not _inside(str(ipaddress.ip_interface(after.addresses()[0]).ip), [*RESERVED, LATE])

    report = check.check(etcd_client)
    (pool,) = report.pools
    in_late = sum(1 for a in [*got, str(ipaddress.ip_interface(after.addresses()[0]).ip)] if _inside(a, [LATE]))
    assert pool.reserved == 16 + 1 + 32 + 64 and pool.in_use == len(jobs) + 1
    assert pool.free == 256 - pool.in_use - (pool.reserved - in_late)
    flagged = [p for p in report.problems if p.kind == check.ADDRESS_IN_RESERVATION]
    assert len(flagged) == in_late, report.problems
    assert not [p for p in report.problems if p.kind != check.ADDRESS_IN_RESERVATION]


def test_a_specific_request_for_a_reserved_address_gets_code_105(etcd_client: EtcdClient,
                                                                  etcd_env: dict[str, str]) -> None:
    add_pool(etcd_client, "resv", str(POOL), blockSize=28)
    add_pool(etcd_client, "resv6", "fd00:10:244::/64")
    ResourceStore(etcd_client).create(_reservation("fixed", RESERVED))  # type: ignore[arg-type]
    conf = net_config(etcd_env, node="node-a", plugin_type="bridge")
    before = allocated(etcd_client)
    for i, wanted in enumerate(("10.244.0.20", "10.244.0.70/24", "fd00:10:244::5")):
        run = ipam("ADD", {**conf, "runtimeConfig": {"ips": [wanted]}}, f"c{i}")
        assert not run.ok and run.code == 105, run.stdout
        assert "reserved" in run.stdout and wanted.split("/")[0] in run.stdout
    assert allocated(etcd_client) == before  # refused, and nothing left behind
    ok = ipam("ADD", {**conf, "runtimeConfig": {"ips": ["10.244.0.21"]}}, "c-ok")
    assert ok.ok and ipaddress.ip_interface(ok.addresses()[0]).ip == ipaddress.ip_address("10.244.0.21")


def test_netctl_shows_reservations_and_check_reports_an_address_inside_one(etcd_client: EtcdClient,
                                                                          etcd_env: dict[str, str]) -> None:
    add_pool(etcd_client, "resv", str(POOL), blockSize=28)
    conf = net_config(etcd_env, node="node-a", plugin_type="bridge")
    first = ipam("ADD", conf, "early")
    assert first.ok
    taken = str(ipaddress.ip_interface(first.addresses()[0]).ip)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")} | etcd_env

    def netctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(NETCTL), *args], input=stdin, env=env, capture_output=True, text=True,
                              timeout=60)

    doc = json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "IPReservation",
                      "metadata": {"name": "after"}, "spec": {"reservedCIDRs": [taken, "10.244.0.240/28"]}})
    run = netctl("apply", "-f", "-", stdin=doc)
    assert run.returncode == 0, run.stderr
    got = netctl("get", "ipreservations", "-o", "yaml")
    assert got.returncode == 0 and "reservedCIDRs" in got.stdout and taken in got.stdout
    as_json = json.loads(netctl("get", "IPReservation", "after", "-o", "json").stdout)
    assert as_json["spec"] == {"reservedCIDRs": [taken, "10.244.0.240/28"]}
    bad = netctl("apply", "-f", "-", stdin=doc.replace("10.244.0.240/28", "10.244.0.241/28"))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "host bits" in bad.stderr

    shown = json.loads(netctl("ipam", "show", "-o", "json").stdout)
    assert shown["pools"] == [{"name": "resv", "cidr": str(POOL), "total": 256, "inUse": 1, "free": 256 - 1 - 16,
                               "reserved": 17}]
    table = netctl("ipam", "show").stdout.splitlines()
    assert table[1].split()[5:7] == ["17", "(7%)"]  # the IPS RESERVED column
    checked = netctl("ipam", "check")
    assert checked.returncode == 3 and f"address-in-reservation: {taken}" in checked.stdout
    # Calico leaves it to its holder: released by DEL, it is never handed out again
    assert ipam("DEL", conf, "early").ok
    again = ipam("ADD", conf, "next")
    assert again.ok and str(ipaddress.ip_interface(again.addresses()[0]).ip) != taken
    deleted = netctl("delete", "ipreservation", "after")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(netctl("ipam", "show", "-o", "json").stdout)["pools"][0]["reserved"] == 0


def test_nothing_newer_fails_a_commit_once_a_key_under_the_prefix_is_written(etcd_client: EtcdClient,
                                                                            etcd_server: EtcdServer) -> None:
    """The condition an assignment's commit carries, on both clients: a reservation created or
    changed after the snapshot makes the transaction fail (and say which prefix moved)."""
    prefix = "/tortie/resources/v1/ipreservations/"
    with GatewayClient(EtcdConfig.from_env(etcd_server.env())) as gw:
        for i, client in enumerate((etcd_client, gw)):
            _, revision = client.list(prefix)
            client.commit([Create(f"/tortie/x{i}a", b"1"), NothingNewer(prefix, revision)])  # nothing there: passes
            etcd_client.create(f"{prefix}r{i}", b"{}")
            with pytest.raises(Conflict) as lost:
                client.commit([Create(f"/tortie/x{i}b", b"1"), NothingNewer(prefix, revision)])
            assert lost.value.key == prefix and etcd_client.get(f"/tortie/x{i}b") is None
            _, revision = client.list(prefix)
            client.commit([Create(f"/tortie/x{i}b", b"1"), NothingNewer(prefix, revision)])
