"""How a batch (``ipam.batch``) plans the release of one attachment: which blocks its handles name,
what freeing them writes, and whether a release planned on kept values (``ipam.kept_writes``) found
everything its handles count.

Plans only, on values the batch read or kept: must not read (but the blocks a snapshot did not
hold, :func:`blocks_of_releases`), commit, or decide anything about assignments.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from datastore import keys
from datastore.kv import KV, Delete, KeyValue, Op
from ipam.block import Address, Block, Network, decoded_block
from ipam.handles import Handle, attachment_handles_in


class Releasing(Protocol):
    """A release of one attachment waiting in a batch (``ipam.batch.ReleaseJob``): what it names,
    and where its plan puts the handles and addresses it frees."""

    network: str
    container_id: str
    ifname: str
    also_read: Sequence[str]
    also_write: Callable[[Mapping[str, KeyValue]], Sequence[Op]] | None
    handles: list[str]
    released: list[Address]


def whole(job: Releasing, values: Mapping[str, KeyValue]) -> bool:
    """Whether a release planned on kept values freed every address its handles count. A block it
    frees nothing in is not written, so not compared: planned on a fresh read, the handle's own
    comparison covers it (every write of an address of the handle rewrites the handle); planned on
    a kept block, a block that disagrees with the kept handle is read again instead."""
    found = attachment_handles_in(values, job.network, job.container_id, job.ifname)
    return len(job.released) == sum(n for kv in found.values() for n in Handle.from_json(kv.value).blocks.values())


def blocks_of_releases(client: KV, blocks: Mapping[Network, tuple[Block, int]], values: Mapping[str, KeyValue],
                       releases: Sequence[Releasing]) -> dict[Network, tuple[Block, int]]:
    """The blocks the released handles name that the snapshot did not hold (another node's block
    an address was borrowed from, a block the hint missed): one more read, rarely needed."""
    missing: set[str] = set()
    for job in releases:
        for kv in attachment_handles_in(values, job.network, job.container_id, job.ifname).values():
            for cidr in Handle.from_json(kv.value).blocks:
                if ipaddress.ip_network(cidr) not in blocks:
                    missing.add(keys.block_key(ipaddress.ip_network(cidr)))
    if not missing:
        return {}
    found = client.get_many(sorted(missing))
    return {keys.cidr_from_key(kv.key): (decoded_block(kv.key, kv.mod_revision, kv.value), kv.mod_revision)
            for kv in found.values()}


def plan_release(job: Releasing, values: Mapping[str, KeyValue], blocks: Mapping[Network, tuple[Block, int]],
                 extra: Mapping[Network, tuple[Block, int]], changed: dict[Network, tuple[Block, int]]) -> list[Op]:
    """What releasing one attachment writes (as ``Releaser.release_attachment`` plans it), its
    blocks' changes put in ``changed``."""
    found = attachment_handles_in(values, job.network, job.container_id, job.ifname)
    released: list[Address] = []
    cidrs = sorted({ipaddress.ip_network(c) for kv in found.values() for c in Handle.from_json(kv.value).blocks},
                   key=str)
    for cidr in cidrs:
        current = changed.get(cidr) or blocks.get(cidr) or extra.get(cidr)
        if current is None:
            continue  # a block that is gone holds nothing to release
        block, freed = current[0].release_handles(found)
        if freed:
            changed[cidr] = (block, current[1])
            released += freed
    ops: list[Op] = [Delete(kv.key, kv.mod_revision) for kv in found.values()]
    if job.also_write is not None:
        ops += job.also_write({k: values[k] for k in job.also_read if k in values})
    job.handles, job.released = list(found), released
    return ops
