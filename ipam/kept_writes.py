"""The keys an attachment's DEL reads, as this process last wrote them: a warm process (felix-agent)
that served a pod's ADD plans its DEL on them instead of reading etcd (one round trip of DEL's two).

Owns keeping, per datastore and key, the value bytes and modification revision of this process's
own writes (an ADD's IPAM handle, from the batch's commit; the pod's endpoint, from its write), or
that the key was absent (compared so in a commit), and making a commit planned on them exactly as
safe as one planned on a fresh read: each kept key is compared by revision AND value bytes
(:func:`compared`), which names one write of one history (a cluster restored from a backup repeats
revision numbers with other contents: ``ipam.kept_snapshot``); an absent key is compared absent.
Anything another writer changed since (a re-ADD, ``netctl ipam release``, gc, an operator, a
restore) then only loses the compare-and-swap, and ``ipam.batch`` plans again on a fresh read.
Must not plan, decide or write (``ipam.batch``); the blocks come from ``ipam.kept_snapshot``.

Bounded and per process: a key is forgotten once a DEL commits on it or any batch planned on it
loses its comparison, and everything at once past :data:`CAPACITY` keys.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from datastore.codec import stored_bytes
from datastore.kv import Delete, KeyValue, Op, Unchanged
from datastore.model import Resource
from datastore.store import ResourceStore

CAPACITY = 4096  # keys: ~4 per pod (handle, legacy handle, endpoint), far more pods than a node runs

# (datastore, key) → (the value bytes this process wrote, or None: compared absent; its revision)
_KEPT: dict[tuple[object, str], tuple[bytes | None, int]] = {}
_GUARD = threading.Lock()


def _where(client: object) -> object:
    # As ``ipam.kept_snapshot``: a client's configuration (endpoints, certificates) names its datastore.
    return getattr(client, "config", None) or id(client)


def remember(client: object, key: str, value: bytes | None, revision: int) -> None:
    """``key`` holds ``value`` written at ``revision`` by this process (None: it was compared absent
    in a transaction that succeeded at ``revision``)."""
    with _GUARD:
        if len(_KEPT) >= CAPACITY:
            _KEPT.clear()
        _KEPT[(_where(client), key)] = (value, revision)


def remember_resource(store: ResourceStore, resource: Resource) -> None:
    """``resource`` as ``store`` just wrote it (its ``resourceVersion`` is the write's revision): the
    pod's endpoint, which its DEL deletes in the IPAM's transaction."""
    key = store.key(resource.kind, resource.name, resource.namespace)
    remember(store.client, key, stored_bytes(resource), int(resource.metadata.resource_version))


def forget(client: object, keys: Iterable[str]) -> None:
    where = _where(client)
    with _GUARD:
        for key in keys:
            _KEPT.pop((where, key), None)


def known(client: object, keys: Sequence[str]) -> dict[str, KeyValue] | None:
    """The kept values of ``keys`` (only those kept as present), or None unless every key is kept."""
    where = _where(client)
    out: dict[str, KeyValue] = {}
    with _GUARD:
        for key in keys:
            kept = _KEPT.get((where, key))
            if kept is None:
                return None
            value, revision = kept
            if value is not None:
                out[key] = KeyValue(key, value, revision, 0, 0)
    return out


def compared(ops: Sequence[Op], values: dict[str, KeyValue]) -> list[Op]:
    """``ops`` with each deletion and comparison of a kept key also comparing its kept bytes; any
    other op on a kept key is left as it is (a block's own bytes come with its update)."""
    out: list[Op] = []
    for op in ops:
        kv = values.get(op.key)
        if kv is not None and isinstance(op, Delete | Unchanged) and op.mod_revision == kv.mod_revision:
            op = type(op)(op.key, op.mod_revision, kv.value)
        out.append(op)
    return out
