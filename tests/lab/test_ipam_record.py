"""A record created in the same transaction as an assignment (what the tortie plugin does with its
workload endpoint): written with the addresses or not at all, never over an existing key, and an
assignment that loses a race for the record key still hands out each address once."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from datastore import keys
from datastore.etcd import EtcdClient
from datastore.kv import Op
from ipam.allocator import IPAM, Assigned, AssignRequest, Record
from tests.lab.ipam_support import add_pool, allocated

pytestmark = pytest.mark.lab

KEY = "/tortie/test/record"


def render(given: list[Assigned]) -> bytes:
    return json.dumps(sorted(str(a.address) for a in given)).encode()


@pytest.fixture
def pools(etcd_client: EtcdClient) -> EtcdClient:
    add_pool(etcd_client, "p4", "10.244.0.0/16")
    return etcd_client


def test_record_is_written_in_the_assignments_transaction(pools: EtcdClient) -> None:
    record = Record(KEY, render)
    got = IPAM(pools).assign(AssignRequest("net.c1", "node-1", record=record))
    kv = pools.get(KEY)
    handle = pools.get(keys.handle_key("net.c1"))
    assert kv is not None and handle is not None
    assert json.loads(kv.value) == [str(got[0].address)]
    assert record.revision == kv.mod_revision == handle.mod_revision  # one transaction
    assert allocated(pools) == {str(got[0].address): "net.c1"}


def test_an_existing_key_is_left_alone_and_reported_unwritten(pools: EtcdClient) -> None:
    pools.put(KEY, b"someone else's")
    record = Record(KEY, render)
    got = IPAM(pools).assign(AssignRequest("net.c1", "node-1", record=record))
    assert record.revision == 0 and len(got) == 1
    kv = pools.get(KEY)
    assert kv is not None and kv.value == b"someone else's"


def test_a_repeated_assignment_writes_no_record(pools: EtcdClient) -> None:
    first = IPAM(pools).assign(AssignRequest("net.c1", "node-1"))
    record = Record(KEY, render)
    again = IPAM(pools).assign(AssignRequest("net.c1", "node-1", record=record))
    assert [a.address for a in again] == [a.address for a in first] and again[0].reused
    assert record.revision == 0 and pools.get(KEY) is None


class _Racer:
    """The real client, except that the record key appears just before the first commit."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self.commits = 0

    def commit(self, ops: Sequence[Op]) -> int:
        self.commits += 1
        if self.commits == 1:
            self._client.put(KEY, b"won the race")
        return self._client.commit(ops)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_losing_the_race_for_the_record_key_assigns_once_and_leaves_the_winner(pools: EtcdClient) -> None:
    IPAM(pools).assign(AssignRequest("net.c0", "node-1"))  # the block exists: no claim commits first
    racer = _Racer(pools)
    record = Record(KEY, render)
    got = IPAM(racer).assign(AssignRequest("net.c1", "node-1", record=record))  # type: ignore[arg-type]
    assert racer.commits == 2  # the first transaction failed as a whole and was planned again
    assert record.revision == 0
    kv = pools.get(KEY)
    assert kv is not None and kv.value == b"won the race"
    held = allocated(pools)
    assert sorted(held.values()) == ["net.c0", "net.c1"] and held[str(got[0].address)] == "net.c1"
