"""Which policies and profiles govern each local endpoint, in order (Felix's PolicyResolver).

Owns the policies' selection (a NetworkPolicy applies to the endpoints of its namespace its selector
matches; a GlobalNetworkPolicy to those its selector matches anywhere, within its
``namespaceSelector`` when it has one), each local endpoint's policies listed in ``order_key``
order per direction by ``types``, its profiles (those it lists that exist and have rules, normally
``kns.<namespace>``, then last ``pro/net.<network>``, synthesised when no Profile of that name is
stored), and the :class:`~felix_agent.calc.model.Endpoint` s handed out. It must not convert rules
or resolve IP-set members: it tells :class:`~felix_agent.calc.active_rules.ActiveRules` how many
local endpoints use each policy, and asks the
:class:`~felix_agent.calc.selector_index.SelectorIndex` which endpoints a selector matches. Pure: no
I/O.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from datastore.model import Resource
from datastore.policy import order_key
from felix_agent.calc.active_rules import ActiveRules
from felix_agent.calc.labels import canonical
from felix_agent.calc.model import Endpoint
from felix_agent.calc.outputs import Outputs
from felix_agent.calc.policy import convert, network_profile, policy_id
from felix_agent.calc.selector_index import SelectorIndex
from felix_agent.calc.workloads import NAMESPACE_PROFILE, NETWORK_PROFILE, Workload, Workloads


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
    host_only: bool = False  # preDNAT and doNotTrack policies apply to host endpoints only (Calico)
    selected: set[str] = field(default_factory=set)  # snapshot keys of local workloads


@dataclass
class _Local:
    """A local endpoint's inputs: the policies selecting it and its profile ids."""

    policies: set[str]
    profiles: tuple[str, ...]


class PolicyResolver:
    """Policies → the local endpoints they select, and each local endpoint's ordered policy list."""

    def __init__(self, workloads: Workloads, index: SelectorIndex, rules: ActiveRules) -> None:
        self._workloads = workloads
        self._index = index
        self._rules = rules
        self._entries: dict[str, _PolicyEntry] = {}  # by snapshot key
        self._by_pid: dict[str, _PolicyEntry] = {}
        self._local: dict[str, _Local] = {}  # by snapshot key
        self._dirty: set[str] = set()  # endpoints to rebuild
        self._out: Outputs[Endpoint] = Outputs()

    # ---- endpoints --------------------------------------------------------------------------------
    def add_local(self, key: str, w: Workload) -> None:
        """A local endpoint appeared (or changed: after :meth:`drop_local`)."""
        local = _Local(set(), self._profiles_of(w))
        for entry in self._entries.values():
            if not entry.host_only and key in self._index.matches(entry.selector) and self._policy_scope(entry, w):
                entry.selected.add(key)
                local.policies.add(entry.pid)
        self._local[key] = local
        for pid in (*local.policies, *local.profiles):
            self._rules.use(pid, 1)
        self._dirty.add(key)

    def drop_local(self, key: str) -> None:
        local = self._local.pop(key)
        for pid in local.policies:
            self._by_pid[pid].selected.discard(key)
        for pid in (*local.policies, *local.profiles):
            self._rules.use(pid, -1)
        self._dirty.add(key)

    def _profiles_of(self, w: Workload) -> tuple[str, ...]:
        """The endpoint's profile ids in order: those it lists (and its namespace's) that exist and have
        rules, then its network's."""
        profiles = self._workloads.profiles
        network = w.resource.spec.network
        network_name = NETWORK_PROFILE + network if network else None
        ids = []
        for name in dict.fromkeys((*w.resource.spec.profiles, NAMESPACE_PROFILE + w.namespace)):
            profile = profiles.get(name)
            if profile is None or name == network_name or not (profile.spec.ingress or profile.spec.egress):
                continue
            ids.append(self._rules.profile(policy_id(profile), functools.partial(convert, profile)))
        if network_name is not None:
            stored = profiles.get(network_name)
            if stored is None:
                ids.append(self._rules.profile(f"pro/{network_name}", functools.partial(network_profile, network)))
            elif stored.spec.ingress or stored.spec.egress:
                ids.append(self._rules.profile(f"pro/{network_name}", functools.partial(convert, stored)))
        return tuple(ids)

    # ---- policies ---------------------------------------------------------------------------------
    def set_policy(self, key: str, resource: Resource | None) -> None:
        """The NetworkPolicy or GlobalNetworkPolicy at ``key`` is now ``resource`` (None: deleted)."""
        old = self._entries.pop(key, None)
        if old is not None:
            del self._by_pid[old.pid]
            for k in old.selected:
                self._local[k].policies.discard(old.pid)
                self._rules.use(old.pid, -1)
                self._dirty.add(k)
            self._index.release_selector(old.selector)
            self._rules.remove_policy(old.pid)
        if resource is None:
            return
        spec = resource.spec
        pid = self._rules.add_policy(resource)
        namespaced = resource.kind.NAMESPACED
        entry = _PolicyEntry(
            pid=pid, order=order_key(resource), selector=canonical(spec.selector),
            namespace=(resource.namespace or "") if namespaced else None,
            namespace_selector=canonical(spec.namespace_selector)
            if not namespaced and spec.namespace_selector else None,
            ingress=spec.applies_to("Ingress"), egress=spec.applies_to("Egress"),
            host_only=bool(getattr(spec, "pre_dnat", None) or getattr(spec, "do_not_track", None)))
        self._entries[key] = self._by_pid[pid] = entry
        self._index.register_selector(entry.selector)
        workloads = self._workloads.by_key
        for k in () if entry.host_only else self._index.matches(entry.selector):
            if k in self._local and self._policy_scope(entry, workloads[k]):
                entry.selected.add(k)
                self._local[k].policies.add(pid)
                self._rules.use(pid, 1)
                self._dirty.add(k)

    def _policy_scope(self, entry: _PolicyEntry, w: Workload) -> bool:
        if entry.namespace is not None:
            return w.namespace == entry.namespace
        if entry.namespace_selector is not None:
            return self._workloads.in_namespaces(entry.namespace_selector, w.namespace)
        return True

    # ---- the output -------------------------------------------------------------------------------
    def endpoints(self) -> frozenset[Endpoint]:
        """The local endpoints; unchanged ones are the objects handed out last time."""
        result = self._out.replace(self._dirty, self._endpoint)
        self._dirty = set()
        return result

    def output(self) -> Outputs[Endpoint]:
        """The endpoints handed out by the last :meth:`endpoints`."""
        return self._out

    def _endpoint(self, key: str) -> Endpoint | None:
        local = self._local.get(key)
        if local is None:
            return None
        w = self._workloads.by_key[key]
        ordered = sorted((self._by_pid[pid] for pid in local.policies), key=lambda e: e.order)
        return Endpoint(
            key=w.key,
            interface=w.resource.spec.interface_name,
            addresses=tuple(route for _, _, route in w.addresses),
            ingress_policies=tuple(e.pid for e in ordered if e.ingress),
            egress_policies=tuple(e.pid for e in ordered if e.egress),
            profiles=local.profiles,
        )
