"""Adversarial interleavings around the IPAM batches' kept snapshot and their one-transaction
claims (``ipam.kept_snapshot``, ``ipam.batch``): whatever happens in etcd between the snapshot a
warm process plans on and its commit, no address is in two handles, no reservation is slipped
past, and every caller is told what etcd holds."""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from datastore import codec
from datastore.config import EtcdConfig
from datastore.etcd import EtcdClient
from datastore.gateway import GatewayClient
from datastore.store import ResourceStore
from ipam.allocator import IPAM, AssignRequest
from ipam.handles import attachment_handle
from netlab.etcd import ETCD, EtcdServer
from tests.lab.ipam_support import add_pool, allocated

pytestmark = pytest.mark.lab


def _assign(ipam: IPAM, node: str, cid: str) -> str:
    attrs = {"network": "net", "containerID": cid, "ifname": "eth0"}
    (got,) = ipam.assign(AssignRequest(attachment_handle("net", cid, "eth0"), node, attrs=attrs))
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
