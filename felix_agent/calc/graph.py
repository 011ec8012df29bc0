"""The calculation graph: everything ``node``'s dataplane must hold, from one datastore view.

Pure: no pyroute2, no etcd, no I/O. :class:`Calculator` keeps what it derived last time and, given
the next snapshot, works only on the keys whose values changed (values in a snapshot are shared and
never mutated, so "changed" is an identity test): a label change re-evaluates the selectors for that
one endpoint and touches the IP sets it enters or leaves and, if its policies change, its own
endpoint; a policy change touches the endpoints it selects. Unchanged outputs are handed on as the
very objects handed out last time, so the managers' "did my part change?" is an identity test too.
The result is always the same as :func:`compute`, which starts from nothing (the unit tests hold the
two to that). A change of a Profile (namespace labels, labels to apply, profile rules) starts over.

What it decides, in Calico's terms:

- **Local endpoints** are the WorkloadEndpoints whose ``spec.node`` is ``node``. Every endpoint's
  labels are its own labels over those its profiles apply: its namespace's labels prefixed
  ``pcns.`` (``datastore.namespaces``: the ``kns.<namespace>`` profile's ``labelsToApply``, and
  ``kubernetes.io/metadata.name`` even when that profile does not exist), any other profile
  it lists (and ``net.<network>``, see below) as they are.
- **Policies**: a NetworkPolicy applies to the endpoints of its namespace its selector matches; a
  GlobalNetworkPolicy to those its selector matches anywhere (within its ``namespaceSelector``,
  matched against the namespaces' ``kns.*`` labels, when it has one). Each endpoint lists them in
  ``order_key`` order, per direction by ``types``. Only policies that apply to some local endpoint,
  and the IP sets their rules reference, are output (Calico's ActiveRulesCalculator).
- **Profiles, and the network's profile.** After its policies (or alone, when none selects it in a
  direction) an endpoint is governed by its profiles: those it lists that exist and have rules
  (normally ``kns.<namespace>``), then last ``pro/net.<network>``, which allows ingress from the
  endpoints of the same network and any egress. That last profile is what makes a network "open
  within itself unless policy says otherwise" (Calico's non-Kubernetes CNI gives each network a
  profile of that shape): it is synthesised rather than stored, so no component has to create it
  and a network exists as soon as one endpoint names it; and being a profile, it stops counting the
  moment a policy selects the endpoint in a direction (Calico's default deny). An operator who
  wants another default stores a Profile named ``net.<network>``: it replaces the synthesised one
  (one without rules makes the network closed by default).
- **IP sets** (``felix_agent.calc.policy``): one per canonical selector and scope and IP family,
  members resolved against every endpoint of every node (``felix_agent.calc.labels``).
- **Routes and tunnels** (``felix_agent.calc.routes``), NAT-outgoing pools, whether IPIP is used;
  recomputed only when pools, nodes, blocks, affinities or the local endpoints' addresses change.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from datastore import namespaces
from datastore.model import Resource
from datastore.policy import PROTOCOLS, order_key
from felix_agent.calc.labels import LabelIndex, canonical, parsed
from felix_agent.calc.model import DesiredState, Endpoint, IPSet, Policy
from felix_agent.calc.policy import ALL_NAMESPACES, SetSpec, SetTable, convert, network_profile, policy_id
from felix_agent.calc.routes import Routing, routing
from felix_agent.calc.snapshot import (
    AFFINITY,
    BLOCK,
    GLOBAL_NETWORK_POLICY,
    IPPOOL,
    NETWORK_POLICY,
    NODE,
    PROFILE,
    WORKLOAD_ENDPOINT,
    Snapshot,
)

NAMESPACE_PROFILE = namespaces.PROFILE_PREFIX
NAMESPACE_LABEL_PREFIX = namespaces.LABEL_PREFIX
NETWORK_PROFILE = "net."
_PROTOCOL_NAMES = {name.lower(): (number, name.lower()) for name, number in PROTOCOLS.items()}
_ROUTING_KINDS = (IPPOOL, NODE, BLOCK, AFFINITY)
Members = tuple[tuple[str, ...], tuple[str, ...]]  # one endpoint's share of a set: IPv4, IPv6 members


@functools.lru_cache(maxsize=65536)
def _address(text: str) -> tuple[int, str, str]:
    """An ipNetworks entry → (version, IP-set member, host route destination)."""
    iface = ipaddress.ip_interface(text)
    host = iface.network.prefixlen == iface.max_prefixlen
    return iface.version, str(iface.ip) if host else str(iface.network), f"{iface.ip}/{iface.max_prefixlen}"


@dataclass(frozen=True)
class _Workload:
    key: str  # "<namespace>/<name>"
    namespace: str
    resource: Resource
    labels: Mapping[str, str]
    addresses: tuple[tuple[int, str, str], ...]  # see _address
    v4: tuple[str, ...]  # IP-set members, per family
    v6: tuple[str, ...]
    ports: tuple[tuple[str, int, str, int], ...]  # named ports: (name, protocol number and name, port)
    local: bool


@dataclass
class _PolicyEntry:
    """A NetworkPolicy or GlobalNetworkPolicy, converted, and the local endpoints it selects."""

    pid: str
    order: tuple[float, str]
    selector: str  # canonical
    namespace: str | None  # a NetworkPolicy's own namespace
    namespace_selector: str | None  # a GlobalNetworkPolicy's, canonical
    ingress: bool
    egress: bool
    selected: set[str] = field(default_factory=set)  # snapshot keys of local workloads


@dataclass
class _Local:
    """A local endpoint's inputs: the policies selecting it and its profile ids."""

    policies: set[str]
    profiles: tuple[str, ...]


def compute(snapshot: Snapshot, node: str, *, bgp_owns_remote: bool = False) -> DesiredState:
    """Everything ``node``'s dataplane must hold, computed from nothing."""
    return Calculator(node, bgp_owns_remote=bgp_owns_remote).compute(snapshot)


class Calculator:
    """``compute(snapshot)`` again and again; each call costs what changed since the last one."""

    def __init__(self, node: str, *, bgp_owns_remote: bool = False) -> None:
        self.node = node
        self.bgp_owns_remote = bgp_owns_remote  # see felix_agent.calc.routes
        self._tables: dict[str, dict[str, Any]] = {}
        self._clear()

    def _clear(self) -> None:
        self._tables = {}
        self._profiles: dict[str, Resource] = {}
        self._ns_labels: dict[str, Mapping[str, str]] = {}
        self._workloads: dict[str, _Workload] = {}
        self._index: LabelIndex[str] = LabelIndex()
        self._selectors: dict[str, set[str]] = {}  # canonical selector → workload keys it matches
        self._selector_refs: Counter[str] = Counter()
        self._specs: dict[str, SetSpec] = {}
        self._spec_refs: Counter[str] = Counter()
        self._members: dict[str, dict[str, Members]] = {}  # set id → workload key → its members
        self._entries: dict[str, _PolicyEntry] = {}  # by snapshot key
        self._by_pid: dict[str, _PolicyEntry] = {}
        self._rules: dict[str, tuple[Policy, tuple[str, ...]]] = {}  # pid → rules and the set ids they use
        self._local: dict[str, _Local] = {}  # by snapshot key
        self._users: Counter[str] = Counter()  # pid → local endpoints it applies to
        self._set_users: Counter[str] = Counter()  # set id → active policies using it
        self._ns_scope: dict[tuple[str, str], bool] = {}
        # outputs and what must be rebuilt in them
        self._out_endpoints: dict[str, Endpoint] = {}
        self._out_policies: dict[str, Policy] = {}
        self._out_ipsets: dict[str, tuple[IPSet, IPSet]] = {}
        self._endpoints: frozenset[Endpoint] = frozenset()
        self._policies: frozenset[Policy] = frozenset()
        self._ipsets: frozenset[IPSet] = frozenset()
        self._dirty_endpoints: set[str] = set()
        self._dirty_pids: set[str] = set()
        self._dirty_sets: set[str] = set()
        self._routing: Routing | None = None
        self._routing_dirty = True

    # ---- the one entry point ----------------------------------------------------------------------
    def compute(self, snapshot: Snapshot) -> DesiredState:
        changed = {kind: _changed(self._tables.get(kind, {}), table) for kind, table in snapshot.tables.items()}
        if changed.get(PROFILE):
            self._clear()  # profiles feed every endpoint's labels and the namespaces' labels: start over
            changed = {kind: list(table) for kind, table in snapshot.tables.items()}
            self._profiles = {p.name: p for p in snapshot.profiles.values()}
            self._ns_labels = {name[len(NAMESPACE_PROFILE):]: namespaces.namespace_labels(
                name[len(NAMESPACE_PROFILE):], p.spec.labels_to_apply)
                for name, p in self._profiles.items() if name.startswith(NAMESPACE_PROFILE)}
        self._tables = {kind: dict(table) for kind, table in snapshot.tables.items()}
        # Endpoints first: a policy added after them finds its selector's matches in the label index.
        for key in changed.get(WORKLOAD_ENDPOINT, ()):
            self._set_workload(key, snapshot.endpoints.get(key))
        for kind in (NETWORK_POLICY, GLOBAL_NETWORK_POLICY):
            for key in changed.get(kind, ()):
                self._set_policy(key, snapshot.tables[kind].get(key))
        if any(changed.get(kind) for kind in _ROUTING_KINDS):
            self._routing_dirty = True
        return self._state(snapshot)

    # ---- endpoints --------------------------------------------------------------------------------
    def _set_workload(self, key: str, resource: Resource | None) -> None:
        old = self._workloads.pop(key, None)
        new = self._workload(resource) if resource is not None else None
        if new is None:
            self._index.remove(key)
        else:
            self._workloads[key] = new
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
                self._dirty_sets.add(set_id)
        if old is not None and old.local:
            self._drop_local(key)
        if new is not None and new.local:
            self._add_local(key, new)
        if (old is not None and old.local) or (new is not None and new.local):
            self._dirty_endpoints.add(key)
            if old is None or new is None or old.local != new.local or old.addresses != new.addresses \
                    or old.resource.spec.interface_name != new.resource.spec.interface_name:
                self._routing_dirty = True

    def _workload(self, resource: Resource) -> _Workload:
        namespace = resource.namespace or "default"
        spec = resource.spec
        labels: dict[str, str] = {}
        own_ns_profile = NAMESPACE_PROFILE + namespace
        for name in (*spec.profiles, NETWORK_PROFILE + spec.network if spec.network else ""):
            profile = self._profiles.get(name)
            if profile is not None and name != own_ns_profile:
                labels.update(profile.spec.labels_to_apply)
        labels.update({NAMESPACE_LABEL_PREFIX + k: v for k, v in self._namespace_labels(namespace).items()})
        labels.update(resource.metadata.labels)  # the endpoint's own labels win
        addresses = tuple(_address(a) for a in spec.ip_networks)
        ports = tuple((p.name, *_PROTOCOL_NAMES[p.protocol.lower()], p.port) for p in spec.ports
                      if p.protocol.lower() in _PROTOCOL_NAMES)
        return _Workload(f"{namespace}/{resource.name}", namespace, resource, labels, addresses,
                         tuple(m for v, m, _ in addresses if v == 4), tuple(m for v, m, _ in addresses if v == 6),
                         ports, spec.node == self.node)

    def _add_local(self, key: str, w: _Workload) -> None:
        local = _Local(set(), self._profiles_of(w))
        for entry in self._entries.values():
            if key in self._selectors[entry.selector] and self._policy_scope(entry, w):
                entry.selected.add(key)
                local.policies.add(entry.pid)
        self._local[key] = local
        for pid in (*local.policies, *local.profiles):
            self._use(pid, 1)

    def _drop_local(self, key: str) -> None:
        local = self._local.pop(key)
        for pid in local.policies:
            self._by_pid[pid].selected.discard(key)
        for pid in (*local.policies, *local.profiles):
            self._use(pid, -1)

    def _profiles_of(self, w: _Workload) -> tuple[str, ...]:
        """The endpoint's profile ids in order: those it lists (and its namespace's) that exist and have
        rules, then its network's."""
        network = w.resource.spec.network
        network_name = NETWORK_PROFILE + network if network else None
        ids = []
        for name in dict.fromkeys((*w.resource.spec.profiles, NAMESPACE_PROFILE + w.namespace)):
            profile = self._profiles.get(name)
            if profile is None or name == network_name or not (profile.spec.ingress or profile.spec.egress):
                continue
            ids.append(self._profile_rules(policy_id(profile), lambda sets, p=profile: convert(p, sets)))
        if network_name is not None:
            stored = self._profiles.get(network_name)
            if stored is None:
                ids.append(self._profile_rules(f"pro/{network_name}",
                                               lambda sets, n=network: network_profile(n, sets)))
            elif stored.spec.ingress or stored.spec.egress:
                ids.append(self._profile_rules(f"pro/{network_name}", lambda sets, p=stored: convert(p, sets)))
        return tuple(ids)

    def _profile_rules(self, pid: str, make: Any) -> str:
        """A profile's rules, converted once until profiles change (which starts everything over)."""
        if pid not in self._rules:
            sets = SetTable()
            self._rules[pid] = (make(sets), tuple(sets.specs))
            for spec in sets.specs.values():
                self._register_spec(spec)
        return pid

    # ---- policies ---------------------------------------------------------------------------------
    def _set_policy(self, key: str, resource: Resource | None) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            del self._by_pid[old.pid]
            for k in old.selected:
                self._local[k].policies.discard(old.pid)
                self._use(old.pid, -1)
                self._dirty_endpoints.add(k)
            self._release_selector(old.selector)
            for set_id in self._rules.pop(old.pid)[1]:
                self._release_spec(set_id)
        if resource is None:
            return
        spec = resource.spec
        sets = SetTable()
        pid = policy_id(resource)
        self._rules[pid] = (convert(resource, sets), tuple(sets.specs))
        for set_spec in sets.specs.values():
            self._register_spec(set_spec)
        namespaced = resource.kind.NAMESPACED
        entry = _PolicyEntry(
            pid=pid, order=order_key(resource), selector=canonical(spec.selector),
            namespace=(resource.namespace or "") if namespaced else None,
            namespace_selector=canonical(spec.namespace_selector)
            if not namespaced and spec.namespace_selector else None,
            ingress=spec.applies_to("Ingress"), egress=spec.applies_to("Egress"))
        self._entries[key] = self._by_pid[pid] = entry
        self._register_selector(entry.selector)
        for k in self._selectors[entry.selector]:
            if k in self._local and self._policy_scope(entry, self._workloads[k]):
                entry.selected.add(k)
                self._local[k].policies.add(pid)
                self._use(pid, 1)
                self._dirty_endpoints.add(k)

    def _policy_scope(self, entry: _PolicyEntry, w: _Workload) -> bool:
        if entry.namespace is not None:
            return w.namespace == entry.namespace
        if entry.namespace_selector is not None:
            return self._in_namespaces(entry.namespace_selector, w.namespace)
        return True

    def _namespace_labels(self, namespace: str) -> Mapping[str, str]:
        """A namespace without a ``kns.`` profile has its name label only (cached until the
        profiles change, which rebuilds ``_ns_labels``)."""
        labels = self._ns_labels.get(namespace)
        if labels is None:
            labels = self._ns_labels[namespace] = namespaces.namespace_labels(namespace)
        return labels

    def _in_namespaces(self, selector: str, namespace: str) -> bool:
        """Whether the namespace's labels match ``selector``; ``global()`` means non-namespaced
        endpoints: none here."""
        found = self._ns_scope.get((selector, namespace))
        if found is None:
            sel = parsed(selector)
            found = str(sel) != "global()" and sel.matches(self._namespace_labels(namespace))
            self._ns_scope[(selector, namespace)] = found
        return found

    def _use(self, pid: str, delta: int) -> None:
        """``delta`` local endpoints more (or fewer) use ``pid``; a policy in use is output, with its sets."""
        before = self._users[pid]
        after = before + delta
        if after:
            self._users[pid] = after
        else:
            del self._users[pid]
        if (before == 0) == (after == 0):
            return
        self._dirty_pids.add(pid)
        for set_id in self._rules[pid][1]:
            self._set_users[set_id] += delta
            if not self._set_users[set_id]:
                del self._set_users[set_id]
            self._dirty_sets.add(set_id)

    # ---- selectors and IP sets ----------------------------------------------------------------------
    def _register_selector(self, text: str) -> None:
        if not self._selector_refs[text]:
            self._selectors[text] = set(self._index.select(text))
        self._selector_refs[text] += 1

    def _release_selector(self, text: str) -> None:
        self._selector_refs[text] -= 1
        if not self._selector_refs[text]:
            del self._selector_refs[text], self._selectors[text]

    def _register_spec(self, spec: SetSpec) -> None:
        set_id = spec.id
        if not self._spec_refs[set_id]:
            self._register_selector(spec.selector)
            self._specs[set_id] = spec
            found = ((k, self._share(spec, k, self._workloads[k])) for k in self._selectors[spec.selector])
            self._members[set_id] = {k: share for k, share in found if share is not None}
            self._dirty_sets.add(set_id)
        self._spec_refs[set_id] += 1

    def _release_spec(self, set_id: str) -> None:
        self._spec_refs[set_id] -= 1
        if not self._spec_refs[set_id]:
            self._release_selector(self._specs.pop(set_id).selector)
            del self._spec_refs[set_id], self._members[set_id]
            self._dirty_sets.add(set_id)

    def _share(self, spec: SetSpec, key: str, w: _Workload) -> Members | None:
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

    def _in_scope(self, scope: str, w: _Workload) -> bool:
        if scope == ALL_NAMESPACES:
            return True
        kind, _, value = scope.partition(":")
        return w.namespace == value if kind == "ns" else self._in_namespaces(value, w.namespace)

    # ---- the output -------------------------------------------------------------------------------
    def _state(self, snapshot: Snapshot) -> DesiredState:
        self._endpoints = self._rebuild_endpoints()
        self._policies = _replace(self._policies, self._out_policies, self._dirty_pids,
                                  lambda pid: self._rules[pid][0] if pid in self._users else None)
        self._dirty_pids = set()
        self._ipsets = self._rebuild_ipsets()
        if self._routing_dirty or self._routing is None:
            addresses = [(a, e.interface) for e in self._out_endpoints.values() for a in e.addresses]
            self._routing = routing(snapshot, self.node, addresses, bgp_owns_remote=self.bgp_owns_remote)
            self._routing_dirty = False
        pools = list(snapshot.ippools.values())
        return DesiredState(
            node=self.node,
            endpoints=self._endpoints,
            policies=self._policies,
            ipsets=self._ipsets,
            routes=self._routing.routes,
            vxlan_peers=self._routing.vxlan_peers,
            local_vtep=self._routing.local_vtep,
            ipip_enabled=self._routing.ipip_enabled,
            nat_pools=frozenset(p.spec.cidr for p in pools if p.spec.nat_outgoing),
            all_pools=frozenset(p.spec.cidr for p in pools),
            mtu=None,
        )

    def _rebuild_endpoints(self) -> frozenset[Endpoint]:
        def endpoint(key: str) -> Endpoint | None:
            local = self._local.get(key)
            if local is None:
                return None
            w = self._workloads[key]
            ordered = sorted((self._by_pid[pid] for pid in local.policies), key=lambda e: e.order)
            return Endpoint(
                key=w.key,
                interface=w.resource.spec.interface_name,
                addresses=tuple(route for _, _, route in w.addresses),
                ingress_policies=tuple(e.pid for e in ordered if e.ingress),
                egress_policies=tuple(e.pid for e in ordered if e.egress),
                profiles=local.profiles,
            )

        result = _replace(self._endpoints, self._out_endpoints, self._dirty_endpoints, endpoint)
        self._dirty_endpoints = set()
        return result

    def _rebuild_ipsets(self) -> frozenset[IPSet]:
        removed: list[IPSet] = []
        added: list[IPSet] = []
        for set_id in self._dirty_sets:
            old = self._out_ipsets.pop(set_id, None)
            new = self._ipset_pair(set_id) if self._set_users[set_id] > 0 else None
            if old is not None and new is not None and old == new:
                self._out_ipsets[set_id] = old
                continue
            if old is not None:
                removed += old
            if new is not None:
                self._out_ipsets[set_id] = new
                added += new
        self._dirty_sets = set()
        if not removed and not added:
            return self._ipsets
        return self._ipsets.difference(removed).union(added)

    def _ipset_pair(self, set_id: str) -> tuple[IPSet, IPSet]:
        """The set's members, one IPSet per IP family (both always exist, so rules can name them)."""
        kind = "named-port" if self._specs[set_id].named_port else "net"
        shares = self._members[set_id].values()
        return (IPSet(set_id, 4, kind, frozenset(chain.from_iterable(v4 for v4, _ in shares))),
                IPSet(set_id, 6, kind, frozenset(chain.from_iterable(v6 for _, v6 in shares))))


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose value is not the very object it was (added, replaced or deleted)."""
    found = [key for key, value in new.items() if old.get(key) is not value]
    if len(old) + len(found) != len(new):  # something was deleted too
        found += [key for key in old if key not in new]
    return found


def _replace(current: frozenset[Any], out: dict[str, Any], dirty: Iterable[str], make: Any) -> frozenset[Any]:
    """``current`` with the dirty keys' values remade by ``make`` (None: gone); an unchanged value keeps
    its object, and a set without changes is returned as is (so that consumers can test identity)."""
    removed, added = [], []
    for key in dirty:
        old = out.pop(key, None)
        new = make(key)
        if old is not None and new is not None and old == new:
            out[key] = old
            continue
        if old is not None:
            removed.append(old)
        if new is not None:
            out[key] = new
            added.append(new)
    if not removed and not added:
        return current
    return current.difference(removed).union(added)
