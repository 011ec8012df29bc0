"""The endpoint half of the policy table, kept between renders: the shared chains of the local
endpoints' policy lists (one per distinct (direction, policies, profiles), counted by the endpoints
that use it), each endpoint's elements of the two dispatch maps (its interface → ``goto`` its lists'
chains) and the policy chains those lists jump to, updated from the endpoints that changed rather
than rebuilt from all of them.

At 5,000 endpoints a walk of all of them (sorting, visiting each share, building the maps) cost
40-100 ms per new pod on a loaded 2-core machine; a new endpoint here costs two map elements, plus
a chain only when its list is new. The part also says which chains it added, replaced or removed
since the previous part (``upserted``/``removed``), which lets the nftables driver diff only those.

Owns that bookkeeping, the chains' order (by name) and the endpoints' precedence (by key, then
interface: on a clash of interface or key the first in that order wins, as a fresh render decides).
Must not say what a chain holds or what it is called (``felix_agent.dataplane.policy_lists``) nor
touch the kernel.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

from felix_agent.calc.model import Endpoint, Policy
from felix_agent.dataplane.nft_ruleset import Chain, Map
from felix_agent.dataplane.policy_lists import endpoint_lists, list_chain, render_list

log = logging.getLogger(__name__)

ListKey = tuple[str, tuple[str, ...], tuple[str, ...]]  # direction, policies, profiles
INCREMENTAL_UP_TO = 64  # endpoints changed at once; beyond, one walk of all of them is as cheap


@dataclass(frozen=True)
class EndpointPart:
    """The endpoint half of the table: the list chains, the dispatch maps, the policy chains used,
    and the names of the chains that differ from the previous part (None: not known, diff them all)."""

    chains: tuple[Chain, ...]
    maps: tuple[Map, Map]
    wanted: frozenset[tuple[str, str]]  # (policy id, direction)
    upserted: tuple[Chain, ...] | None = None  # since the previous part (None: not known)
    removed: frozenset[str] = frozenset()  # names of chains gone since the previous part


@dataclass
class _List:
    """One shared chain and how many endpoints use it."""

    chain: Chain
    refs: frozenset[str]  # the ids of the list the agent had when the chain was rendered
    wanted: frozenset[tuple[str, str]]  # the policy chains it jumps to
    users: int = 0


@dataclass(frozen=True)
class _Share:
    """One endpoint's share of the table, kept while the endpoint object is the same."""

    endpoint: Endpoint
    lists: tuple[ListKey, ListKey]  # ingress, egress
    to_wl: tuple[str, str]  # its element of each dispatch map
    from_wl: tuple[str, str]


class _Clash(Exception):
    """An added endpoint meets another's key or interface: only a full walk orders that."""


class EndpointChains:
    """``update(endpoints, known)`` → the :class:`EndpointPart` for those endpoints and policies."""

    def __init__(self) -> None:
        self._shares: dict[str, _Share] = {}  # by endpoint key: the endpoints rendered
        self._interfaces: dict[str, str] = {}  # interface -> key
        self._to_wl: set[tuple[str, str]] = set()
        self._from_wl: set[tuple[str, str]] = set()
        self._lists: dict[ListKey, _List] = {}  # the lists in use
        self._names: list[str] = []  # their chains' names, sorted
        self._chains: list[Chain] = []  # their chains, in that order
        self._wanted: dict[tuple[str, str], int] = {}  # policy chain -> lists using it
        self._frozen: tuple[tuple[Chain, ...], frozenset[tuple[str, str]]] | None = None  # of the above
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
        part = self._full(endpoints, known)
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
        unused: list[ListKey] = []
        for share in drops:
            if share is not None:
                unused += self._drop(share)
        upserted: list[Chain] = []
        for ep in added:
            upserted += self._put(self._share(ep, self._shares.get(ep.key)), known, None)
        # A list left by one endpoint and taken by another in the same update keeps its chain.
        removed_names = frozenset(self._forget(key) for key in unused if self._lists[key].users == 0)
        return self._part(tuple(upserted), removed_names)

    def _drop(self, share: _Share) -> list[ListKey]:
        """Take an endpoint out; the lists it left without users (still counted until ``_forget``)."""
        ep = share.endpoint
        del self._shares[ep.key]
        del self._interfaces[ep.interface]
        self._to_wl.discard(share.to_wl)
        self._from_wl.discard(share.from_wl)
        unused = []
        for key in share.lists:
            entry = self._lists[key]
            entry.users -= 1
            if not entry.users:
                unused.append(key)
        return unused

    def _put(self, share: _Share, known: Mapping[str, Policy],
             previous: dict[ListKey, _List] | None) -> list[Chain]:
        """Add an endpoint; the chains of the lists it is the first to use. ``previous`` (a full
        walk's): the lists before it, whose chains are reused when the same ids are known; the names
        are sorted once at the end of the walk instead of on each insertion."""
        ep = share.endpoint
        self._shares[ep.key] = share
        self._interfaces[ep.interface] = ep.key
        self._to_wl.add(share.to_wl)
        self._from_wl.add(share.from_wl)
        created = []
        for key in share.lists:
            entry = self._lists.get(key)
            if entry is None:
                entry = self._lists[key] = self._new_list(key, known, previous)
                for w in entry.wanted:
                    self._wanted[w] = self._wanted.get(w, 0) + 1
                if previous is None:
                    i = bisect.bisect_left(self._names, entry.chain.name)
                    self._names.insert(i, entry.chain.name)
                    self._chains.insert(i, entry.chain)
                self._frozen = None
                created.append(entry.chain)
            entry.users += 1
        return created

    def _forget(self, key: ListKey) -> str:
        """Drop a list no endpoint uses any more; its chain's name."""
        entry = self._lists.pop(key)
        name = entry.chain.name
        i = bisect.bisect_left(self._names, name)
        del self._names[i], self._chains[i]
        for w in entry.wanted:
            left = self._wanted[w] - 1
            if left:
                self._wanted[w] = left
            else:
                del self._wanted[w]
        self._frozen = None
        return name

    def _new_list(self, key: ListKey, known: Mapping[str, Policy], previous: dict[ListKey, _List] | None) -> _List:
        direction, policies, profiles = key
        refs = frozenset(pid for pid in policies + profiles if pid in known)
        cached = previous.get(key) if previous is not None else None
        chain = cached.chain if cached is not None and cached.refs == refs else render_list(*key, known)
        return _List(chain, refs, frozenset((pid, direction) for pid in refs))

    def _part(self, upserted: tuple[Chain, ...] | None, removed: frozenset[str] = frozenset()) -> EndpointPart:
        if self._frozen is None:
            self._frozen = (tuple(self._chains), frozenset(self._wanted))
        maps = (Map("to-wl", "ifname", elements=frozenset(self._to_wl)),
                Map("from-wl", "ifname", elements=frozenset(self._from_wl)))
        return EndpointPart(self._frozen[0], maps, self._frozen[1], upserted, removed)

    def _full(self, endpoints: frozenset[Endpoint], known: Mapping[str, Policy]) -> EndpointPart:
        """Every endpoint visited (the precedence and the clash check need them all), but an endpoint
        object seen last time brings its share from the cache, and a list its chain."""
        previous_shares, previous_lists = self._shares, self._lists
        self._shares, self._interfaces, self._to_wl, self._from_wl = {}, {}, set(), set()
        self._lists, self._wanted, self._frozen = {}, {}, None
        self._clashed = False
        for ep in sorted(endpoints, key=lambda e: (e.key, e.interface)):
            if ep.interface in self._interfaces or ep.key in self._shares:
                log.warning("endpoint %s on %s clashes with another endpoint: skipped", ep.key, ep.interface)
                self._clashed = True
                continue
            self._put(self._share(ep, previous_shares.get(ep.key)), known, previous_lists)
        self._chains = sorted((entry.chain for entry in self._lists.values()), key=lambda c: c.name)
        self._names = [c.name for c in self._chains]
        return self._part(None)

    def _share(self, ep: Endpoint, cached: _Share | None) -> _Share:
        if cached is not None and cached.endpoint is ep:
            return cached
        lists = endpoint_lists(ep)
        to_chain, from_chain = (list_chain(*key) for key in lists)
        return _Share(ep, lists, (f'"{ep.interface}"', f"goto {to_chain}"), (f'"{ep.interface}"', f"goto {from_chain}"))
