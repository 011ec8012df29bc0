"""Which batches of datastore updates can move this node's desired state, so that the agent runs a
dataplane pass (a computation and an apply) only for those. Owns the table of what routing read of
each block last time; must not compute the state itself, nor skip a batch that could move it: a
skipped batch must leave ``Calculator.compute`` giving what it gave before (the unit tests hold the
two to that), and the next pass, for whatever reason, computes from the newer view anyway.

A batch cannot move the state when each of its updates is:

- an IPAM affinity: nothing in the desired state reads one (BGP's exports do, and the agent's BGP
  runner takes them from the syncer's thread, not from a pass);
- a block whose routing key (:func:`felix_agent.calc.routes.block_routing_key`) stayed as it was:
  the owner's own assignment or release, every pod's ADD and DEL;
- a block, new, gone, or moved between owners, that adds nothing to the routing in its old or
  its new shape (:func:`felix_agent.calc.routes.adds_no_route`), with WireGuard off (its peers'
  allowed IPs read every block): on a node running BGP, another node's block in a pool without
  VXLAN, whose route BGP installs. That is every claim in a BGP mesh, on every node but the
  claimer: a pass there costs ~0.7 CPU ms per agent while the ExaBGPs need the cores to spread
  the route.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from felix_agent.calc.routes import adds_no_route, block_routing_key
from felix_agent.calc.snapshot import AFFINITY, BLOCK, Snapshot, Update

RoutingKey = tuple[object, ...]


class StateMoves:
    """``moves(updates, snapshot)``: whether the batch ``updates``, already applied to ``snapshot``,
    can change what ``node`` must hold. Call it with every batch, in order, from one thread (the
    syncer's): it keeps each block's routing key current."""

    def __init__(self, node: str, *, bgp_owns_remote: bool, wireguard_on: Callable[[Snapshot], bool]) -> None:
        self.node = node
        self.bgp_owns_remote = bgp_owns_remote
        self.wireguard_on = wireguard_on
        self._keys: dict[str, RoutingKey] = {}  # block key → what routing read of it last

    def moves(self, updates: Iterable[Update], snapshot: Snapshot) -> bool:
        moved = False
        changed: list[tuple[RoutingKey | None, RoutingKey | None]] = []
        for update in updates:  # every block update is looked at, so that the table stays current
            if update.kind == AFFINITY:
                continue
            if update.kind != BLOCK:
                moved = True
                continue
            key = block_routing_key(update.value) if update.value is not None else None
            known = update.key in self._keys
            old = self._keys.pop(update.key, None)
            if key is not None:
                self._keys[update.key] = key
            if key is None and not known:
                moved = True  # a block gone that the table never had: what it added is unknown
            elif old != key:
                changed.append((old, key))
        if moved or not changed:
            return moved
        if self.wireguard_on(snapshot):
            return True
        return not all(adds_no_route(k, snapshot, self.node, bgp_owns_remote=self.bgp_owns_remote)
                       for pair in changed for k in pair)
