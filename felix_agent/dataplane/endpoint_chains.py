"""The endpoint half of the policy table, kept between renders: each local endpoint's two chains,
its elements of the two dispatch maps and the policy chains it uses, updated from the endpoints that
changed rather than rebuilt from all of them.

At 5,000 endpoints a walk of all of them (sorting, visiting each share, building the maps) cost
40-100 ms per new pod on a loaded 2-core machine; a new endpoint here costs its own render plus
a few C-level copies. The part also says which chains it added, replaced or removed since the
previous part (``changed``), which lets the nftables driver diff only those.

Owns that bookkeeping and the endpoints' order (by key, then interface: on a clash of interface or
key the first in that order wins, as a fresh render decides). Must not render a chain itself (the
policy module's function, given at construction) nor touch the kernel.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from felix_agent.calc.model import Endpoint, Policy
from felix_agent.dataplane.nft_ruleset import Chain, Map

log = logging.getLogger(__name__)

RenderPair = Callable[[Endpoint, Mapping[str, Policy]], tuple[Chain, Chain]]  # ingress, egress
INCREMENTAL_UP_TO = 64  # endpoints changed at once; beyond, one walk of all of them is as cheap


@dataclass(frozen=True)
class EndpointPart:
    """The endpoint half of the table: per-endpoint chains, the dispatch maps, the policy chains used,
    and the names of the chains that differ from the previous part (None: not known, diff them all)."""

    chains: tuple[Chain, ...]
    maps: tuple[Map, Map]
    wanted: frozenset[tuple[str, str]]  # (policy id, direction)
    upserted: tuple[Chain, ...] | None = None  # since the previous part (None: not known)
    removed: frozenset[str] = frozenset()  # names of chains gone since the previous part


@dataclass(frozen=True)
class _Share:
    """One endpoint's share of the table, kept while the endpoint object is the same."""

    endpoint: Endpoint
    refs: frozenset[str]  # the policies and profiles it uses that exist
    chains: tuple[Chain, Chain]  # ingress, egress
    to_wl: tuple[str, str]  # its element of each dispatch map
    from_wl: tuple[str, str]
    wanted: frozenset[tuple[str, str]]  # the policy chains it jumps to


class _Clash(Exception):
    """An added endpoint meets another's key or interface: only a full walk orders that."""


class EndpointChains:
    """``update(endpoints, known)`` → the :class:`EndpointPart` for those endpoints and policies."""

    def __init__(self, render_pair: RenderPair, ingress: str, egress: str) -> None:
        self._render_pair = render_pair
        self._ingress, self._egress = ingress, egress
        self._shares: dict[str, _Share] = {}  # by endpoint key: the endpoints rendered
        self._order: list[tuple[str, str]] = []  # their (key, interface), sorted
        self._flat: list[Chain] = []  # their chains in that order, two each
        self._interfaces: dict[str, str] = {}  # interface -> key
        self._to_wl: set[tuple[str, str]] = set()
        self._from_wl: set[tuple[str, str]] = set()
        self._wanted: dict[tuple[str, str], int] = {}  # policy chain -> endpoints using it
        self._clashed = False  # the last full walk skipped an endpoint: stay on full walks
        self._last: tuple[frozenset[Endpoint], frozenset[str], EndpointPart] | None = None

    def update(self, endpoints: frozenset[Endpoint], known: Mapping[str, Policy]) -> EndpointPart:
        ids = frozenset(known)
        last = self._last
        if last is not None and (last[0] is endpoints or last[0] == endpoints) and last[1] == ids:
            quiet = last[2].upserted == () and not last[2].removed
            part = last[2] if quiet else replace(last[2], upserted=(), removed=frozenset())
            self._last = (endpoints, ids, part)
            return part  # the common case of a label change: no endpoint changed
        if last is not None and last[1] == ids and not self._clashed:
            added, removed = endpoints - last[0], last[0] - endpoints
            if len(added) + len(removed) <= INCREMENTAL_UP_TO:
                try:
                    part = self._incremental(added, removed, known)
                except _Clash:
                    pass
                else:
                    self._last = (endpoints, ids, part)
                    return part
        part = self._full(endpoints, known, same_ids=last is not None and last[1] == ids)
        self._last = (endpoints, ids, part)
        return part

    def _incremental(self, added: frozenset[Endpoint], removed: frozenset[Endpoint],
                     known: Mapping[str, Policy]) -> EndpointPart:
        # Checked before anything moves: a clash leaves the state as it was.
        drops = [self._shares.get(ep.key) for ep in removed]
        if any(share is None or share.endpoint is not ep for share, ep in zip(drops, removed, strict=True)):
            raise _Clash  # an endpoint skipped by an earlier clash
        gone_keys = {ep.key for ep in removed}
        gone_interfaces = {ep.interface for ep in removed}
        if len({ep.key for ep in added}) != len(added) or len({ep.interface for ep in added}) != len(added):
            raise _Clash
        for ep in added:
            if (ep.key in self._shares and ep.key not in gone_keys) or (
                    ep.interface in self._interfaces and ep.interface not in gone_interfaces):
                raise _Clash
        dropped: set[str] = set()
        upserted: list[Chain] = []
        old: dict[str, _Share] = {}
        for share in drops:
            if share is not None:
                old[share.endpoint.key] = self._drop(share)
                dropped.update(c.name for c in share.chains)
        for ep in added:
            share = self._share(ep, known, old.get(ep.key))
            self._put(share)
            upserted += share.chains
        return self._part(tuple(upserted), frozenset(dropped - {c.name for c in upserted}))

    def _drop(self, share: _Share) -> _Share:
        ep = share.endpoint
        i = bisect.bisect_left(self._order, (ep.key, ep.interface))
        del self._order[i]
        del self._flat[2 * i:2 * i + 2]
        del self._shares[ep.key]
        del self._interfaces[ep.interface]
        self._to_wl.discard(share.to_wl)
        self._from_wl.discard(share.from_wl)
        for w in share.wanted:
            left = self._wanted[w] - 1
            if left:
                self._wanted[w] = left
            else:
                del self._wanted[w]
        return share

    def _put(self, share: _Share) -> None:
        ep = share.endpoint
        i = bisect.bisect_left(self._order, (ep.key, ep.interface))
        self._order.insert(i, (ep.key, ep.interface))
        self._flat[2 * i:2 * i] = share.chains
        self._shares[ep.key] = share
        self._interfaces[ep.interface] = ep.key
        self._to_wl.add(share.to_wl)
        self._from_wl.add(share.from_wl)
        for w in share.wanted:
            self._wanted[w] = self._wanted.get(w, 0) + 1

    def _part(self, upserted: tuple[Chain, ...] | None, removed: frozenset[str] = frozenset()) -> EndpointPart:
        maps = (Map("to-wl", "ifname", elements=frozenset(self._to_wl)),
                Map("from-wl", "ifname", elements=frozenset(self._from_wl)))
        return EndpointPart(tuple(self._flat), maps, frozenset(self._wanted), upserted, removed)

    def _full(self, endpoints: frozenset[Endpoint], known: Mapping[str, Policy], same_ids: bool) -> EndpointPart:
        """Every endpoint visited (the order and the clash check need them all), but an endpoint
        object seen last time brings its whole share from the cache."""
        previous = self._shares
        self._shares, self._order, self._flat, self._interfaces = {}, [], [], {}
        self._to_wl, self._from_wl, self._wanted = set(), set(), {}
        self._clashed = False
        for ep in sorted(endpoints, key=lambda e: (e.key, e.interface)):
            if ep.interface in self._interfaces or ep.key in self._shares:
                log.warning("endpoint %s on %s clashes with another endpoint: skipped", ep.key, ep.interface)
                self._clashed = True
                continue
            share = previous.get(ep.key)
            if share is None or share.endpoint is not ep or not same_ids:
                share = self._share(ep, known, share)
            # appended in order: _put's bisect finds the end
            self._put(share)
        return self._part(None)

    def _share(self, ep: Endpoint, known: Mapping[str, Policy], cached: _Share | None) -> _Share:
        refs = frozenset(pid for pid in ep.ingress_policies + ep.egress_policies + ep.profiles if pid in known)
        if cached is not None and cached.endpoint == ep and cached.refs == refs:
            pair = cached.chains
        else:
            pair = self._render_pair(ep, known)
        wanted = frozenset([*((pid, self._ingress) for pid in ep.ingress_policies + ep.profiles if pid in known),
                            *((pid, self._egress) for pid in ep.egress_policies + ep.profiles if pid in known)])
        return _Share(ep, refs, pair, (f'"{ep.interface}"', f"goto {pair[0].name}"),
                      (f'"{ep.interface}"', f"goto {pair[1].name}"), wanted)
