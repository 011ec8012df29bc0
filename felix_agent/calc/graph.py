"""The calculation graph: everything ``node``'s dataplane must hold, from one datastore view.

Owns the wiring of the calculators and the incremental bookkeeping between snapshots; it must not
decide anything itself (each decision lives in the calculator named below) and does no I/O: no
pyroute2, no etcd. :class:`Calculator` keeps what it derived last time and, given the next snapshot,
works only on the keys whose values changed (values in a snapshot are shared and never mutated, so
"changed" is an identity test): a label change re-evaluates the selectors for that one endpoint and
touches the IP sets it enters or leaves and, if its policies change, its own endpoint; a policy
change touches the endpoints it selects. Unchanged outputs are handed on as the very objects handed
out last time (``felix_agent.calc.outputs``), so the managers' "did my part change?" is an identity
test too. The result is always the same as :func:`compute`, which starts from nothing (the unit
tests hold the two to that). A change of a Profile (namespace labels, labels to apply, profile
rules) starts over.

The calculators, in Calico's terms (Felix spreads the same work over the same pieces):

- ``felix_agent.calc.workloads``: every WorkloadEndpoint with its labels (its own over those its
  profiles apply, its namespace's prefixed ``pcns.``), addresses, named ports; the **local
  endpoints** are those whose ``spec.node`` is ``node``.
- ``felix_agent.calc.selector_index`` (SelectorAndNamedPortIndex): which endpoints each selector in
  use matches, and the members of each **IP set** (``felix_agent.calc.policy``: one per canonical
  selector and scope and IP family), resolved against every endpoint of every node.
- ``felix_agent.calc.policy_resolver`` (PolicyResolver): which **policies** apply to each local
  endpoint, in ``order_key`` order per direction, and after them its **profiles**, last
  ``pro/net.<network>``, which allows ingress from the endpoints of the same network and any egress.
  That last profile is what makes a network "open within itself unless policy says otherwise"
  (Calico's non-Kubernetes CNI gives each network a profile of that shape): it is synthesised
  rather than stored, so no component has to create it and a network exists as soon as one endpoint
  names it; and being a profile, it stops counting the moment a policy selects the endpoint in a
  direction (Calico's default deny). An operator who wants another default stores a Profile named
  ``net.<network>``: it replaces the synthesised one (one without rules makes the network closed by
  default).
- ``felix_agent.calc.netsets``: every GlobalNetworkSet and NetworkSet, which the selector index
  holds beside the endpoints: a rule's selector matching one puts its nets in the IP set.
- ``felix_agent.calc.active_rules`` (ActiveRulesCalculator): only policies that apply to some local
  endpoint, and the IP sets their rules reference, are output.
- ``felix_agent.calc.host_endpoints``: this node's HostEndpoints, the global policies selecting them
  by role (local, applyOnForward, preDNAT, doNotTrack), their profiles; and the host's protection
  settings (failsafe ports, defaultEndpointToHostAction) from FelixConfiguration. Re-evaluated as a
  whole when host endpoints or global policies change (a node has a handful). Every node's host
  endpoints also enter the selector index, one by one, like endpoints of no namespace.
- ``felix_agent.calc.routes``: routes and tunnels, NAT-outgoing pools, whether IPIP is used;
  recomputed only when pools, nodes or affinities change, or what it reads of a block (its owner,
  its borrowed addresses: not the owner's own assignments, every pod's ADD and DEL). The local endpoints' host routes
  are kept apart, endpoint by endpoint (a new pod costs its own routes, not a pass over all).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datastore.model import Resource
from felix_agent.calc.active_rules import ActiveRules
from felix_agent.calc.host_endpoints import HostEndpoints, as_workload, protection
from felix_agent.calc.model import DesiredState, HostProtection, Route
from felix_agent.calc.netsets import build as build_netset
from felix_agent.calc.policy_resolver import PolicyResolver
from felix_agent.calc.routes import LocalRoutes, Routing, block_routing_key, local_routes, routing
from felix_agent.calc.selector_index import SelectorIndex
from felix_agent.calc.snapshot import (
    AFFINITY,
    BLOCK,
    FELIX_CONFIGURATION,
    GLOBAL_NETWORK_POLICY,
    GLOBAL_NETWORK_SET,
    HOST_ENDPOINT,
    IPPOOL,
    NETWORK_POLICY,
    NETWORK_SET,
    NODE,
    PROFILE,
    WORKLOAD_ENDPOINT,
    Snapshot,
)
from felix_agent.calc.workloads import Workloads
from ipam.block import Block

_ROUTING_KINDS = (IPPOOL, NODE, AFFINITY)  # and blocks, when what routing reads of one moved


def compute(snapshot: Snapshot, node: str, *, bgp_owns_remote: bool = False) -> DesiredState:
    """Everything ``node``'s dataplane must hold, computed from nothing."""
    return Calculator(node, bgp_owns_remote=bgp_owns_remote).compute(snapshot)


class Calculator:
    """``compute(snapshot)`` again and again; each call costs what changed since the last one."""

    def __init__(self, node: str, *, bgp_owns_remote: bool = False) -> None:
        self.node = node
        self.bgp_owns_remote = bgp_owns_remote  # see felix_agent.calc.routes
        self._clear({})

    def _clear(self, profiles: Mapping[str, Resource]) -> None:
        """Start over with these profiles (by name): every calculator anew."""
        self._tables: dict[str, dict[str, Any]] = {}
        self._workloads = Workloads(self.node, profiles)
        self._index = SelectorIndex(self._workloads)
        self._rules = ActiveRules(self._index)
        self._resolver = PolicyResolver(self._workloads, self._index, self._rules)
        self._routing: Routing | None = None  # of blocks, pools and nodes: see felix_agent.calc.routes
        self._routing_dirty = True
        self._blocks: dict[str, tuple[object, ...]] = {}  # block key → what routing reads of it
        self._local_routes = LocalRoutes()  # of the local endpoints, kept endpoint by endpoint
        self._local_routes_moved = False
        self._routes: frozenset[Route] = frozenset()  # both
        self._hosts = HostEndpoints(self.node, profiles, self._rules)
        self._protection: HostProtection | None = None

    # ---- the one entry point ----------------------------------------------------------------------
    def compute(self, snapshot: Snapshot) -> DesiredState:
        changed = {kind: _changed(self._tables.get(kind, {}), table) for kind, table in snapshot.tables.items()}
        if changed.get(PROFILE):
            # profiles feed every endpoint's labels and the namespaces' labels: start over
            self._clear({p.name: p for p in snapshot.profiles.values()})
            changed = {kind: list(table) for kind, table in snapshot.tables.items()}
        self._tables = {kind: dict(table) for kind, table in snapshot.tables.items()}
        # Endpoints first: a policy added after them finds its selector's matches in the label index.
        for key in changed.get(WORKLOAD_ENDPOINT, ()):
            self._set_workload(key, snapshot.endpoints.get(key))
        for key in changed.get(HOST_ENDPOINT, ()):
            self._set_host_endpoint(key, snapshot.host_endpoints.get(key))
        for kind in (GLOBAL_NETWORK_SET, NETWORK_SET):
            table = snapshot.tables[kind]
            for key in changed.get(kind, ()):
                resource = table.get(key)
                self._index.set_netset(key, build_netset(key, resource, self._workloads) if resource else None)
        hosts_dirty = bool(changed.get(HOST_ENDPOINT) or changed.get(GLOBAL_NETWORK_POLICY))
        if hosts_dirty:
            self._hosts.release()  # before the policies its uses name are replaced
        for kind in (NETWORK_POLICY, GLOBAL_NETWORK_POLICY):
            for key in changed.get(kind, ()):
                self._resolver.set_policy(key, snapshot.tables[kind].get(key))
        if hosts_dirty:
            self._hosts.update(snapshot)
        if changed.get(FELIX_CONFIGURATION) or self._protection is None:
            found = protection(snapshot, self.node)
            if found != self._protection:
                self._protection = found
        if any(changed.get(kind) for kind in _ROUTING_KINDS):
            self._routing_dirty = True
        for key in changed.get(BLOCK, ()):
            self._set_block(key, snapshot.blocks.get(key))
        return self._state(snapshot)

    def _set_workload(self, key: str, resource: Resource | None) -> None:
        workloads = self._workloads.by_key
        old = workloads.pop(key, None)
        new = self._workloads.build(resource) if resource is not None else None
        if new is not None:
            workloads[key] = new
        self._index.set_workload(key, new)
        if old is not None and old.local:
            self._resolver.drop_local(key)
        if new is not None and new.local:
            self._resolver.add_local(key, new)
        # a local endpoint's addresses on its veth are its host routes: came, went, moved or renamed
        if (old is not None and old.local) or (new is not None and new.local):
            routes = local_routes(self.node, new.resource.spec.interface_name,
                                  (dst for _, _, dst in new.addresses)) \
                if new is not None and new.local else frozenset()
            self._local_routes_moved |= self._local_routes.set(key, routes)

    def _set_block(self, key: str, block: Block | None) -> None:
        """A block changed: routing is recomputed only when its routes may have moved (every pod's ADD
        and DEL assigns or releases an address of its node's block, which leaves them as they were)."""
        found = block_routing_key(block) if block is not None else None
        if self._blocks.get(key) != found or found is None:
            self._routing_dirty = True
        if found is None:
            self._blocks.pop(key, None)
        else:
            self._blocks[key] = found

    def _set_host_endpoint(self, key: str, resource: Resource | None) -> None:
        """A host endpoint, of any node, as rule selectors see it (its expectedIPs and ports)."""
        workloads = self._workloads.by_key
        workloads.pop(key, None)
        new = as_workload(key, resource, self._workloads.profiles) if resource is not None else None
        if new is not None:
            workloads[key] = new
        self._index.set_workload(key, new)

    def set_sources(self, set_id: str, address: str) -> list[str]:
        """The snapshot keys of what put ``address`` in IP set ``set_id`` (for explaining a verdict)."""
        return self._index.sources(set_id, address)

    # ---- the output -------------------------------------------------------------------------------
    def _state(self, snapshot: Snapshot) -> DesiredState:
        endpoints = self._resolver.endpoints()
        policies = self._rules.policies()
        ipsets = self._index.ipsets(self._rules.set_users, self._rules.take_dirty_sets())
        if self._routing_dirty or self._routing is None:
            self._routing = routing(snapshot, self.node, bgp_owns_remote=self.bgp_owns_remote)
            self._routing_dirty = False
            self._local_routes_moved = True
        if self._local_routes_moved:
            routes = self._routing.routes | self._local_routes.values
            if routes != self._routes:  # else the same object: see felix_agent.calc.outputs
                self._routes = routes
            self._local_routes_moved = False
        pools = list(snapshot.ippools.values())
        return DesiredState(
            node=self.node,
            endpoints=endpoints,
            policies=policies,
            ipsets=ipsets,
            routes=self._routes,
            vxlan_peers=self._routing.vxlan_peers,
            local_vtep=self._routing.local_vtep,
            ipip_enabled=self._routing.ipip_enabled,
            nat_pools=frozenset(p.spec.cidr for p in pools if p.spec.nat_outgoing),
            all_pools=frozenset(p.spec.cidr for p in pools),
            mtu=None,
            host_endpoints=self._hosts.endpoints(),
            host=self._protection or HostProtection(),
        )


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose value is not the very object it was (added, replaced or deleted)."""
    found = [key for key, value in new.items() if old.get(key) is not value]
    if len(old) + len(found) != len(new):  # something was deleted too
        found += [key for key in old if key not in new]
    return found
