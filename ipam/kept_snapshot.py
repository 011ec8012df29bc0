"""The node's last IPAM snapshot, kept by the process that planned on it: a warm process (felix-agent)
plans its next assignments on it instead of reading etcd again (one round trip of ADD's three).

Owns keeping one snapshot per (datastore, node), bringing its blocks up to date with this process's
own commits, and the comparisons that make a commit planned on it exactly as safe as one planned
on a fresh read: every input of the plan is compared in the commit's transaction, so anything
another writer changed since only loses the compare-and-swap, and the batch then plans again on
a linearizable read (``ipam.batch``). Must not plan, decide or write (``ipam.allocator``,
``ipam.batch``).

What a plan on a snapshot uses, and what the commit compares for it:
- the blocks it writes: their revision and their stored bytes (``Update.expected``): a cluster
  restored from a backup repeats revision numbers with other contents, and the pair names one
  write of one history (:func:`proven_revision`);
- the handles it creates: absent (``Create``); the requests' other keys (a legacy handle): as
  read, or absent (``ipam.batch._read_unchanged``);
- the pools, the node's affinities, the node and the IPAM configuration: each key at the revision
  read or absent (``Unchanged``: a deleted key fails it), and nothing new under the pools', the
  affinities' and the reservations' prefixes since the snapshot's revision (``NothingNewer``:
  a key created since fails it; it does not see deletions, which the per-key comparisons do;
  a reservation deleted since only leaves an address unused). "Since" is the snapshot's revision
  only as far as the commit proves the cluster has not gone back past it (a restore):
  :func:`proven_revision`.
Blocks the plan reads but does not write (full ones) change nothing that is written: a stale one
can only make the plan claim or borrow, or fail, and those are re-planned on a fresh read.
A snapshot kept after a claim's commit stands as read at that commit (with the claim's block and
affinity): the claim also compared that nothing was new under those prefixes (:func:`unchanged_until`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from datastore import keys
from datastore.kv import NothingNewer, Op, Unchanged
from datastore.resources import IPPool, IPReservation
from ipam.block import Block, Network

# The allocator's snapshot (``ipam.allocator._Snapshot``: it imports this module's user, ``ipam.batch``).
Snapshot = Any

_POOLS = keys.resource_prefix(IPPool.PLURAL)
_RESERVATIONS = keys.resource_prefix(IPReservation.PLURAL)
_KEPT: dict[tuple[object, str], Snapshot] = {}
_GUARD = threading.Lock()


def _where(client: object, node: str) -> tuple[object, str]:
    # The datastore a client talks to: its configuration (endpoints and certificates; a test's labs
    # differ in both), else the client itself. A snapshot of one cluster never serves another.
    return getattr(client, "config", None) or id(client), node


def take(client: object, node: str) -> Snapshot | None:
    """The snapshot kept for ``node`` of ``client``'s datastore (taken away: a batch that commits
    on it puts it back brought up to date), or None."""
    with _GUARD:
        return _KEPT.pop(_where(client, node), None)


def keep(client: object, node: str, snap: Snapshot, written: dict[Network, tuple[Block, bytes]], revision: int,
         affinities: Sequence[str] = ()) -> None:
    """Keep ``snap`` with the blocks this process just wrote at ``revision`` (block, stored bytes).
    ``affinities``: the affinity keys that commit wrote claiming blocks, with :func:`unchanged_until`'s
    comparisons: the snapshot then stands as read at ``revision``."""
    blocks = dict(snap.blocks)
    stored = dict(snap.stored)
    for cidr, (block, value) in written.items():
        if cidr in blocks:  # another node's block an address was borrowed from is not the node's
            blocks[cidr], stored[cidr] = (block, revision), value
    kept = replace(snap, handle=None, legacy=None, also={}, blocks=blocks, stored=stored, fresh=False, listed={},
                   named={})
    if affinities:
        kept = replace(kept, revision=revision, depends={**snap.depends, **dict.fromkeys(affinities, revision)})
    with _GUARD:
        if len(_KEPT) > 1024:
            _KEPT.clear()
        _KEPT[_where(client, node)] = kept


def unchanged_until(snap: Snapshot, node: str) -> list[Op]:
    """What a commit planned on a fresh ``snap`` that claims blocks also compares, so that the
    snapshot kept after it stands as read at the commit's revision (:func:`keep`): nothing new
    under the pools', the node's affinities' and the reservations' prefixes since ``snap`` was read.
    Kept at its read's revision instead, the node's next assignment on it would lose its
    comparison of the affinities' prefix to the claim's own affinity, and read again."""
    return [NothingNewer(prefix, int(snap.revision)) for prefix in (_POOLS, keys.affinity_prefix(node), _RESERVATIONS)]


def forget_datastore(client: object) -> None:
    """This process wrote blocks outside the batches (a release by handle or address): the kept
    snapshots of that datastore would only lose their next compare-and-swap."""
    where = _where(client, "")[0]
    with _GUARD:
        for key in [k for k in _KEPT if k[0] == where]:
            del _KEPT[key]


def proven_revision(snap: Snapshot, written: list[tuple[Network, int]]) -> int:
    """The revision up to which a commit writing ``written`` (kept blocks, at their kept
    revisions) proves etcd's history is the one ``snap`` was read from: the prefix comparisons'.

    A cluster restored from a backup repeats revision numbers: a reservation written after the
    restore may carry a revision the snapshot already had, and "nothing newer than the snapshot's
    revision" would not see it. Each kept block is compared by revision AND bytes, which names one
    write of one history: the cluster has its history at least up to the newest of them (a restore
    from an older backup fails that comparison). Beyond the snapshot's revision nothing is needed;
    a commit that writes no kept block proves nothing (0: any pool there fails it, and the batch
    plans again on a fresh read)."""
    newest = max((rev for cidr, rev in written if snap.blocks.get(cidr, (None, -1))[1] == rev), default=0)
    return min(int(snap.revision), newest)


def provable(snap: Snapshot, proven: int) -> bool:
    """Whether every key the plan depends on was last written at or before ``proven``: a key
    written later, compared at its revision, might match a different write of a restored cluster
    at the same revision number. Else the batch plans again on a fresh read (rare: only after a
    batch that wrote none of the node's blocks)."""
    return all(rev <= proven for rev in snap.depends.values())


def unchanged_since(snap: Snapshot, node: str, proven: int) -> list[Op]:
    """The comparisons of everything a plan on ``snap`` used besides the blocks and handles it
    writes; ``proven``: :func:`proven_revision`."""
    ops: list[Op] = [Unchanged(key, rev) for key, rev in sorted(snap.depends.items())]
    ops += [NothingNewer(prefix, proven) for prefix in (_POOLS, keys.affinity_prefix(node))]
    return ops
