"""WireGuard's part of the desired state: the merged FelixConfiguration and the peers (Calico's
wireguard calculation, without its incremental bookkeeping).

A peer is every other node that has published a public key (``status.wireguardPublicKey``; an
agent clears its key when WireGuard is off on its node) and an IPv4 underlay address; it carries the
blocks that node owns and the addresses it borrowed from other nodes' blocks. A node without a key
gets no peer: traffic to it stays on the overlay, unencrypted, as in Calico. An address borrowed
from a peer's block by a node that is not a peer (this node, or one without a key) gets a throw
route, so that it leaves the WireGuard table for the main one. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import replace

from felix_agent.calc.model import DesiredState, WireGuard, WireGuardPeer
from felix_agent.calc.settings import Layer, settings
from felix_agent.calc.snapshot import Snapshot

FWMARK = 0x100000  # the bit WireGuard's own UDP carries (Calico takes one of its iptables mark bits)


__all__ = ["FWMARK", "settings", "wireguard", "with_wireguard"]  # settings: its home is calc.settings


def wireguard(snapshot: Snapshot, node: str, layers: Sequence[Layer] | None = None) -> WireGuard:
    """The WireGuard part of ``node``'s state; ``layers``: the overrides (None: this process's)."""
    config = settings(snapshot, node, layers)
    if not config.wireguard_enabled:
        return WireGuard(enabled=False, interface=str(config.wireguard_interface_name))
    allowed: dict[str, set[str]] = {}
    borrowed: list[tuple[str, str, str]] = []  # (address/32, holder, block owner)
    for block in snapshot.blocks.values():
        if block.cidr.version != 4:
            continue  # wireguardEnabled is IPv4 (Calico's wireguardEnabledV6 is not built)
        if block.node and block.node != node:
            allowed.setdefault(block.node, set()).add(str(block.cidr))
        for ordinal, allocation in block.allocations.items():
            holder = allocation.attrs.get("node")
            if holder and block.node and holder != block.node:
                borrowed.append((f"{block.address(ordinal)}/32", holder, block.node))
                if holder != node:
                    allowed.setdefault(holder, set()).add(f"{block.address(ordinal)}/32")
    peers = set()
    port = int(config.wireguard_listening_port or 51820)
    for resource in snapshot.nodes.values():
        status = resource.status
        key = getattr(status, "wireguard_public_key", "") if status is not None else ""
        bgp = resource.spec.bgp
        if resource.name == node or not key or bgp is None or not bgp.ipv4_address:
            continue
        underlay = ipaddress.ip_interface(bgp.ipv4_address).ip
        peers.add(WireGuardPeer(resource.name, key, f"{underlay}:{port}",
                                tuple(sorted(allowed.get(resource.name, ()),
                                             key=lambda c: ipaddress.ip_network(c)))))
    # A borrowed address inside a peer's block whose holder is not a peer (this node, or a node
    # without a key) would follow the block's route into the tunnel, to the wrong node: a throw
    # route sends it back to the main table (Calico's wireguard route table does the same).
    keyed = {p.node for p in peers}
    throw = sorted({address for address, holder, owner in borrowed if owner in keyed and holder not in keyed},
                   key=lambda c: ipaddress.ip_network(c))
    return WireGuard(True, str(config.wireguard_interface_name), port, int(config.wireguard_mtu or 0),
                     int(config.wireguard_routing_rule_priority or 99), int(config.wireguard_routing_table_index or 1),
                     FWMARK, int(config.wireguard_persistent_keepalive or 0), frozenset(peers), tuple(throw))


def with_wireguard(state: DesiredState, snapshot: Snapshot, layers: Sequence[Layer] | None = None) -> DesiredState:
    """``state`` with its WireGuard part computed from ``snapshot`` (the agent's hook after the graph)."""
    return replace(state, wireguard=wireguard(snapshot, state.node, layers))
