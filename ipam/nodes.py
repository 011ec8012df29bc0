"""Removing a node from IPAM (Calico's ``RemoveIPAMHost``): what a deleted node held goes back.

Its workload endpoints are deleted and their attachments' addresses released; every other address
the node held (its VXLAN tunnel address, attachments without an endpoint) is released too; then its
block affinities go, and so do its blocks once they are empty. A block of the node that still holds
another node's (borrowed) addresses stays, without an owner, until those are released.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from datastore import keys
from datastore.errors import Conflict, NotFound
from datastore.kv import KV, Delete, Update
from datastore.resources import WorkloadEndpoint, WorkloadEndpointSpec
from datastore.store import ResourceStore
from ipam.allocator import IPAM
from ipam.block import Block

log = logging.getLogger(__name__)


@dataclass
class NodeRemoval:
    endpoints: list[str] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)
    blocks_deleted: list[str] = field(default_factory=list)
    blocks_orphaned: list[str] = field(default_factory=list)  # still holding others' addresses


def remove_node(client: KV, node: str) -> NodeRemoval:
    """Release everything ``node`` holds. Idempotent: running it again finds nothing to do."""
    out = NodeRemoval()
    store = ResourceStore(client)
    ipam = IPAM(client)
    for endpoint in store.list(WorkloadEndpoint):
        spec: WorkloadEndpointSpec = endpoint.spec
        if spec.node != node:
            continue
        ipam.release_attachment(spec.network, spec.container_id, spec.endpoint)
        with contextlib.suppress(NotFound):
            store.delete(WorkloadEndpoint, endpoint.name, endpoint.namespace)
        out.endpoints.append(f"{endpoint.namespace}/{endpoint.name}")
    for name, handle in ipam.handles().items():
        if handle.node == node:
            ipam.release_handle(name)
            out.handles.append(name)
    affinities, _ = client.list(keys.affinity_prefix(node))
    for kv in affinities:
        cidr = keys.cidr_from_key(kv.key)
        for _ in range(ipam.max_retries):
            block_kv = client.get(keys.block_key(cidr))
            try:
                if block_kv is None:
                    client.commit([Delete(kv.key)])
                elif not Block.from_json(block_kv.value).allocations:
                    client.commit([Delete(block_kv.key, block_kv.mod_revision), Delete(kv.key)])
                    out.blocks_deleted.append(str(cidr))
                else:  # others' borrowed addresses remain: the block loses its owner, not its data
                    orphan = Block.from_json(block_kv.value).with_affinity(None)
                    client.commit([Update(block_kv.key, orphan.to_json(), block_kv.mod_revision), Delete(kv.key)])
                    out.blocks_orphaned.append(str(cidr))
                break
            except Conflict:
                continue
    log.info("removed node %s from IPAM: %d endpoints, %d handles, blocks deleted %s, orphaned %s", node,
             len(out.endpoints), len(out.handles), out.blocks_deleted, out.blocks_orphaned)
    return out
