"""Learned paths a group at a time: ``RouteGroup`` (one peer's paths for many prefixes through one
next hop with one set of attributes, or their withdrawal: what one UPDATE carries, ~800 /32s from
BIRD) and ``record``, which puts groups into a table of paths (prefix -> peer -> path) with one
path object per group rather than per prefix.

The speaker (``bgp.received``) hands an UPDATE's accepted prefixes on as one group and
``bgp.learned`` records them, so that a table of 10,000 routes crosses these layers as a few
groups, not 10,000 tuples through each. ``groups_of`` turns per-route changes into groups, for
callers that have them one by one. Pure: no lock, no kernel, no I/O; whoever owns the table
serialises the calls. A path object may be shared by many prefixes: it must not be mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

P = TypeVar("P")


class RouteGroup(NamedTuple):
    peer: str
    prefixes: Sequence[str]  # canonical text (``bgp.model.canonical``), as the speaker has them
    next_hop: str | None  # None: the peer withdrew these paths
    attrs: Mapping[str, Any]  # the UPDATE's path attributes (ExaBGP's JSON); {} when withdrawn


def groups_of(changes: Iterable[tuple[str, str, str | None, bool, Mapping[str, Any]]]) -> list[RouteGroup]:
    """Per-route changes ``(peer, prefix, next hop, withdrawn, attrs)`` as groups, in order:
    consecutive changes of one peer, next hop and attributes object share a group (consecutive
    withdrawals of one peer too, whatever their attributes)."""
    out: list[RouteGroup] = []
    last: tuple[str, str | None, int] | None = None
    for peer, prefix, next_hop, withdrawn, attrs in changes:
        hop = None if withdrawn else next_hop
        key = (peer, hop, 0 if hop is None else id(attrs))
        if key == last:
            out[-1].prefixes.append(prefix)  # type: ignore[attr-defined]
        else:
            out.append(RouteGroup(peer, [prefix], hop, attrs))
            last = key
    return out


def record(table: dict[str, dict[str, P]], groups: Iterable[RouteGroup],
           path_for: Callable[[str, Mapping[str, Any]], P]) -> list[str]:
    """Record ``groups`` in ``table``, in order: an announced group sets the peer's path of each
    of its prefixes to ``path_for(next hop, attrs)`` (called once per group), a withdrawn one
    removes it (and a prefix left without paths). Returns the prefixes touched."""
    touched: list[str] = []
    for peer, prefixes, next_hop, attrs in groups:
        if next_hop is None:
            for prefix in prefixes:
                paths = table.get(prefix)
                if paths is not None:
                    paths.pop(peer, None)
                    if not paths:
                        del table[prefix]
        else:
            path = path_for(next_hop, attrs)
            for prefix in prefixes:
                paths = table.get(prefix)
                if paths is None:
                    table[prefix] = {peer: path}
                else:
                    paths[peer] = path
        touched += prefixes
    return touched
