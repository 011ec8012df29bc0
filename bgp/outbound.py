"""What each peer is sent: this node's exports through that peer's export filters, as ExaBGP API
commands. Pure: exports and filters in, commands out; the speaker owns the state and sends.

Without export filters on any session every peer gets the same routes, and one global command
(``announce attributes ...``) serves them all: the fast path, as before filters existed. As soon
as one session has export filters, changes go out per group of sessions that share the same
filters (``neighbor A, neighbor B announce ...``), each group getting only what its filters accept.
A route carries its communities (``Export.communities``), so routes are batched per (next hop,
communities).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from bgp import exabgp
from bgp.filters import Filter, accepts, has_direction
from bgp.model import Export, Peer, canonical

Exports = Mapping[str, Export]  # canonical prefix -> export


def export_filters(peer: Peer | None) -> tuple[Filter, ...]:
    """The filters that matter for what ``peer`` is sent (none when none has export rules)."""
    if peer is None or not has_direction(peer.options.filters, "export"):
        return ()
    return peer.options.filters


def for_peer(filters: Sequence[Filter], exports: Exports) -> dict[str, Export]:
    """The exports that ``filters`` let through to a peer."""
    if not filters:
        return dict(exports)
    return {p: e for p, e in exports.items() if accepts(filters, "export", p)}


def by_route(exports: Iterable[Export]) -> dict[exabgp.Route, list[str]]:
    out: dict[exabgp.Route, list[str]] = {}
    for e in exports:
        out.setdefault((e.next_hop, e.communities), []).append(canonical(e.prefix))
    return out


def diff(old: Exports, new: Exports, peers: Sequence[str] | None = None) -> list[str]:
    """Withdraw what went, announce what is new or changed (to ``peers``; None: every peer)."""
    gone = by_route(e for p, e in old.items() if p not in new)
    added = by_route(e for p, e in new.items() if old.get(p) != e)
    return exabgp.announce(gone, peer=peers, withdraw=True) + exabgp.announce(added, peer=peers)


def changes(old: Exports, new: Exports, peers: Iterable[Peer], established: Iterable[str]) -> list[str]:
    """The commands that take every peer from ``old`` to ``new``. With export filters somewhere,
    only the established sessions are addressed: the others get everything on session up."""
    peers = list(peers)
    if not any(export_filters(p) for p in peers):
        return diff(old, new)
    up = set(established)
    groups: dict[tuple[Filter, ...], list[str]] = {}
    for p in peers:
        if p.address in up:
            groups.setdefault(export_filters(p), []).append(p.address)
    commands: list[str] = []
    for filters, addresses in groups.items():
        commands += diff(for_peer(filters, old), for_peer(filters, new), addresses)
    return commands


def refilter(exports: Exports, address: str, old: Sequence[Filter], new: Sequence[Filter]) -> list[str]:
    """A session's filters changed: withdraw what the new ones reject, announce what they now accept."""
    if tuple(old) == tuple(new):
        return []
    return diff(for_peer(old, exports), for_peer(new, exports), [address])
