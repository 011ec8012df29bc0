"""An allocation block: one CAS-guarded record holding every address of a block-sized CIDR.

Pure data and arithmetic, no I/O. A block is immutable from the caller's point of view: every
change returns a new :class:`Block`, so the version read from etcd is never mutated before the
compare-and-swap that replaces it has succeeded.

Free ordinals form a FIFO (take from the head, return to the tail), so the address freed longest
ago is reused first. Every write bumps ``sequence`` and stamps the allocations it makes with it; a
release that names a sequence number only frees the address if it was not re-allocated since.

Also keeps the blocks decoded per stored version (:func:`decoded_block`), so that a snapshot of a
node's blocks decodes only those that changed.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Allocation:
    handle: str
    sequence: int
    attrs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Block:
    cidr: Network
    affinity: str | None  # "host:<node>", or None when no node owns it
    allocations: Mapping[int, Allocation]
    free: tuple[int, ...]
    sequence: int = 0

    # ---- construction and codec --------------------------------------------------------------
    @classmethod
    def empty(cls, cidr: Network, node: str | None) -> Block:
        return cls(cidr, f"host:{node}" if node else None, {}, tuple(range(cidr.num_addresses)))

    @classmethod
    def from_json(cls, raw: bytes) -> Block:
        doc = json.loads(raw)
        allocations = {
            int(ordinal): Allocation(a["handle"], int(a["seq"]), dict(a.get("attrs") or {}))
            for ordinal, a in doc["allocations"].items()
        }
        return cls(ipaddress.ip_network(doc["cidr"]), doc.get("affinity"), allocations,
                   tuple(doc["unallocated"]), int(doc.get("sequenceNumber", 0)))

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "cidr": str(self.cidr),
            "affinity": self.affinity,
            "sequenceNumber": self.sequence,
            "allocations": {str(o): {"handle": a.handle, "seq": a.sequence, "attrs": dict(a.attrs)}
                            for o, a in sorted(self.allocations.items())},
            "unallocated": list(self.free),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    # ---- queries -------------------------------------------------------------------------------
    @property
    def node(self) -> str | None:
        if self.affinity and self.affinity.startswith("host:"):
            return self.affinity[5:]
        return None

    @property
    def size(self) -> int:
        return self.cidr.num_addresses

    def address(self, ordinal: int) -> Address:
        return self.cidr.network_address + ordinal

    def ordinal(self, address: Address) -> int:
        if address not in self.cidr:
            raise ValueError(f"{address} is not in block {self.cidr}")
        return int(address) - int(self.cidr.network_address)

    def allocation_of(self, address: Address) -> Allocation | None:
        return self.allocations.get(self.ordinal(address))

    def addresses_of(self, handle: str) -> list[Address]:
        return [self.address(o) for o, a in sorted(self.allocations.items()) if a.handle == handle]

    def handles(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.allocations.values():
            counts[a.handle] = counts.get(a.handle, 0) + 1
        return counts

    # ---- changes (each returns a new block) ----------------------------------------------------
    def assign(self, count: int, handle: str, attrs: Mapping[str, str],
               reserved: AbstractSet[int] = frozenset()) -> tuple[Block, list[Address]]:
        """Take ``count`` addresses from the head of the free list (fewer if the block runs out),
        passing over ``reserved`` ordinals: they keep their place in the list, so an address whose
        reservation is lifted is reused in the order it was freed."""
        if reserved:
            taken = tuple(o for o in self.free if o not in reserved)[:count]
            chosen = set(taken)
            rest = tuple(o for o in self.free if o not in chosen)
        else:
            taken, rest = self.free[:count], self.free[count:]
        if not taken:
            return self, []
        seq = self.sequence + 1
        allocations = dict(self.allocations)
        for ordinal in taken:
            allocations[ordinal] = Allocation(handle, seq, dict(attrs))
        block = replace(self, allocations=allocations, free=rest, sequence=seq)
        return block, [self.address(o) for o in taken]

    def assignable(self, reserved: AbstractSet[int] = frozenset()) -> int:
        """How many free addresses are not reserved."""
        return sum(1 for o in self.free if o not in reserved) if reserved else len(self.free)

    def assign_address(self, address: Address, handle: str, attrs: Mapping[str, str]) -> Block:
        """Take one specific address; ValueError if it is not free."""
        ordinal = self.ordinal(address)
        if ordinal in self.allocations:
            raise ValueError(f"{address} is already assigned (handle {self.allocations[ordinal].handle})")
        seq = self.sequence + 1
        allocations = dict(self.allocations)
        allocations[ordinal] = Allocation(handle, seq, dict(attrs))
        free = tuple(o for o in self.free if o != ordinal)
        return replace(self, allocations=allocations, free=free, sequence=seq)

    def release(self, ordinals: Iterable[int],
                expected: Mapping[int, int] | None = None) -> tuple[Block, dict[str, int]]:
        """Free ``ordinals``; returns the new block and how many were freed per handle.

        An ordinal already free is skipped (releasing twice is not an error); one whose sequence
        number differs from ``expected`` was re-allocated since it was read, and is left alone.
        """
        allocations = dict(self.allocations)
        freed: list[int] = []
        per_handle: dict[str, int] = {}
        for ordinal in ordinals:
            current = allocations.get(ordinal)
            if current is None:
                continue
            if expected is not None and ordinal in expected and expected[ordinal] != current.sequence:
                continue
            del allocations[ordinal]
            freed.append(ordinal)
            per_handle[current.handle] = per_handle.get(current.handle, 0) + 1
        if not freed:
            return self, {}
        block = replace(self, allocations=allocations, free=self.free + tuple(freed),
                        sequence=self.sequence + 1)
        return block, per_handle

    def release_handle(self, handle: str) -> tuple[Block, list[Address]]:
        ordinals = [o for o, a in sorted(self.allocations.items()) if a.handle == handle]
        block, _ = self.release(ordinals)
        return block, [self.address(o) for o in ordinals]

    def release_handles(self, handles: Iterable[str]) -> tuple[Block, list[Address]]:
        """``release_handle`` of each of ``handles``: the block after, and every address freed."""
        block, freed = self, []
        for handle in handles:
            block, addresses = block.release_handle(handle)
            freed += addresses
        return block, freed

    def with_affinity(self, node: str | None) -> Block:
        return replace(self, affinity=f"host:{node}" if node else None, sequence=self.sequence + 1)


# block key → (mod revision, stored bytes, the block decoded): every snapshot reads all of a
# node's blocks, most of them unchanged since the last one. Blocks are immutable, so one decoded
# block can be handed to every reader; checked against the bytes too (one process may talk to
# several etcd clusters: tests).
_BLOCK_CACHE: dict[str, tuple[int, bytes, Block]] = {}


def decoded_block(key: str, mod_revision: int, value: bytes) -> Block:
    """The block stored at ``key`` as read (its revision and bytes), decoded once per version."""
    cached = _BLOCK_CACHE.get(key)
    if cached is not None and cached[0] == mod_revision and cached[1] == value:
        return cached[2]
    block = Block.from_json(value)
    remember_block(key, mod_revision, value, block)
    return block


def remember_block(key: str, mod_revision: int, value: bytes, block: Block) -> None:
    """``block`` is what ``key`` holds at ``mod_revision`` (read, or written by this process)."""
    if len(_BLOCK_CACHE) > 4096:
        _BLOCK_CACHE.clear()
    _BLOCK_CACHE[key] = (mod_revision, value, block)
