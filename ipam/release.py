"""Releasing addresses: by attachment (DEL), by handle, by address (GC), on etcd compare-and-swap.

Owns freeing what an attachment or an operator's plan holds: the blocks' allocations and the
handle records that index them, updated together in one transaction conditioned on the revisions
read, re-read and retried on conflict. It must not assign or claim blocks (``ipam.allocator``, whose
:class:`~ipam.allocator.IPAM` extends :class:`Releaser`). :class:`~ipam.allocator.IPAM` sends
an attachment's release on a given node (DEL's) to that node's batches instead (``ipam.batch``,
which plans it the same way); the releases here take no lock: a lost CAS costs one re-read.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Mapping, Sequence

from datastore import keys
from datastore.errors import Conflict
from datastore.kv import KV, Delete, KeyValue, Op, Update
from ipam import kept_snapshot
from ipam.block import Address, Block
from ipam.errors import TooManyConflicts
from ipam.handles import Handle, attachment_handles_in, attachment_keys

# node → the keys of the blocks it held at its last assignment in this process: read together
# with the snapshot so that a warm caller (felix-agent) needs one round trip. Only a hint: the
# affinities read in the same transaction decide which blocks are the node's.
BLOCK_HINTS: dict[str, frozenset[str]] = {}


class Releaser:
    """Frees addresses; the retry policy (``max_retries``, a jittered back-off) is shared with assign."""

    def __init__(self, client: KV, *, max_retries: int, sleep: Callable[[float], None]) -> None:
        self.client = client
        self.max_retries = max_retries
        self.sleep = sleep

    def _backoff(self, attempt: int) -> None:
        self.sleep(random.uniform(0, min(0.05, 0.001 * (2 ** min(attempt, 6)))))

    def handle_addresses(self, handle: str) -> list[Address]:
        kv = self.client.get(keys.handle_key(handle))
        if kv is None:
            return []
        record = Handle.from_json(kv.value)
        found: list[Address] = []
        block_kvs = self.client.get_many([keys.block_key(ipaddress.ip_network(c)) for c in record.blocks])
        for bkv in block_kvs.values():
            found.extend(Block.from_json(bkv.value).addresses_of(handle))
        return found

    # ---- releasing -----------------------------------------------------------------------------
    def attachment_handles(self, network: str, container_id: str, ifname: str) -> dict[str, KeyValue]:
        """The handles holding one attachment's addresses, read in one round trip: its own, and a
        handle of the older ``<network>.<container>`` form whose attributes name this interface."""
        return attachment_handles_in(self.client.get_many(attachment_keys(network, container_id, ifname)),
                                     network, container_id, ifname)

    def attachment_addresses(self, network: str, container_id: str, ifname: str) -> list[Address]:
        return [a for name in self.attachment_handles(network, container_id, ifname)
                for a in self.handle_addresses(name)]

    def release_attachment(self, network: str, container_id: str, ifname: str, *, node: str = "",
                           also_read: Sequence[str] = (),
                           also_write: Callable[[Mapping[str, KeyValue]], Sequence[Op]] | None = None,
                           ) -> tuple[list[str], list[Address]]:
        """Free every address of one attachment (DEL's IPAM work): (handle names, addresses).
        Never touches another interface's handle of the same container.

        Two round trips in the usual case: one read of the attachment's handles, the blocks
        ``node`` was last seen to hold in this process (a hint, as for assign) and the caller's
        ``also_read`` keys; then one transaction with the block updates, the handle deletions and
        whatever ``also_write`` makes of what was read (the caller's own compare-and-swap
        deletions, e.g. the attachment's endpoint), so that they land together or not at all.
        A block the hint missed costs one more read; a lost comparison re-reads everything."""
        handle_keys = attachment_keys(network, container_id, ifname)
        hinted = sorted(BLOCK_HINTS.get(node, ())) if node else []
        for attempt in range(self.max_retries):
            values = dict(self.client.get_many(list(dict.fromkeys([*handle_keys, *also_read, *hinted]))))
            found = attachment_handles_in(values, network, container_id, ifname)
            block_keys = sorted({keys.block_key(ipaddress.ip_network(c)) for kv in found.values()
                                 for c in Handle.from_json(kv.value).blocks})
            missing = [k for k in block_keys if k not in values]
            if missing:
                values.update(self.client.get_many(missing))
            ops: list[Op] = []
            released: list[Address] = []
            for key in block_keys:
                kv = values.get(key)
                if kv is None:
                    continue  # a block that is gone holds nothing to release
                block, freed = Block.from_json(kv.value).release_handles(found)
                if freed:
                    ops.append(Update(kv.key, block.to_json(), kv.mod_revision))
                    released += freed
            ops += [Delete(kv.key, kv.mod_revision) for kv in found.values()]
            if also_write is not None:
                ops += also_write(values)
            if not ops:
                return list(found), []
            try:
                self.client.commit(ops)
                kept_snapshot.forget_datastore(self.client)
                return list(found), released
            except Conflict:
                self._backoff(attempt)
        raise TooManyConflicts(f"gave up releasing {handle_keys[0]} after {self.max_retries} conflicts")

    def release_handle(self, handle: str, *, expected_revision: int = 0, read: KeyValue | None = None) -> list[Address]:
        """Free every address of an attachment and delete its handle; [] if it is already gone
        (or, with ``expected_revision``, if the handle changed since it was read at that revision).
        ``read``: the handle as the caller just read it, which saves the first round trip."""
        for attempt in range(self.max_retries):
            hkv, read = read or self.client.get(keys.handle_key(handle)), None
            if hkv is None or (expected_revision and hkv.mod_revision != expected_revision):
                return []
            record = Handle.from_json(hkv.value)
            block_kvs = self.client.get_many([keys.block_key(ipaddress.ip_network(c)) for c in record.blocks])
            ops: list[Op] = []
            released: list[Address] = []
            for kv in block_kvs.values():
                block, addresses = Block.from_json(kv.value).release_handle(handle)
                if addresses:
                    ops.append(Update(kv.key, block.to_json(), kv.mod_revision))
                    released += addresses
            ops.append(Delete(hkv.key, hkv.mod_revision))
            try:
                self.client.commit(ops)
                kept_snapshot.forget_datastore(self.client)
                return released
            except Conflict:
                self._backoff(attempt)
        raise TooManyConflicts(f"gave up releasing {handle} after {self.max_retries} conflicts")

    def release_addresses(self, addresses: Sequence[Address],
                          expected_sequence: Mapping[Address, int] | None = None,
                          *, orphaned: bool = False) -> list[Address]:
        """Free specific addresses (and shrink their handles). With ``expected_sequence``, an
        address re-allocated since it was read (its sequence number moved) is left alone.
        ``orphaned`` says their handles were gone when they were read: a handle of the same name
        that exists now is a new attachment's, and is not shrunk for addresses it never held.
        Returns what was actually freed."""
        for attempt in range(self.max_retries):
            by_block: dict[str, list[Address]] = {}
            for version in {a.version for a in addresses}:
                kvs, _ = self.client.list(keys.block_prefix(version), keys_only=True)
                cidrs = [keys.cidr_from_key(kv.key) for kv in kvs]
                for a in addresses:
                    if a.version != version:
                        continue
                    cidr = next((c for c in cidrs if a in c), None)
                    if cidr is not None:
                        by_block.setdefault(keys.block_key(cidr), []).append(a)
            block_kvs = self.client.get_many(list(by_block))
            ops: list[Op] = []
            freed: list[Address] = []
            shrink: dict[tuple[str, str], int] = {}  # (handle, block) → addresses freed
            for key, kv in block_kvs.items():
                block = Block.from_json(kv.value)
                wanted = by_block[key]
                expected = None
                if expected_sequence is not None:
                    expected = {block.ordinal(a): expected_sequence[a] for a in wanted if a in expected_sequence}
                new_block, per_handle = block.release([block.ordinal(a) for a in wanted], expected)
                if not per_handle:
                    continue
                ops.append(Update(key, new_block.to_json(), kv.mod_revision))
                freed += [a for a in wanted
                          if block.allocation_of(a) is not None and new_block.allocation_of(a) is None]
                for h, n in per_handle.items():
                    shrink[(h, str(block.cidr))] = n
            if not ops:
                return []
            if not orphaned:
                ops += self._shrink_handles(shrink)
            try:
                self.client.commit(ops)
                kept_snapshot.forget_datastore(self.client)
                return freed
            except Conflict:
                self._backoff(attempt)
        raise TooManyConflicts(f"gave up releasing addresses after {self.max_retries} conflicts")

    def _shrink_handles(self, shrink: Mapping[tuple[str, str], int]) -> list[Op]:
        """Handle updates matching freed addresses; a handle left with none is deleted."""
        names = sorted({h for h, _ in shrink})
        kvs = self.client.get_many([keys.handle_key(h) for h in names])
        ops: list[Op] = []
        for h in names:
            kv = kvs.get(keys.handle_key(h))
            if kv is None:
                continue  # an address whose handle is already gone: nothing to shrink
            record = Handle.from_json(kv.value)
            for (name, cidr), n in shrink.items():
                if name == h and cidr in record.blocks:
                    record.blocks[cidr] -= n
                    if record.blocks[cidr] <= 0:
                        del record.blocks[cidr]
            if record.blocks:
                ops.append(Update(kv.key, record.to_json(), kv.mod_revision))
            else:
                ops.append(Delete(kv.key, kv.mod_revision))
        return ops
