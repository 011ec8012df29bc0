"""WireGuard's part of the desired state: the merged FelixConfiguration and the peers (Calico's
wireguard calculation, without its incremental bookkeeping).

A peer is every other node that has published a public key (``status.wireguardPublicKey``; an
agent clears its key when WireGuard is off on its node) and an IPv4 underlay address; it carries the
blocks that node owns and the addresses it borrowed from other nodes' blocks. A node without a key
gets no peer: traffic to it stays on the overlay, unencrypted, as in Calico. An address borrowed
from a peer's block by a node that is not a peer (this node, or one without a key) gets a throw
route, so that it leaves the WireGuard table for the main one. Pure: no I/O.

:class:`WireGuardState` is the agent's: the same answer, worked out again only when what it reads
moved (the settings, the nodes, or a block's owner or borrowed addresses), not on every pod's ADD,
whose assignment in its node's block walked every allocation of every block (~2 ms at 5,000 pods).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import replace

from felix_agent.calc.model import DesiredState, WireGuard, WireGuardPeer
from felix_agent.calc.routes import block_routing_key
from felix_agent.calc.settings import Layer, settings
from felix_agent.calc.snapshot import Snapshot

FWMARK = 0x100000  # the bit WireGuard's own UDP carries (Calico takes one of its iptables mark bits)


__all__ = ["FWMARK", "WireGuardState", "settings", "wireguard", "with_wireguard"]  # settings: its home is calc.settings


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


class WireGuardState:
    """:func:`with_wireguard` again and again; :func:`wireguard` runs only when its inputs moved:
    the settings in force, a Node, or what a block says of its owner and borrowed addresses (the key
    ``felix_agent.calc.routes.block_routing_key`` keeps, the very data :func:`wireguard` reads)."""

    def __init__(self) -> None:
        self._blocks: dict[str, tuple[object, tuple[object, ...]]] = {}  # key → (block, its routing key)
        self._inputs: tuple[object, ...] | None = None
        self._last: WireGuard | None = None

    def with_wireguard(self, state: DesiredState, snapshot: Snapshot,
                       layers: Sequence[Layer] | None = None) -> DesiredState:
        return replace(state, wireguard=self.wireguard(snapshot, state.node, layers))

    def wireguard(self, snapshot: Snapshot, node: str, layers: Sequence[Layer] | None = None) -> WireGuard:
        config = settings(snapshot, node, layers)
        inputs: tuple[object, ...] = (config, node)
        if config.wireguard_enabled:
            blocks = {}
            for key, block in snapshot.blocks.items():
                known = self._blocks.get(key)
                blocks[key] = known if known is not None and known[0] is block else (block, block_routing_key(block))
            self._blocks = blocks
            # Compared element by element, identity first: an unchanged node or block key costs nothing.
            inputs += (tuple(snapshot.nodes.values()), tuple(k for _, k in blocks.values()))
        if self._last is None or inputs != self._inputs:
            self._inputs, self._last = inputs, wireguard(snapshot, node, layers)
        return self._last
