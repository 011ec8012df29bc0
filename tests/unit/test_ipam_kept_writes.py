"""What a process keeps of its own writes for a DEL planned without a read (``ipam.kept_writes``,
and ``ipam.batch``'s use of it): what is known, what a commit compares, what is forgotten."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from datastore.kv import Create, Delete, KeyValue, NothingNewer, Unchanged, Update
from ipam import batch, batch_release, kept_writes
from ipam.handles import Handle


@dataclass(frozen=True)
class _Client:
    config: str


A, B = _Client("cluster-a"), _Client("cluster-b")


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    saved, kept_writes._KEPT = kept_writes._KEPT, {}
    yield
    kept_writes._KEPT = saved


def test_only_keys_every_one_of_which_is_kept_are_known() -> None:
    kept_writes.remember(A, "/h/own", b"handle", 7)
    kept_writes.remember(A, "/h/legacy", None, 7)
    assert kept_writes.known(A, ["/h/own", "/h/legacy"]) == {"/h/own": KeyValue("/h/own", b"handle", 7, 0, 0)}
    assert kept_writes.known(A, ["/h/own", "/h/legacy", "/endpoint"]) is None  # one not kept: read
    assert kept_writes.known(A, []) == {}


def test_another_datastore_never_sees_them() -> None:
    kept_writes.remember(A, "/h/own", b"handle", 7)
    assert kept_writes.known(B, ["/h/own"]) is None
    assert kept_writes.known(_Client("cluster-a"), ["/h/own"]) is not None  # the same cluster, another connection


def test_forgotten_keys_and_the_cap() -> None:
    kept_writes.remember(A, "/h/own", b"handle", 7)
    kept_writes.forget(A, ["/h/own", "/never"])
    assert kept_writes.known(A, ["/h/own"]) is None
    for i in range(kept_writes.CAPACITY + 10):
        kept_writes.remember(A, f"/k/{i}", b"v", i + 1)
    assert len(kept_writes._KEPT) <= kept_writes.CAPACITY


def test_a_commit_compares_each_kept_key_by_revision_and_bytes() -> None:
    known = {"/h/own": KeyValue("/h/own", b"handle", 7, 0, 0), "/ep": KeyValue("/ep", b"endpoint", 9, 0, 0)}
    ops = [Update("/block", b"new", 5, b"old"), Delete("/h/own", 7), Unchanged("/ep", 9), Unchanged("/h/legacy", 0),
           Delete("/other", 3)]
    assert kept_writes.compared(ops, known) == [
        Update("/block", b"new", 5, b"old"), Delete("/h/own", 7, b"handle"), Unchanged("/ep", 9, b"endpoint"),
        Unchanged("/h/legacy", 0), Delete("/other", 3)]
    # a key the plan read at another revision than kept is not given the kept bytes
    assert kept_writes.compared([Delete("/h/own", 8)], known) == [Delete("/h/own", 8)]


def _release(handles: dict[str, KeyValue], released: int) -> tuple[batch.ReleaseJob, dict[str, KeyValue]]:
    job = batch.ReleaseJob("net", "c1", "eth0")
    job.released = [object()] * released  # type: ignore[list-item]
    return job, handles


def test_a_release_on_kept_values_is_whole_only_when_it_frees_what_its_handles_count() -> None:
    from datastore import keys

    own = keys.handle_key("net.c1.eth0")
    record = Handle({"10.244.0.0/26": 1, "10.244.1.0/26": 1}, "n", {"network": "net", "containerID": "c1",
                                                                   "ifname": "eth0"}).to_json()
    values = {own: KeyValue(own, record, 7, 0, 0)}
    assert batch_release.whole(*_release(values, 2))
    assert not batch_release.whole(*_release(values, 1))  # a kept block without the handle's address: read again


def test_a_commit_keeps_an_assignments_handle_and_absent_keys_and_forgets_a_releases() -> None:
    from ipam.allocator import AssignRequest

    assign = batch.AssignJob(AssignRequest("net.c1.eth0", "n", legacy_handle="net.c1"))
    own, legacy = assign.wanted()
    release = batch.ReleaseJob("net", "c2", "eth0", also_read=["/ep/c2"])
    for key in release.wanted():
        kept_writes.remember(A, key, b"x", 3)
    ops = [Update("/block", b"b", 4), Create(own, b"record"), Unchanged(legacy, 0), NothingNewer("/pools/", 3),
           *(Delete(k, 3) for k in release.wanted())]
    batch._keep_writes(A, [assign, release], ops, 11)
    assert kept_writes.known(A, [own, legacy]) == {own: KeyValue(own, b"record", 11, 0, 0)}
    assert all(kept_writes.known(A, [k]) is None for k in release.wanted())
