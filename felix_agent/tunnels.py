"""This node's VXLAN tunnel endpoint: an address from a VXLAN pool (IPAM handle
``vxlan-tunnel-addr-<node>``, as Calico names it) and a MAC derived from the node name, recorded
on the Node resource so that the other nodes can program their FDB and neighbour entries."""

from __future__ import annotations

import hashlib
import logging

from datastore.resources import IPPool, IPPoolSpec, Node, NodeSpec
from datastore.store import ResourceStore
from ipam.allocator import IPAM, AssignRequest

log = logging.getLogger(__name__)


def vtep_handle(node: str) -> str:
    return f"vxlan-tunnel-addr-{node}"


def vtep_mac(node: str) -> str:
    """Stable across restarts and unique per node: a locally administered unicast MAC."""
    digest = hashlib.sha256(f"tortie-vtep/{node}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02 | (digest[0] & 0xFC), *digest[1:6]))


def ensure_vtep(ipam: IPAM, store: ResourceStore, node: str) -> None:
    """Give the node a VTEP address and MAC when an enabled IPv4 pool uses VXLAN; release them when
    none does. Idempotent: an existing assignment is kept."""
    vxlan_pools = []
    for pool in store.list(IPPool):
        spec: IPPoolSpec = pool.spec
        if spec.vxlan_mode != "Never" and not spec.disabled and spec.network().version == 4:
            vxlan_pools.append(pool.name)
    resource = store.get(Node, node)
    if resource is None:
        return
    node_spec: NodeSpec = resource.spec
    if not vxlan_pools:
        if node_spec.ipv4_vxlan_tunnel_addr:
            ipam.release_handle(vtep_handle(node))
            node_spec.ipv4_vxlan_tunnel_addr = None
            node_spec.vxlan_tunnel_mac_addr = None
            store.update(resource, resource)
        return
    assigned = ipam.assign(AssignRequest(handle=vtep_handle(node), node=node, num_v4=1,
                                         pools_v4=vxlan_pools,
                                         attrs={"type": "vxlanTunnelAddress"}))
    address, mac = str(assigned[0].address), vtep_mac(node)
    if node_spec.ipv4_vxlan_tunnel_addr != address or node_spec.vxlan_tunnel_mac_addr != mac:
        node_spec.ipv4_vxlan_tunnel_addr, node_spec.vxlan_tunnel_mac_addr = address, mac
        store.update(resource, resource)
        log.info("node %s VXLAN tunnel endpoint %s (%s)", node, address, mac)

