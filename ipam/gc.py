"""IPAM garbage collection: what ``netctl ipam gc`` releases and deletes, and doing it safely.

Owns the plan (:func:`plan_gc`, a pure function of an :class:`ipam.check.Snapshot`: leaked
addresses older than the grace period, empty handles, blockless affinities, tortie handles without
an endpoint) and its execution (:func:`collect`), with compare-and-swap writes that leave alone
anything that changed since the scan (Calico's sequence numbers for addresses, the revision read
for handles and affinities). It must not touch the kernel, and must not decide what is damage:
reading the state and reporting belong to ``ipam.check``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from datastore import keys
from datastore.errors import Conflict
from datastore.kv import Delete, Unchanged
from ipam.allocator import IPAM
from ipam.block import Address, Network
from ipam.check import Snapshot, by_affinity, endpoint_attachments, scan
from ipam.handles import Handle, attachment_of

if TYPE_CHECKING:
    from datastore.kv import KV  # either client: netctl's is the JSON gateway's

log = logging.getLogger(__name__)


@dataclass
class GCPlan:
    """What a collection would do, decided from one snapshot."""

    # leaked addresses → the sequence number read, so a re-allocated address is left alone
    addresses: dict[Address, int] = field(default_factory=dict)
    owners: dict[Address, str] = field(default_factory=dict)  # leaked address → its (gone) handle
    handles: dict[str, int] = field(default_factory=dict)  # empty handle → revision read
    affinities: dict[tuple[str, Network], int] = field(default_factory=dict)  # blockless → revision read
    endpointless: dict[str, int] = field(default_factory=dict)  # tortie handle without endpoint → revision
    waiting: int = 0  # leaked addresses still within the grace period


@dataclass
class GCResult:
    released: list[tuple[Address, str]] = field(default_factory=list)  # (address, handle it was leaked by)
    deleted_handles: list[str] = field(default_factory=list)
    deleted_affinities: list[tuple[str, Network]] = field(default_factory=list)
    waiting: int = 0  # leaked addresses not released: within the grace period, or changed since the scan


def plan_gc(snap: Snapshot, grace_seconds: float, now: float) -> GCPlan:
    """Leaked addresses older than the grace period, empty handles and blockless affinities.

    All-or-none per handle (as Calico): a leaked handle whose youngest address is still within the
    grace period keeps all its addresses until the next run. An allocation without a timestamp is
    taken to be old.
    """
    plan = GCPlan()
    leaked: dict[str, list[tuple[Address, int, float]]] = {}
    for block, _ in snap.blocks.values():
        for ordinal, a in block.allocations.items():
            if not snap.handle_exists(a.handle):
                leaked.setdefault(a.handle, []).append((block.address(ordinal), a.sequence,
                                                        _timestamp(a.attrs.get("timestamp"))))
    for handle, found in leaked.items():
        if any(now - stamp < grace_seconds for _, _, stamp in found):
            plan.waiting += len(found)
            continue
        for address, sequence, _ in found:
            plan.addresses[address] = sequence
            plan.owners[address] = handle
    held = {a.handle for block, _ in snap.blocks.values() for a in block.allocations.values()}
    for name, (_, revision) in snap.handles.items():
        if name not in held:
            plan.handles[name] = revision
    for affinity, revision in snap.affinities.items():
        if not snap.block_exists(affinity[1]):
            plan.affinities[affinity] = revision
    for name, (record, revision) in snap.endpointless().items():
        if now - _timestamp(record.attrs.get("timestamp")) < grace_seconds:
            plan.waiting += sum(record.blocks.values())
        else:
            plan.endpointless[name] = revision
    return plan


def _timestamp(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


def collect(client: KV, plan: GCPlan) -> GCResult:
    """Perform ``plan``; whatever changed since it was made is left alone."""
    result = GCResult(waiting=plan.waiting)
    # Re-validate just before releasing: a handle re-created since the scan owns its addresses again.
    handle_keys = sorted({keys.handle_key(h) for h in plan.owners.values()})
    recreated = {kv.key[len(keys.HANDLES):] for kv in client.get_many(handle_keys).values()}
    addresses = [a for a in sorted(plan.addresses, key=_by_address) if plan.owners[a] not in recreated]
    if addresses:
        freed = IPAM(client).release_addresses(addresses, expected_sequence=plan.addresses, orphaned=True)
        result.released = [(a, plan.owners[a]) for a in sorted(freed, key=_by_address)]
        for address, handle in result.released:
            log.info("released leaked address %s (handle %s)", address, handle)
    result.waiting += len(plan.addresses) - len(result.released)
    for name, revision in sorted(plan.handles.items()):
        try:
            client.commit([Delete(keys.handle_key(name), revision)])
        except Conflict:
            log.info("handle %s changed since the scan; left alone", name)
            continue
        result.deleted_handles.append(name)
        log.info("deleted handle %s, which held no addresses", name)
    for (node, cidr), revision in sorted(plan.affinities.items(), key=by_affinity):
        try:
            # Only while the block is still absent: a claim writes both together.
            client.commit([Delete(keys.affinity_key(node, cidr), revision), Unchanged(keys.block_key(cidr), 0)])
        except Conflict:
            log.info("affinity of %s for %s changed since the scan; left alone", node, cidr)
            continue
        result.deleted_affinities.append((node, cidr))
        log.info("deleted node %s's affinity for missing block %s", node, cidr)
    if plan.endpointless:
        # Re-validate: an endpoint written since the scan makes its handle live again.
        live = endpoint_attachments(client)
        ipam = IPAM(client)
        for name, revision in sorted(plan.endpointless.items()):
            kv = client.get(keys.handle_key(name))
            if kv is None or kv.mod_revision != revision:
                continue
            record = Handle.from_json(kv.value)
            if attachment_of(record.attrs) in live:
                continue
            for address in ipam.release_handle(name, expected_revision=revision):
                result.released.append((address, name))
                log.info("released %s of handle %s, which has no workload endpoint", address, name)
    return result


def gc(client: KV, grace_seconds: float, clock: Callable[[], float] = time.time) -> GCResult:
    """Release leaked addresses older than ``grace_seconds`` and delete empty handle records."""
    return collect(client, plan_gc(scan(client), grace_seconds, clock()))


def _by_address(address: Address) -> tuple[int, int]:
    return address.version, int(address)
