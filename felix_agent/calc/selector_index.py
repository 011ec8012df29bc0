"""Which endpoints each selector in use matches, and what each IP set holds (Felix's
SelectorAndNamedPortIndex).

Owns the selectors that policies and IP sets reference (reference-counted, each with the snapshot
keys of the endpoints it matches, found through the inverted :class:`~felix_agent.calc.labels.LabelIndex`),
the :class:`~felix_agent.calc.policy.SetSpec` s in use with every endpoint's share of their members
(addresses, or ``address,protocol:port`` for a named port), and the IP sets handed out. It must not
decide which policies apply to an endpoint (``policy_resolver``) or which sets are active
(``active_rules`` says, by counting the active policies that use each): it only resolves members.
Pure: no I/O. An endpoint's change re-evaluates the selectors for that endpoint only.

Network sets (``felix_agent.calc.netsets``) are members as endpoints are: a selector in a rule
matches them by their labels and their nets join the set, within the rule's scope (an unscoped
selector reaches every network set, ``ns:<namespace>`` the NetworkSets of that namespace, a
namespace selector the NetworkSets of the namespaces it matches, and ``global()`` the
GlobalNetworkSets). A change of a network set's nets re-evaluates that one set, so it reaches the
kernel as element updates. A set with network-set members is written collapsed (no overlapping
elements: an nftables interval set refuses them).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Mapping
from itertools import chain
from typing import Protocol

from felix_agent.calc.labels import LabelIndex, parsed
from felix_agent.calc.model import IPSet
from felix_agent.calc.netsets import NetSet
from felix_agent.calc.policy import ALL_NAMESPACES, SetSpec
from felix_agent.calc.workloads import Workloads

Members = tuple[tuple[str, ...], tuple[str, ...]]  # one member's share of a set: IPv4, IPv6 members
GLOBAL = "global()"


class Member(Protocol):
    """What a selector sees of a Workload or a NetSet."""

    @property
    def namespace(self) -> str | None: ...  # None: not namespaced (a GlobalNetworkSet)
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def v4(self) -> tuple[str, ...]: ...
    @property
    def v6(self) -> tuple[str, ...]: ...
    @property
    def ports(self) -> tuple[tuple[str, int, str, int], ...]: ...


class SelectorIndex:
    """Selectors and IP sets in use, kept up to date endpoint by endpoint."""

    def __init__(self, workloads: Workloads) -> None:
        self._workloads = workloads
        self.netsets: dict[str, NetSet] = {}  # by snapshot key
        self._index: LabelIndex[str] = LabelIndex()
        self._selectors: dict[str, set[str]] = {}  # canonical selector → workload keys it matches
        self._selector_refs: Counter[str] = Counter()
        self._specs: dict[str, SetSpec] = {}
        self._spec_refs: Counter[str] = Counter()
        self._members: dict[str, dict[str, Members]] = {}  # set id → workload key → its members
        self.dirty_sets: set[str] = set()  # whose members changed since the last ipsets()
        self._out_ipsets: dict[str, tuple[IPSet, IPSet]] = {}
        self._ipsets: frozenset[IPSet] = frozenset()

    # ---- endpoints ------------------------------------------------------------------------------
    def set_netset(self, key: str, new: NetSet | None) -> None:
        """The network set at ``key`` is now ``new`` (None: deleted)."""
        if new is None:
            self.netsets.pop(key, None)
        else:
            self.netsets[key] = new
        self.set_workload(key, new)

    def set_workload(self, key: str, new: Member | None) -> None:
        """The endpoint (or network set) at ``key`` is now ``new`` (None: deleted): re-evaluate it
        against every selector and set in use."""
        if new is None:
            self._index.remove(key)
        else:
            self._index.add(key, new.labels)
        for text, keys in self._selectors.items():
            if new is not None and parsed(text).matches(new.labels):
                keys.add(key)
            else:
                keys.discard(key)
        for set_id, spec in self._specs.items():
            members = self._members[set_id]
            share = self._share(spec, key, new) if new is not None else None
            if members.get(key) != share:
                if share is None:
                    del members[key]
                else:
                    members[key] = share
                self.dirty_sets.add(set_id)

    # ---- selectors --------------------------------------------------------------------------------
    def matches(self, text: str) -> set[str]:
        """The keys of the endpoints a registered canonical selector matches (do not modify)."""
        return self._selectors[text]

    def register_selector(self, text: str) -> None:
        if not self._selector_refs[text]:
            self._selectors[text] = set(self._index.select(text))
        self._selector_refs[text] += 1

    def release_selector(self, text: str) -> None:
        self._selector_refs[text] -= 1
        if not self._selector_refs[text]:
            del self._selector_refs[text], self._selectors[text]

    # ---- IP sets ----------------------------------------------------------------------------------
    def register_spec(self, spec: SetSpec) -> None:
        set_id = spec.id
        if not self._spec_refs[set_id]:
            self.register_selector(spec.selector)
            self._specs[set_id] = spec
            found = ((k, self._share(spec, k, self._member(k))) for k in self._selectors[spec.selector])
            self._members[set_id] = {k: share for k, share in found if share is not None}
            self.dirty_sets.add(set_id)
        self._spec_refs[set_id] += 1

    def release_spec(self, set_id: str) -> None:
        self._spec_refs[set_id] -= 1
        if not self._spec_refs[set_id]:
            self.release_selector(self._specs.pop(set_id).selector)
            del self._spec_refs[set_id], self._members[set_id]
            self.dirty_sets.add(set_id)

    def _member(self, key: str) -> Member:
        found = self._workloads.by_key.get(key)
        return found if found is not None else self.netsets[key]

    def _share(self, spec: SetSpec, key: str, w: Member) -> Members | None:
        """What ``w`` puts in the set (None: nothing, it is not selected)."""
        if key not in self._selectors[spec.selector] or not self._in_scope(spec.scope, w):
            return None
        if not spec.named_port:
            return (w.v4, w.v6) if w.v4 or w.v6 else None
        names, protocol = spec.port_names, spec.protocol
        ports = [f"{proto}:{port}" for name, number, proto, port in w.ports
                 if name in names and (protocol is None or number == protocol)]
        if not ports:
            return None
        return tuple(f"{a},{p}" for p in ports for a in w.v4), tuple(f"{a},{p}" for p in ports for a in w.v6)

    def _in_scope(self, scope: str, w: Member) -> bool:
        if scope == ALL_NAMESPACES:
            return True
        kind, _, value = scope.partition(":")
        if w.namespace is None:  # a GlobalNetworkSet: only a namespaceSelector of global() reaches it
            return kind == "nssel" and value == GLOBAL
        return w.namespace == value if kind == "ns" else self._workloads.in_namespaces(value, w.namespace)

    # ---- the output -------------------------------------------------------------------------------
    def ipsets(self, active: Mapping[str, int], dirty: set[str]) -> frozenset[IPSet]:
        """The IP sets of the ``active`` set ids; ``dirty`` (set ids whose activity changed) and
        the sets whose members changed are rebuilt, the others handed on as the same objects."""
        removed: list[IPSet] = []
        added: list[IPSet] = []
        for set_id in self.dirty_sets | dirty if dirty else self.dirty_sets:
            old = self._out_ipsets.pop(set_id, None)
            new = self._ipset_pair(set_id) if active.get(set_id, 0) > 0 else None
            if old is not None and new is not None and old == new:
                self._out_ipsets[set_id] = old
                continue
            if old is not None:
                removed += old
            if new is not None:
                self._out_ipsets[set_id] = new
                added += new
        self.dirty_sets = set()
        if removed or added:
            self._ipsets = self._ipsets.difference(removed).union(added)
        return self._ipsets

    def _ipset_pair(self, set_id: str) -> tuple[IPSet, IPSet]:
        """The set's members, one IPSet per IP family (both always exist, so rules can name them)."""
        kind = "named-port" if self._specs[set_id].named_port else "net"
        members = self._members[set_id]
        shares = members.values()
        v4 = frozenset(chain.from_iterable(v4 for v4, _ in shares))
        v6 = frozenset(chain.from_iterable(v6 for _, v6 in shares))
        if self.netsets and any(k in self.netsets for k in members):
            v4, v6 = _collapsed(v4), _collapsed(v6)
        return IPSet(set_id, 4, kind, v4), IPSet(set_id, 6, kind, v6)

    def sources(self, set_id: str, address: str) -> list[str]:
        """The snapshot keys of the members (endpoints, network sets) that put ``address`` in the set
        (whatever its activity), sorted; empty for a set not in use."""
        ip = ipaddress.ip_address(address)
        found = []
        for key, (v4, v6) in self._members.get(set_id, {}).items():
            for text in v4 if ip.version == 4 else v6:
                if ip in ipaddress.ip_network(text.split(",", 1)[0]):
                    found.append(key)
                    break
        return sorted(found)


def _collapsed(members: frozenset[str]) -> frozenset[str]:
    """The members with no element inside or beside another (``10.0.0.0/24`` swallows ``10.0.0.7``),
    full-length prefixes written as bare addresses."""
    if len(members) < 2:
        return members
    parsed = [ipaddress.ip_network(m) for m in members]  # one family: the caller splits them
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = list(
        ipaddress.collapse_addresses(parsed))  # type: ignore[type-var]
    return frozenset(str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n) for n in nets)
