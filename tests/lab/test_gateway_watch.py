"""The watch the agent's syncer uses (``EtcdClient.watch``, read from etcd's JSON gateway) against a
real etcd: events in order with their revisions, a replay from a start revision, resuming after
etcd restarts without losing or repeating an event, a re-listing after falling behind a
compaction, and cancel() ending an iteration that waits for events."""

from __future__ import annotations

import queue
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from datastore.config import EtcdConfig
from datastore.etcd import EtcdClient
from datastore.kv import Resync, WatchEvent
from netlab.etcd import EtcdServer

pytestmark = pytest.mark.lab

TIMEOUT = 10.0
Item = WatchEvent | Resync


class Consumer:
    """Iterates a watch on a thread of its own, handing each item over through a queue."""

    def __init__(self, client: EtcdClient, prefix: str, start: int) -> None:
        self.watch = client.watch(prefix, start)
        self.items: queue.Queue[Item] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for item in self.watch:
            self.items.put(item)

    def take(self, n: int) -> list[Item]:
        return [self.items.get(timeout=TIMEOUT) for _ in range(n)]

    def stop(self) -> None:
        self.watch.cancel()
        self.thread.join(TIMEOUT)


@pytest.fixture
def prefix() -> str:
    return f"/tortie/test/{uuid.uuid4().hex}/"


@pytest.fixture
def own_etcd(etcd_server: EtcdServer) -> Iterator[EtcdServer]:
    """An etcd of the test's own, which it may restart and compact."""
    with tempfile.TemporaryDirectory(prefix="tortie-etcd-") as work, EtcdServer(Path(work), "watch-etcd") as server:
        yield server


def events(items: list[Item]) -> list[tuple[str, bytes, int, bool]]:
    assert all(isinstance(i, WatchEvent) for i in items), items
    return [(i.kv.key, i.kv.value, i.kv.mod_revision, i.deleted) for i in items if isinstance(i, WatchEvent)]


def test_puts_updates_and_deletes_arrive_in_order(etcd_client: EtcdClient, prefix: str) -> None:
    start = etcd_client.put(f"{prefix}other-side", b"x") + 1  # a key outside the prefix's events
    consumer = Consumer(etcd_client, prefix, start)
    try:
        r1 = etcd_client.put(f"{prefix}a", b"1")
        r2 = etcd_client.put(f"{prefix}a", b"2")
        etcd_client.put(f"{prefix[:-1]}-not-under-it", b"no")
        r3 = etcd_client.put(f"{prefix}b", b"3")
        etcd_client.delete(f"{prefix}a")
        got = events(consumer.take(4))
        assert got[:3] == [(f"{prefix}a", b"1", r1, False), (f"{prefix}a", b"2", r2, False),
                           (f"{prefix}b", b"3", r3, False)]
        assert got[3][0] == f"{prefix}a" and got[3][3] is True and got[3][2] > r3
        assert consumer.items.empty()
    finally:
        consumer.stop()
    assert not consumer.thread.is_alive()


def test_a_watch_replays_from_its_start_revision(etcd_client: EtcdClient, prefix: str) -> None:
    revisions = [etcd_client.put(f"{prefix}k{i}", str(i).encode()) for i in range(5)]
    consumer = Consumer(etcd_client, prefix, revisions[2])
    try:
        got = events(consumer.take(3))
        assert [(key, rev) for key, _, rev, _ in got] == [(f"{prefix}k{i}", revisions[i]) for i in (2, 3, 4)]
    finally:
        consumer.stop()


def test_resumes_after_etcd_restarts_without_losing_or_repeating_events(own_etcd: EtcdServer, prefix: str) -> None:
    client = EtcdClient(EtcdConfig.from_env(own_etcd.env()))
    consumer = Consumer(client, prefix, client.put(f"{prefix}first", b"0"))
    try:
        assert events(consumer.take(1))[0][0] == f"{prefix}first"
        own_etcd.restart()
        # Written while the watch is reconnecting, and after: each arrives once, in order.
        written = [client.put(f"{prefix}k{i}", str(i).encode()) for i in range(3)]
        got = events(consumer.take(3))
        assert [(key, rev) for key, _, rev, _ in got] == [(f"{prefix}k{i}", written[i]) for i in range(3)]
        with pytest.raises(queue.Empty):
            consumer.items.get(timeout=0.5)  # nothing delivered twice
    finally:
        consumer.stop()
        client.close()


def test_falling_behind_a_compaction_relists_the_prefix(own_etcd: EtcdServer, prefix: str) -> None:
    client = EtcdClient(EtcdConfig.from_env(own_etcd.env()))
    try:
        start = client.put(f"{prefix}gone", b"old")
        client.delete(f"{prefix}gone")
        kept = client.put(f"{prefix}kept", b"v")
        client.compact(kept)
        consumer = Consumer(client, prefix, start)  # from a revision compacted away
        try:
            (resync,) = consumer.take(1)
            assert isinstance(resync, Resync)
            assert [(kv.key, kv.value) for kv in resync.kvs] == [(f"{prefix}kept", b"v")]
            assert resync.revision >= kept
            # and it keeps watching from the listing on
            later = client.put(f"{prefix}later", b"w")
            assert events(consumer.take(1)) == [(f"{prefix}later", b"w", later, False)]
        finally:
            consumer.stop()
    finally:
        client.close()


def test_cancel_ends_an_iteration_that_waits_for_events(etcd_client: EtcdClient, prefix: str) -> None:
    consumer = Consumer(etcd_client, prefix, etcd_client.put(f"{prefix}one", b"1"))
    consumer.take(1)
    consumer.stop()  # the reader is blocked on the idle stream
    assert not consumer.thread.is_alive()
