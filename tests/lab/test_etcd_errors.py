"""What etcd refuses is an answer, not an outage: both clients report it at once, never retried,
never as "unreachable"; a transaction over etcd's limits is refused before it is sent.

Each client is given a long retry budget, so a retried refusal would show as a call that lasts it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import pytest

from datastore.config import EtcdConfig
from datastore.errors import DatastoreRejected, TransactionTooLarge
from datastore.etcd import EtcdClient
from datastore.gateway import GatewayClient
from datastore.kv import KV, Create, TxnLimits, op_bytes
from netlab.etcd import EtcdServer

pytestmark = pytest.mark.lab

RETRY_BUDGET = 30.0
PREFIX = "/tortie/test-etcd-errors/"


@pytest.fixture(params=[EtcdClient, GatewayClient], ids=["grpc", "gateway"])
def kv(request: pytest.FixtureRequest, etcd_server: EtcdServer, etcd_client: EtcdClient) -> Iterator[KV]:
    config = dataclasses.replace(EtcdConfig.from_env(etcd_server.env()), retry_budget=RETRY_BUDGET)
    client = request.param(config)
    try:
        yield client
    finally:
        client.close()


def _refused(call: Callable[[], object]) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(DatastoreRejected) as refused:
        call()
    return str(refused.value), time.monotonic() - started


@pytest.mark.parametrize(("size", "etcd_says"), [
    (1_600_000, "request is too large [INVALID_ARGUMENT]"),  # over --max-request-bytes
    (3_000_000, "received message larger than max"),          # over gRPC's own limit: RESOURCE_EXHAUSTED
])
def test_a_value_etcd_refuses_is_reported_at_once(kv: KV, etcd_client: EtcdClient, size: int,
                                                  etcd_says: str) -> None:
    message, elapsed = _refused(lambda: kv.put(f"{PREFIX}big", b"x" * size))
    assert etcd_says in message and "refused the put" in message
    assert "unreachable" not in message
    assert elapsed < 5, f"{elapsed:.1f} s: retried as if etcd were away (budget {RETRY_BUDGET} s)"
    assert etcd_client.get(f"{PREFIX}big") is None


def test_too_many_operations_is_reported_at_once(kv: KV, etcd_client: EtcdClient) -> None:
    # Past our own check, to see what etcd answers.
    kv.limits = TxnLimits(max_ops=1000)  # type: ignore[attr-defined]
    message, elapsed = _refused(lambda: kv.commit([Create(f"{PREFIX}{i}", b"v") for i in range(200)]))
    assert "too many operations in txn request" in message and "unreachable" not in message
    assert elapsed < 5
    assert etcd_client.count(PREFIX)[0] == 0


def test_a_transaction_over_the_limits_is_refused_before_it_is_sent(kv: KV, etcd_client: EtcdClient) -> None:
    before = etcd_client.count(PREFIX)
    with pytest.raises(TransactionTooLarge, match="--max-txn-ops"):
        kv.commit([Create(f"{PREFIX}{i}", b"v") for i in range(129)])
    with pytest.raises(TransactionTooLarge, match="--max-request-bytes"):
        kv.commit([Create(f"{PREFIX}a", b"v" * 800_000), Create(f"{PREFIX}b", b"v" * 800_000)])
    assert etcd_client.count(PREFIX) == before  # not even the revision moved


def test_the_largest_transaction_the_check_allows_is_one_etcd_takes(kv: KV, etcd_client: EtcdClient) -> None:
    key = f"{PREFIX}largest"
    limits = TxnLimits()
    value = b"v" * (limits.max_bytes - op_bytes(Create(key, b"")))
    kv.commit([Create(key, value)])
    stored = etcd_client.get(key)
    assert stored is not None and len(stored.value) == len(value)
