"""Coalescing one node's concurrent IPAM writes into one compare-and-swap.

Owns the queue of a node's waiting assignments and attachment releases in this process and
running them as batches: the first caller to get the node's turn (:func:`node_lock`) takes
every job waiting with it, reads once (the jobs' handles and keys, the node's blocks, the pools),
plans each job on the blocks as the jobs before it left them, and commits all of them in ONE
transaction conditioned on every revision read. The others wait for their turn and find their
job done. Callers of one node used to take turns with a round trip or two each, and a DEL racing
an ADD on the node's one block lost its compare-and-swap and backed off.

The read is serializable (no ReadIndex: on a follower, one round trip to the leader less), and a
batch of assignments alone does not read at all when this process kept the node's last snapshot
(``ipam.kept_snapshot``): a warm agent's ADD then costs IPAM one round trip, its commit. Nor does a
release of an attachment whose keys this process wrote itself (its ADD's handle, its endpoint:
``ipam.kept_writes``): a warm agent's DEL is one round trip too. All of these may be stale; the
commit compares everything the plan used, so staleness only loses the compare-and-swap, and what
is decided without a commit is decided on a linearizable read (see :func:`_once`).

Each job is planned as alone (``IPAM.plan``, ``Releaser``'s planning of an attachment): the same
addresses, reservations and handle records as one at a time. A job that fails (a pool exhausted,
an address in use) fails alone and writes nothing; a lost comparison re-plans the whole batch; a
job sharing a key with an earlier job of the batch (the same attachment twice) waits for the
next batch (a release's plan: ``ipam.batch_release``). Must not decide which addresses to take
(``ipam.allocator``) nor touch the kernel.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from datastore import keys
from datastore.errors import Conflict, TransactionTooLarge
from datastore.kv import Create, KeyValue, NothingNewer, Op, Unchanged, Update
from ipam import claim_listeners, kept_snapshot, kept_writes
from ipam.batch_release import blocks_of_releases, plan_release, whole
from ipam.block import Address, Block, Network, remember_block
from ipam.errors import IPAMError, TooManyConflicts
from ipam.handles import attachment_keys
from ipam.release import BLOCK_HINTS

# The allocator's IPAM (it imports this module: typed loosely here, so no import circle).
IPAM = Any


Exclusive = Callable[[], AbstractContextManager[object]]


@dataclass(eq=False)
class _Job:
    done: bool = field(default=False, init=False)
    error: BaseException | None = field(default=None, init=False)
    # Entered around the batch that runs the job (the CNI plugins' host-wide lock file).
    exclusive: Exclusive | None = field(default=None, init=False)

    def wanted(self) -> list[str]:
        raise NotImplementedError

    def fail(self, error: BaseException) -> None:
        self.error, self.done = error, True


@dataclass(eq=False)
class AssignJob(_Job):
    req: Any  # ipam.allocator.AssignRequest
    assigned: list[Any] = field(default_factory=list, init=False)  # ipam.allocator.Assigned

    def wanted(self) -> list[str]:
        legacy = [keys.handle_key(self.req.legacy_handle)] if self.req.legacy_handle else []
        return [keys.handle_key(self.req.handle), *legacy]


@dataclass(eq=False)
class ReleaseJob(_Job):
    network: str
    container_id: str
    ifname: str
    also_read: Sequence[str] = ()
    also_write: Callable[[Mapping[str, KeyValue]], Sequence[Op]] | None = None
    handles: list[str] = field(default_factory=list, init=False)
    released: list[Address] = field(default_factory=list, init=False)

    def wanted(self) -> list[str]:
        return [*attachment_keys(self.network, self.container_id, self.ifname), *self.also_read]


class _Queue:
    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.jobs: list[_Job] = []


_QUEUES: dict[str, _Queue] = {}
_QUEUES_GUARD = threading.Lock()

# node → the lock whose holder runs the node's next batch of assignments and releases in this
# process (``ipam.batch``). Callers of one node all start from the node's own blocks: run together
# they pick the same free address and all but one lose the compare-and-swap, re-read and back off
# (measured: 2.2 lost CAS per assignment at 8 threads per node); a release racing them loses its
# CAS on the same block. Batched, they commit together at the first try. Other processes of the
# node are kept out by the CNI plugins' host-wide lock file (``cni_plugins.ipam_ops``), as Calico does.
_NODE_LOCKS: dict[str, threading.RLock] = {}
_NODE_LOCKS_GUARD = threading.Lock()


def node_lock(node: str) -> threading.RLock:
    """The in-process lock that serialises ``node``'s batches (re-entrant: the batch's leader holds
    it while the CNI plugins' host-wide lock file takes it again)."""
    with _NODE_LOCKS_GUARD:
        lock = _NODE_LOCKS.get(node)
        if lock is None:
            lock = _NODE_LOCKS[node] = threading.RLock()
        return lock


def submit(ipam: IPAM, node: str, job: _Job, exclusive: Exclusive | None = None) -> None:
    """Run ``job`` with whatever else of ``node`` is waiting; raises the job's own error.
    ``exclusive`` is entered around the batch (any job's, when several bring one)."""
    job.exclusive = exclusive
    with _QUEUES_GUARD:
        queue = _QUEUES.setdefault(node, _Queue())
    with queue.guard:
        queue.jobs.append(job)
    with node_lock(node):
        if not job.done:
            with queue.guard:
                batch, queue.jobs = queue.jobs, []
            if job not in batch:  # taken by a leader that failed before running it
                batch.append(job)
            lock = next((j.exclusive for j in batch if j.exclusive is not None), None)
            try:
                with lock() if lock is not None else contextlib.nullcontext():
                    _run(ipam, node, batch)
            except BaseException as e:
                for each in batch:
                    if not each.done:
                        each.fail(e)
                raise
    if job.error is not None:
        raise job.error


# The most jobs one transaction carries: each writes or compares up to ~5 keys (its handles, its
# caller's key, blocks), and etcd takes at most 128 operations in one transaction (--max-txn-ops).
# A release planned on kept values compares twice as much (revision and bytes): a batch that comes
# to more than etcd takes runs again halved (``_run``).
MAX_JOBS = 24

# What one plan-and-commit of a batch came to.
_DONE, _LOST, _DOUBTFUL = "done", "lost", "doubtful"


def _run(ipam: IPAM, node: str, jobs: list[_Job]) -> None:
    pending = list(jobs)
    attempt = 0
    # The first plan starts from a serializable read when the IPAM allows it; any plan after one
    # that lost its compare-and-swap, claimed a block or could not trust its read is linearizable.
    fresh = not ipam.serializable_snapshot
    listing: set[int] = set()  # the IP versions a plan wanted a new block of: listed by the next fresh read
    cap = MAX_JOBS
    while pending:
        # Jobs sharing a key (the same attachment twice) go in different batches, in order.
        batch: list[_Job] = []
        taken: set[str] = set()
        for job in pending:
            wanted = set(job.wanted())
            if not wanted & taken and len(batch) < cap:
                batch.append(job)
            taken |= wanted
        try:
            outcome = _once(ipam, node, batch, fresh, listing)
        except TransactionTooLarge:
            # More comparisons than etcd takes at once (releases planned on kept values compare
            # bytes too, and their blocks add up): the same jobs in smaller batches, down to one.
            if len(batch) <= 1:
                raise
            cap = len(batch) // 2
            pending = [j for j in pending if not j.done]
            continue
        pending = [j for j in pending if not j.done]  # a repeated ADD handed back its addresses
        if outcome == _DONE:
            continue
        fresh = True
        if outcome == _DOUBTFUL:
            continue  # nothing was lost: read again at once, from the leader
        attempt += 1
        if attempt >= ipam.max_retries:
            for job in batch:
                job.fail(TooManyConflicts(f"gave up after {ipam.max_retries} conflicts"))
            pending = [j for j in pending if not j.done]
            continue
        ipam._backoff(attempt)


def _once(ipam: IPAM, node: str, batch: list[_Job], fresh: bool, listing: set[int]) -> str:
    """Plan and commit ``batch``: _DONE when every job of it is done, _LOST to plan again (a lost
    compare-and-swap, or blocks claimed), _DOUBTFUL to plan again from a linearizable read.
    ``listing``: the IP versions whose blocks a fresh read lists; a plan that wants a new block
    adds its version, so that the next read lists them.

    A plan on a serializable snapshot (``fresh`` False: etcd's member answered from its own state,
    which on a follower may lag the leader) is as safe as one on a linearizable snapshot because
    of what the commit compares: every block it writes at the revision read, each handle it creates
    as absent, and every key the jobs read (their handles, their callers' keys) at the revision read
    or as absent (:func:`_read_unchanged`). A stale read then only loses the compare-and-swap.
    What would not be compared is not decided on it: a job that fails (a pool exhausted, an
    address in use), a block claim, and a batch that would write nothing are _DOUBTFUL and planned
    again on a linearizable read; addresses a repeated ADD gets back are read afresh
    (``IPAM.handed_back``).

    A block the node must claim (decided on a linearizable read) is created in the same
    transaction as the addresses assigned from it (planned on it as if it existed, empty), with the
    node's affinity: one write of the block instead of two, so every agent's watch wakes once for a
    claim, not twice (the BGP mesh's other nodes spend ~0.3 CPU ms per wake-up while the new route
    spreads). Another process creating it first makes the transaction fail and the batch plan
    again, as any conflict. A claim costs no read besides the fresh snapshot's: the requested
    addresses' blocks, the blocks of a version (``listing``) and the node's affinities come in it.
    A stale plan does not read them: its claim only says that a fresh read is needed."""
    kept = None
    # ---- DEL without its read: the releases' keys as this process wrote them (ipam.kept_writes)
    known = None if fresh else _kept_values(ipam, batch)
    if known is not None:
        kept = kept_snapshot.take(ipam.client, node)  # planned on without a read (see its module)
    if kept is not None and known:
        kept = replace(kept, also=known)
    known = known if kept is not None else None
    # ----
    addresses = [a for j in batch if isinstance(j, AssignJob) for a in j.req.addresses]
    snap = kept or ipam.snapshot(node, [k for job in batch for k in job.wanted()], serializable=not fresh,
                                 addresses=addresses, listing=listing if fresh else ())
    releases = [j for j in batch if isinstance(j, ReleaseJob)]
    extra = blocks_of_releases(ipam.client, snap.blocks, snap.also, releases)
    claimed: dict[Network, Op] = {}  # blocks this transaction creates → the op of their affinity
    while True:
        changed, ops, planned, failed, claims = _plan(ipam, snap, batch, extra)
        # (a specific address's block is read by itself: an automatic claim needs the listing)
        listing |= {cidr.version for cidr, _ in claims if not any(a in cidr for a in addresses)}
        if not claims or not fresh:
            break
        if any(owner != node or cidr in claimed for cidr, owner in claims):
            for job, error in failed:
                job.fail(error)
            ipam.claim(claims)  # a block nobody may own (the node's maximum): alone, as it was
            return _LOST
        for cidr, _ in claims:
            claimed[cidr] = ipam.affinity_op(cidr, node, snap)
            snap.blocks[cidr] = (Block.empty(cidr, node), 0)
    written = [(cidr, block, block.to_json(), rev) for cidr, (block, rev) in changed.items()]
    ops = [Create(keys.block_key(cidr), value) if cidr in claimed
           else Update(keys.block_key(cidr), value, rev, _expected(kept, cidr, rev))
           for cidr, _, value, rev in written] + ops
    for cidr, affinity in claimed.items():
        if cidr not in changed:  # claimed, then left empty (its job failed): created all the same
            block = Block.empty(cidr, node)
            written.append((cidr, block, block.to_json(), 0))
            ops.insert(0, Create(keys.block_key(cidr), block.to_json()))
        ops.append(affinity)
    if not fresh and (failed or claims or not ops):
        return _DOUBTFUL
    if known and not all(whole(j, known) for j in planned if isinstance(j, ReleaseJob)):
        return _DOUBTFUL  # a kept block that does not hold what a kept handle counts: read afresh
    for job, error in failed:
        job.fail(error)
    proven = None
    # The prefixes compared since what the commit proves of etcd's history; a batch of releases
    # alone depends on nothing but the keys and blocks it writes (as on a fresh read).
    if kept is not None and any(isinstance(j, AssignJob) for j in planned):
        proven = kept_snapshot.proven_revision(kept, [(cidr, rev) for cidr, _, _, rev in written])
        if not kept_snapshot.provable(kept, proven):
            return _DOUBTFUL
        ops += kept_snapshot.unchanged_since(kept, node, proven)
    if any(isinstance(j, AssignJob) for j in planned):
        ops += ipam.reservations_unchanged(snap, proven)
        if kept is None:  # (a kept snapshot's commit compares them all: unchanged_since)
            ops += _settings_unchanged(snap, node)
    if claimed and ipam.serializable_snapshot:  # so that the snapshot kept stands as read after the claim
        ops += kept_snapshot.unchanged_until(snap, node)
    revision = 0
    if ops:
        ops += _read_unchanged(planned, snap.also, ops)
        if known:
            ops = kept_writes.compared(ops, known)
        sent = time.monotonic()
        try:
            revision = ipam.client.commit(ops)
        except Conflict:
            kept_writes.forget(ipam.client, [k for j in batch if isinstance(j, ReleaseJob) for k in j.wanted()])
            # Against a kept snapshot, most likely a change it had not seen: read it at once.
            return _DOUBTFUL if kept is not None else _LOST
        returned = time.monotonic()
        for cidr, block, value, _ in written:  # the next snapshot reads them back: no decoding then
            remember_block(keys.block_key(cidr), revision, value, block)
        if claimed:  # the next snapshot of the node reads them in its one round trip
            BLOCK_HINTS[node] = BLOCK_HINTS.get(node, frozenset()) | {keys.block_key(c) for c in claimed}
        if claimed and claim_listeners.wanted(node):  # this node's agent takes its claim in now
            claim_listeners.committed(claim_listeners.Claimed(node, [
                *((keys.block_key(cidr), value) for cidr, _, value, _ in written if cidr in claimed),
                *((op.key, op.value) for op in claimed.values() if isinstance(op, Create | Update))],
                revision, sent, returned))
    if ipam.serializable_snapshot:
        kept_snapshot.keep(ipam.client, node, snap, {c: (b, v) for c, b, v, _ in written}, revision,
                           [op.key for op in claimed.values()])
        _keep_writes(ipam.client, planned, ops, revision)
    for job in planned:
        job.done = True
    return _DONE


def _kept_values(ipam: IPAM, batch: list[_Job]) -> dict[str, KeyValue] | None:
    """What the batch's releases would read, as this process wrote it ({} for none), or None when
    any of it is not kept (``ipam.kept_writes``): then the batch reads."""
    return kept_writes.known(ipam.client, [k for j in batch if isinstance(j, ReleaseJob) for k in j.wanted()])


def _keep_writes(client: Any, planned: Sequence[_Job], ops: Sequence[Op], revision: int) -> None:
    """After a commit at ``revision``: an assignment's handle as written and its other keys as
    compared absent are kept for its DEL; a release's keys are forgotten (``ipam.kept_writes``)."""
    by_key = {op.key: op for op in ops if not isinstance(op, NothingNewer)}
    for job in planned:
        if isinstance(job, ReleaseJob) or not revision:
            kept_writes.forget(client, job.wanted())
            continue
        for key in job.wanted():
            op = by_key.get(key)
            if isinstance(op, Create | Update):
                kept_writes.remember(client, key, op.value, revision)
            elif isinstance(op, Unchanged) and not op.mod_revision:
                kept_writes.remember(client, key, None, revision)
            else:
                kept_writes.forget(client, [key])


def _plan(ipam: IPAM, snap: Any, batch: list[_Job], extra: Mapping[Network, tuple[Block, int]],
          ) -> tuple[dict[Network, tuple[Block, int]], list[Op], list[_Job], list[tuple[_Job, BaseException]],
                     list[tuple[Network, str | None]]]:
    """Each job of ``batch`` planned on ``snap`` after the ones before it: the blocks they change,
    the other ops (handles, releases), the jobs planned, the jobs that failed, and the blocks wanted
    (then nothing is written: the caller claims them and plans again)."""
    changed: dict[Network, tuple[Block, int]] = {}
    ops: list[Op] = []
    planned: list[_Job] = []
    failed: list[tuple[_Job, BaseException]] = []
    claims: list[tuple[Network, str | None]] = []
    for job in batch:
        if job.done:  # handed its addresses back when planned before a claim
            continue
        if isinstance(job, ReleaseJob):
            ops += plan_release(job, snap.also, snap.blocks, extra, changed)
            planned.append(job)
            continue
        assert isinstance(job, AssignJob)
        req = job.req
        own = replace(snap, handle=snap.also.get(keys.handle_key(req.handle)),
                      legacy=snap.also.get(keys.handle_key(req.legacy_handle)) if req.legacy_handle else None)
        try:
            back = ipam.handed_back(req, own)
            if back:
                job.assigned, job.done = back, True
                continue
            mine = dict(changed)
            wanted: list[tuple[Network, str | None]] = []
            results = ipam.plan(req, own, mine, wanted)
        except IPAMError as e:
            failed.append((job, e))
            continue
        if wanted:
            claims += wanted
            continue
        changed = mine
        job.assigned = results
        ops.append(ipam.handle_op(req, own, results))
        planned.append(job)
    return changed, ops, planned, failed, claims


def _settings_unchanged(snap: Any, node: str) -> list[Op]:
    """The pools, the node and the IPAM configuration a plan on a fresh read used, as read: a pool
    deleted or disabled (or maxBlocksPerHost lowered) between the read and the commit is not
    assigned from (a block claimed for it, created in the same transaction, would be left in no
    pool with an address in it). The affinities are compared where they are written."""
    affinities = keys.affinity_prefix(node)
    return [Unchanged(k, rev) for k, rev in sorted(snap.depends.items()) if not k.startswith(affinities)]


def _expected(kept: Any, cidr: Network, rev: int) -> bytes | None:
    """The stored bytes a block written from a kept snapshot must still hold (None: compare the
    revision, for a block read afresh: borrowed, or named by a specific address)."""
    if kept is None or kept.blocks.get(cidr, (None, 0))[1] != rev:
        return None
    stored: bytes | None = kept.stored.get(cidr)
    return stored


def _read_unchanged(planned: Sequence[_Job], values: Mapping[str, KeyValue], ops: Sequence[Op]) -> list[Op]:
    """Comparisons of the keys the planned jobs read that no write of ``ops`` compares already: a
    release that found no handle, or an endpoint of another container, decided on them."""
    compared = {op.key for op in ops if not isinstance(op, NothingNewer)}
    out: list[Op] = []
    for job in planned:
        for key in job.wanted():
            if key not in compared:
                compared.add(key)
                kv = values.get(key)
                out.append(Unchanged(key, kv.mod_revision if kv is not None else 0))
    return out
