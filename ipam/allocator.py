"""Assigning addresses: Calico's algorithm, on etcd compare-and-swap.

Owns :class:`IPAM`, the IPAM client the CNI plugins, the agent and ``netctl`` hold: assignment
(own blocks, claim, borrow; specific addresses; the per-node block cap) and the reads it needs. It
must not touch the kernel; releasing lives in ``ipam.release`` (:class:`IPAM` extends its
:class:`~ipam.release.Releaser`, so one client does both), consistency checks in ``ipam.check``.

An assignment reads a snapshot (the handle, the pools, this node's affine blocks; or plans on the
one this process kept, ``ipam.kept_snapshot``), plans which
addresses to take, and commits every touched block together with the handle in ONE etcd
transaction conditioned on the revisions it read (with the node's other assignments and releases
waiting at the same time: ``ipam.batch``). Losing that race means someone else changed a
block first: re-read and re-plan. Because the handle is written in the same transaction, a retry
after an ambiguous failure finds its own earlier success instead of allocating twice.

Reserved addresses (``IPReservation``) are read in the same snapshot as the blocks, passed over
by automatic assignment and borrowing, and refused to a specific-address request; the commit is
conditioned on no reservation having been written since the snapshot, so one applied concurrently
is never slipped past (the assignment re-reads and plans again).

Order of preference (Calico's): this node's affine blocks; then claim a free block for the node
(one transaction creates the block and its affinity together, so no half-claimed state can be left
by a crash); then, unless the pool has ``strictAffinity``, borrow from another node's block.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from datastore import keys
from datastore.codec import from_stored
from datastore.errors import Conflict
from datastore.kv import KV, Create, KeyValue, NothingNewer, Op, Update
from datastore.resources import IPAMConfiguration, IPPool, IPReservation, Node
from datastore.store import ResourceStore
from ipam.block import Address, Block, Network, decoded_block
from ipam.errors import AddressInUse, AddressNotInPool, AddressReserved, PoolExhausted
from ipam.handles import Handle, belongs_to
from ipam.pools import Pool, pool_for_address, select_pools
from ipam.release import BLOCK_HINTS, Releaser
from ipam.reservations import Reservations

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOCKS_PER_HOST = 20

_POOLS = keys.resource_prefix(IPPool.PLURAL)
_RESERVATIONS = keys.resource_prefix(IPReservation.PLURAL)


@dataclass(frozen=True)
class AssignRequest:
    handle: str
    node: str
    num_v4: int = 1
    num_v6: int = 0
    pools_v4: Sequence[str] = ()
    pools_v6: Sequence[str] = ()
    addresses: Sequence[Address] = ()  # specific addresses; they replace automatic ones of their family
    attrs: Mapping[str, str] = field(default_factory=dict)
    # The name an ADD of the same attachment used before handles named the interface: a repeated
    # ADD of such an attachment gets its addresses back instead of a second set.
    legacy_handle: str = ""


@dataclass(frozen=True)
class Assigned:
    address: Address
    block: Network
    pool: str
    borrowed: bool = False
    pool_prefix: int = 0  # the prefix length of the pool's CIDR (what an on-link subnet would be)
    reused: bool = False  # the handle held it before this request (a repeated ADD)


@dataclass
class _Snapshot:
    handle: KeyValue | None
    legacy: KeyValue | None
    pools: list[Pool]
    node_labels: dict[str, str]
    max_blocks: int
    blocks: dict[Network, tuple[Block, int]]  # block → (content, mod revision); affine or fetched
    reservations: Reservations = Reservations()
    revision: int = 0  # the revision the reservations were read at (the commit's condition)
    also: dict[str, KeyValue] = field(default_factory=dict)  # the ``also_read`` keys that exist (handles)
    # What a plan on this snapshot depends on beyond the blocks it writes, for a commit planned on
    # it once it is no longer fresh (``ipam.kept_snapshot``): the node, the IPAM configuration,
    # each pool and affinity key → its modification revision (0: absent); each block's stored bytes.
    depends: dict[str, int] = field(default_factory=dict)
    stored: dict[Network, bytes] = field(default_factory=dict)
    # Read linearizably: a claim may be decided on it (``ipam.batch``); else it only tells that one is needed.
    fresh: bool = False
    # Read with it when asked: each IP version's block CIDRs (keys only), and the blocks of the
    # requested specific addresses by key (None: absent).
    listed: dict[int, set[Network]] = field(default_factory=dict)
    named: dict[str, KeyValue | None] = field(default_factory=dict)


def _same_attachment(held: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return belongs_to(held, wanted.get("network", ""), wanted.get("containerID", ""), wanted.get("ifname", ""))


def _within(cidr: Network, pool: Pool) -> bool:
    return cidr.version == pool.version and cidr.subnet_of(pool.cidr)  # type: ignore[arg-type]


def _order(node: str, n: int) -> int:
    return zlib.crc32(node.encode()) % n if n else 0


# pool key → (stored bytes, the pool decoded): every assignment reads the pools, which rarely
# change. Keyed by content, not revision: one process may talk to several etcd clusters (tests).
_POOL_CACHE: dict[str, tuple[bytes, Pool]] = {}


def _pool(kv: KeyValue) -> Pool:
    cached = _POOL_CACHE.get(kv.key)
    if cached is not None and cached[0] == kv.value:
        return cached[1]
    if len(_POOL_CACHE) > 1024:
        _POOL_CACHE.clear()
    pool = Pool.from_resource(from_stored(kv.value, kv.mod_revision, kv.key))
    _POOL_CACHE[kv.key] = (kv.value, pool)
    return pool


class IPAM(Releaser):
    def __init__(self, client: KV, *, max_retries: int = 100,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 serializable_snapshot: bool = True) -> None:
        super().__init__(client, max_retries=max_retries, sleep=sleep)
        self.resources = ResourceStore(client)
        self.clock = clock
        # A batch's first snapshot is a serializable read (``ipam.batch`` says why that is safe);
        # False: every snapshot is linearizable (the benchmark's comparison).
        self.serializable_snapshot = serializable_snapshot

    # ---- reading -----------------------------------------------------------------------------
    def pools(self) -> list[Pool]:
        return [Pool.from_resource(r) for r in self.resources.list(IPPool)]

    def node_labels(self, node: str) -> dict[str, str]:
        resource = self.resources.get(Node, node)
        return dict(resource.metadata.labels) if resource else {}

    def handles(self) -> dict[str, Handle]:
        kvs, _ = self.client.list(keys.HANDLES)
        return {kv.key[len(keys.HANDLES):]: Handle.from_json(kv.value) for kv in kvs}

    def snapshot(self, node: str, also_read: Sequence[str] = (), *, serializable: bool = False,
                 addresses: Sequence[Address] = (), listing: Collection[int] = ()) -> _Snapshot:
        """One round trip in the usual case: the ``also_read`` keys (the handles of the requests
        being planned, their callers' keys), the IPAM configuration, the node, the pools, the
        node's affinities and the blocks it was last seen to hold, at one revision. A block the
        hint missed (claimed since, or by another process) costs a second read.

        In the same round trip, for a plan that may claim a block without another read: the blocks
        of the specific ``addresses`` (in the pools this process has seen: a guess, which the plan
        checks against the pools read) and the keys of every block of the IP versions in ``listing``.

        ``serializable``: etcd answers from the member's own state, without a ReadIndex (see
        ``ipam.batch`` for why a plan may start from it): possibly stale."""
        node_key, cfg_key = ResourceStore.key(Node, node), ResourceStore.key(IPAMConfiguration, "default")
        hinted = sorted(BLOCK_HINTS.get(node, ()))
        named = sorted({keys.block_key(pool.block_of(a)) for a in addresses for _, pool in list(_POOL_CACHE.values())
                        if a in pool.cidr})
        wanted = list(dict.fromkeys([*also_read, cfg_key, node_key, *hinted, *named]))
        listings = [(keys.block_prefix(v), True) for v in sorted(listing)]
        reading = self.client.read(wanted, [(_POOLS, False), (keys.affinity_prefix(node), True), (_RESERVATIONS, False),
                                            *listings], serializable=serializable)
        singles = reading.values
        labels: dict[str, str] = {}
        node_kv = singles.get(node_key)
        if node_kv is not None:
            labels = dict(json.loads(node_kv.value).get("metadata", {}).get("labels") or {})
        max_blocks = DEFAULT_MAX_BLOCKS_PER_HOST
        cfg_kv = singles.get(cfg_key)
        if cfg_kv is not None:
            max_blocks = int(json.loads(cfg_kv.value).get("spec", {}).get("maxBlocksPerHost", max_blocks))
        affinities = reading.lists[keys.affinity_prefix(node)]
        block_keys = [keys.block_key(keys.cidr_from_key(kv.key)) for kv in affinities]
        found = {k: singles[k] for k in block_keys if k in singles}
        missing = [k for k in block_keys if k not in found and k not in wanted]  # (read: absent)
        if missing:
            found.update(self.client.get_many(missing))
        BLOCK_HINTS[node] = frozenset(block_keys)
        blocks, stored = {}, {}
        for kv in found.values():
            block = decoded_block(kv.key, kv.mod_revision, kv.value)
            if block.node == node:
                blocks[block.cidr] = (block, kv.mod_revision)
                stored[block.cidr] = kv.value
        pools = [_pool(kv) for kv in reading.lists[_POOLS]]
        reservations = Reservations.from_kvs(reading.lists[_RESERVATIONS])
        also = {k: singles[k] for k in also_read if k in singles}
        depends = {k: singles[k].mod_revision if k in singles else 0 for k in (node_key, cfg_key)}
        depends.update((kv.key, kv.mod_revision) for kv in [*reading.lists[_POOLS], *affinities])
        listed = {v: {keys.cidr_from_key(kv.key) for kv in reading.lists[keys.block_prefix(v)]} for v in listing}
        return _Snapshot(None, None, pools, labels, max_blocks, blocks, reservations, reading.revision, also,
                         depends, stored, not serializable, listed, {k: singles.get(k) for k in named})

    def _existing_blocks(self, version: int) -> set[Network]:
        kvs, _ = self.client.list(keys.block_prefix(version), keys_only=True)
        return {keys.cidr_from_key(kv.key) for kv in kvs}

    # ---- assigning -----------------------------------------------------------------------------
    def assign(self, req: AssignRequest, *,
               exclusive: Callable[[], AbstractContextManager[object]] | None = None) -> list[Assigned]:
        """Addresses for one attachment; an existing handle gets its addresses back (idempotent).
        Concurrent assignments and releases of one node in this process are planned and committed
        together, one batch at a time (``ipam.batch``); ``exclusive`` is entered around each batch
        (the CNI plugins' host-wide lock file, which keeps the node's other processes out)."""
        from ipam import batch

        job = batch.AssignJob(req)
        batch.submit(self, req.node, job, exclusive)
        return job.assigned

    def release_attachment(self, network: str, container_id: str, ifname: str, *, node: str = "",
                           also_read: Sequence[str] = (),
                           also_write: Callable[[Mapping[str, KeyValue]], Sequence[Op]] | None = None,
                           exclusive: Callable[[], AbstractContextManager[object]] | None = None,
                           ) -> tuple[list[str], list[Address]]:
        """:meth:`Releaser.release_attachment`; with ``node``, in that node's batches (as assign),
        so that a DEL never loses its compare-and-swap to an ADD of this process."""
        if not node:
            return super().release_attachment(network, container_id, ifname, also_read=also_read,
                                              also_write=also_write)
        from ipam import batch

        job = batch.ReleaseJob(network, container_id, ifname, also_read, also_write)
        batch.submit(self, node, job, exclusive)
        return job.handles, job.released

    def handed_back(self, req: AssignRequest, snap: _Snapshot) -> list[Assigned]:
        """The addresses the request's handle (or its legacy one, for the same attachment) already
        holds: a repeated ADD gets them back; [] when it holds none."""
        if snap.handle is not None:
            return self._existing(req.handle, snap)
        if snap.legacy is not None and _same_attachment(Handle.from_json(snap.legacy.value).attrs, req.attrs):
            return self._existing(req.legacy_handle, snap)
        return []

    def plan(self, req: AssignRequest, snap: _Snapshot, changed: dict[Network, tuple[Block, int]],
             claims: list[tuple[Network, str | None]]) -> list[Assigned]:
        """Plan one request's addresses on ``snap``, the blocks it changes put in ``changed``
        (which holds what the batch changed before it). Blocks that must be created first are put
        in ``claims``; claims wait until every family has been planned, so a request that fails (a
        v6 pool exhausted after a v4 block was needed) leaves the datastore as it found it."""
        results: list[Assigned] = []
        attrs = {"node": req.node, "timestamp": str(int(self.clock())), **req.attrs}
        specific: dict[int, list[Address]] = {4: [a for a in req.addresses if a.version == 4],
                                              6: [a for a in req.addresses if a.version == 6]}
        for version, count, requested in ((4, req.num_v4, req.pools_v4), (6, req.num_v6, req.pools_v6)):
            if specific[version]:
                results += self._plan_specific(specific[version], req, snap, changed, attrs, claims)
            elif count:
                pools = select_pools(snap.pools, version, requested, req.node, snap.node_labels)
                results += self._plan_auto(version, count, pools, req, snap, changed, attrs, claims)
        return results

    def claim(self, claims: Sequence[tuple[Network, str | None]]) -> None:
        for cidr, owner in claims:
            self._claim(cidr, owner)

    def _existing(self, handle: str, snap: _Snapshot) -> list[Assigned]:
        out = []
        for address in self.handle_addresses(handle):
            pool = pool_for_address(snap.pools, address)
            block_cidr = pool.block_of(address) if pool else ipaddress.ip_network(address)
            out.append(Assigned(address, block_cidr, pool.name if pool else "",
                                pool_prefix=pool.cidr.prefixlen if pool else address.max_prefixlen, reused=True))
        return out

    def _plan_auto(self, version: int, count: int, pools: list[Pool], req: AssignRequest, snap: _Snapshot,
                   changed: dict[Network, tuple[Block, int]], attrs: Mapping[str, str],
                   claims: list[tuple[Network, str | None]]) -> list[Assigned]:
        results: list[Assigned] = []
        # 1. this node's own blocks, in pool preference order
        for pool in pools:
            for cidr in sorted(c for c in snap.blocks if _within(c, pool)):
                block, rev = changed.get(cidr) or snap.blocks[cidr]
                if len(results) == count or not block.free:
                    continue
                block, got = block.assign(count - len(results), req.handle, attrs, snap.reservations.ordinals(cidr))
                if not got:
                    continue
                changed[cidr] = (block, rev)
                results += [Assigned(a, cidr, pool.name, pool_prefix=pool.cidr.prefixlen) for a in got]
        if len(results) == count:
            return results
        # 2. claim a free block (ipam.batch plans again with it, and creates it with its addresses)
        own = sum(1 for c in snap.blocks if c.version == version)
        if not snap.max_blocks or own < snap.max_blocks:
            existing = snap.listed.get(version)
            if existing is None:  # not listed with a stale snapshot: its claim is only a guess (ipam.batch
                existing = self._existing_blocks(version) if snap.fresh else set()  # reads again, listing)
            existing = existing | set(snap.blocks)  # and the blocks this batch claims (not in etcd yet)
            for pool in pools:
                free = self._free_block(pool, req.node, existing, snap.reservations)
                if free is not None:
                    claims.append((free, req.node))
                    return []
        # 3. borrow from other nodes' blocks, where the pool allows it
        borrowable = [p for p in pools if not p.strict_affinity]
        if borrowable:
            results += self._plan_borrow(version, count - len(results), borrowable, req, snap, changed, attrs)
        if len(results) < count:
            names = ", ".join(p.name for p in pools)
            why = "" if borrowable else " (strict affinity: this node's blocks are full and no block is free)"
            if snap.max_blocks and own >= snap.max_blocks and not borrowable:
                why = f" (node {req.node} holds the maximum of {snap.max_blocks} blocks)"
            raise PoolExhausted(f"no free IPv{version} address in pool(s) {names}{why}")
        return results

    def _free_block(self, pool: Pool, node: str, existing: set[Network],
                    reservations: Reservations | None = None) -> Network | None:
        """A block-sized CIDR of the pool that no block occupies, starting at a node-specific place
        so that nodes claiming at the same time tend to pick different blocks. A block whose every
        address is reserved is passed over: claiming it would only use up one of the node's blocks."""
        n = pool.block_count
        start = _order(node, n)
        in_pool = sum(1 for c in existing if _within(c, pool))
        passed = 0
        i = 0
        # Look at one more candidate than there are blocks (and fully reserved ones) in the way.
        while i < min(n, in_pool + passed + 1):
            cidr = pool.block_at((start + i) % n)
            i += 1
            if cidr in existing:
                continue
            if reservations and reservations.covers_all(cidr):
                passed += 1
                continue
            return cidr
        return None

    def affinity_op(self, cidr: Network, node: str, snap: _Snapshot | None = None) -> Op:
        """What confirms ``node``'s affinity for the new block ``cidr``, written with the block:
        decided on ``snap`` when given (a fresh read, which listed the node's affinities), else on
        a read. One written since fails the commit, and the next read sees it."""
        key = keys.affinity_key(node, cidr)
        affinity = json.dumps({"state": "confirmed", "claimedAt": int(self.clock())}).encode()
        if snap is not None:
            revision = snap.depends.get(key, 0)
        else:
            stale = self.client.get(key)
            revision = stale.mod_revision if stale is not None else 0
        # An affinity whose block is missing (written by hand, or by an older claim scheme)
        # is simply re-confirmed together with the block it should have had.
        return Update(key, affinity, revision) if revision else Create(key, affinity)

    def _claim(self, cidr: Network, node: str | None) -> None:
        """Create the block and the node's affinity for it in one transaction (no owner: just
        the block)."""
        ops: list[Op] = [Create(keys.block_key(cidr), Block.empty(cidr, node).to_json())]
        if node is not None:
            ops.append(self.affinity_op(cidr, node))
        try:
            self.client.commit(ops)
            log.info("block %s created for %s", cidr, node or "no node")
        except Conflict:
            log.debug("block %s was created by someone else first", cidr)

    def _plan_borrow(self, version: int, count: int, pools: list[Pool], req: AssignRequest, snap: _Snapshot,
                     changed: dict[Network, tuple[Block, int]], attrs: Mapping[str, str]) -> list[Assigned]:
        kvs, _ = self.client.list(keys.block_prefix(version))
        candidates = []
        for kv in kvs:
            block = Block.from_json(kv.value)
            pool = next((p for p in pools if _within(block.cidr, p)), None)
            if pool is not None and block.node != req.node and block.assignable(snap.reservations.ordinals(block.cidr)):
                candidates.append((zlib.crc32(f"{req.node}/{block.cidr}".encode()), block, kv.mod_revision, pool))
        results: list[Assigned] = []
        for _, block, rev, pool in sorted(candidates, key=lambda c: c[0]):
            if len(results) == count:
                break
            block, rev = changed.get(block.cidr) or (block, rev)
            block, got = block.assign(count - len(results), req.handle, {**attrs, "borrowed": "true"},
                                      snap.reservations.ordinals(block.cidr))
            if not got:
                continue
            changed[block.cidr] = (block, rev)
            results += [Assigned(a, block.cidr, pool.name, borrowed=True, pool_prefix=pool.cidr.prefixlen)
                        for a in got]
        return results

    def _plan_specific(self, addresses: list[Address], req: AssignRequest, snap: _Snapshot,
                       changed: dict[Network, tuple[Block, int]], attrs: Mapping[str, str],
                       claims: list[tuple[Network, str | None]]) -> list[Assigned]:
        results = []
        for address in addresses:
            pool = pool_for_address(snap.pools, address)
            if pool is None:
                raise AddressNotInPool(f"{address} is not in any IP pool")
            if snap.reservations.covers(address):
                raise AddressReserved(f"{address} is reserved by an IPReservation; IPAM does not hand it out")
            cidr = pool.block_of(address)
            current = changed.get(cidr) or snap.blocks.get(cidr)
            if current is None:
                key = keys.block_key(cidr)
                # Read with the snapshot, else (the pool's block size was not known then) now; a
                # stale plan need not: a claim it plans is planned again on a fresh read.
                kv = snap.named[key] if key in snap.named else self.client.get(key) if snap.fresh else None
                if kv is None:
                    # The node owns the new block, unless it may own no more: then nobody does.
                    own = sum(1 for c in snap.blocks if c.version == address.version)
                    claims.append((cidr, req.node if not snap.max_blocks or own < snap.max_blocks else None))
                    continue
                current = (Block.from_json(kv.value), kv.mod_revision)
            block, rev = current
            holder = block.allocation_of(address)
            if holder is not None:
                raise AddressInUse(f"{address} is already in use (handle {holder.handle})")
            block = block.assign_address(address, req.handle, attrs)
            changed[cidr] = (block, rev)
            results.append(Assigned(address, cidr, pool.name, borrowed=block.node != req.node,
                                    pool_prefix=pool.cidr.prefixlen))
        return results

    def reservations_unchanged(self, snap: _Snapshot, since: int | None = None) -> list[Op]:
        """A reservation written since the snapshot (or ``since``: a kept snapshot's proven
        revision, ``ipam.kept_snapshot.proven_revision``) may cover what was planned: re-plan then."""
        if since is not None:
            return [NothingNewer(_RESERVATIONS, since)]
        return [NothingNewer(_RESERVATIONS, snap.revision)] if snap.revision else []

    def handle_op(self, req: AssignRequest, snap: _Snapshot, results: list[Assigned]) -> Op:
        """The handle record of a planned request, written in the same transaction as its blocks."""
        counts: dict[str, int] = {}
        for r in results:
            counts[str(r.block)] = counts.get(str(r.block), 0) + 1
        handle = Handle(counts, req.node, {k: v for k, v in req.attrs.items()})
        if snap.handle is None:
            return Create(keys.handle_key(req.handle), handle.to_json())
        return Update(keys.handle_key(req.handle), handle.to_json(), snap.handle.mod_revision)
