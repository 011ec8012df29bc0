"""Which IPAM changes can change what one node announces (``bgp.config.exports``), so that its agent
works the exports out again only for those. Owns the set of blocks that count for the node's
exports; must not compute the exports, nor answer "no" for a change that could move them: a batch
it lets through unanswered must leave ``exports(snapshot, node)`` as it was (the unit tests hold
the two to that).

Of the blocks and affinities, ``exports`` reads only the node's own blocks (with their affinity's
state) and the blocks where it holds an address (a borrowed /32). Every claim in a cluster is a
batch of blocks and affinities seen by every agent; on all nodes but the claimer's none of it is
theirs, and working the exports out again walks every block (~0.23 ms at 100 blocks, on each
node, several batches per claim: CPU the ExaBGPs need to spread the route).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from datastore import keys
from ipam.block import Block

BLOCK, AFFINITY = "Block", "Affinity"  # felix_agent.calc.snapshot's kind names


class ExportInputs:
    """``moves(changes)``: whether ``(kind, key, value)`` changes (value None: deleted) can change
    ``node``'s exports. Every batch must go through it, in order, once :meth:`reset` has seeded it
    from a snapshot's blocks; before that every batch moves them."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._counted: set[str] | None = None  # block keys that count for our exports

    def reset(self, blocks: Mapping[str, Block]) -> None:
        self._counted = {key for key, block in blocks.items() if self._counts(block)}

    @property
    def seeded(self) -> bool:
        return self._counted is not None

    def moves(self, changes: Iterable[tuple[str, str, Any]]) -> bool:
        moved = self._counted is None
        for kind, key, value in changes:  # every change is looked at, so that the set stays current
            if kind == AFFINITY:
                moved |= keys.node_from_affinity_key(key) == self.node
            elif kind == BLOCK:
                counted = value is not None and self._counts(value)
                if self._counted is not None:
                    moved |= key in self._counted or counted
                    if counted:
                        self._counted.add(key)
                    else:
                        self._counted.discard(key)
            else:
                moved = True
        return moved

    def _counts(self, block: Block) -> bool:
        node = self.node
        return block.node == node or any(a.attrs.get("node") == node for a in block.allocations.values())
