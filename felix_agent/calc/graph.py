"""``compute(snapshot, node)``: everything ``node``'s dataplane must hold, from one datastore view.

Pure: no pyroute2, no etcd, no I/O, no state kept between calls (Calico's rule that the output
depends only on the current input), so it is simply called again after every batch of updates
and the dataplane managers diff its result against what they applied last.

What it decides, in Calico's terms:

- **Local endpoints** are the WorkloadEndpoints whose ``spec.node`` is ``node``. Every endpoint's
  labels are its own labels over those its profiles apply: the ``kns.<namespace>`` profile's
  ``labelsToApply`` prefixed ``pcns.`` (the CONTRACT's namespace convention), any other profile
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
- **Routes and tunnels** (``felix_agent.calc.routes``), NAT-outgoing pools, whether IPIP is used.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain

from datastore.model import Resource
from datastore.policy import PROTOCOLS, order_key
from felix_agent.calc.labels import Ids, LabelIndex, parsed
from felix_agent.calc.model import DesiredState, Endpoint, IPSet, Policy
from felix_agent.calc.policy import ALL_NAMESPACES, SetSpec, SetTable, convert, network_profile, policy_id
from felix_agent.calc.routes import routing
from felix_agent.calc.snapshot import Snapshot

NAMESPACE_PROFILE = "kns."
NAMESPACE_LABEL_PREFIX = "pcns."
NETWORK_PROFILE = "net."
_PROTOCOL_NAMES = {name.lower(): (number, name.lower()) for name, number in PROTOCOLS.items()}


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


def compute(snapshot: Snapshot, node: str) -> DesiredState:
    profiles = {p.name: p for p in snapshot.profiles.values()}
    ns_labels = {name[len(NAMESPACE_PROFILE):]: p.spec.labels_to_apply
                 for name, p in profiles.items() if name.startswith(NAMESPACE_PROFILE)}
    workloads = [_workload(r, ns_labels, profiles) for r in snapshot.endpoints.values()]
    index = LabelIndex([w.labels for w in workloads])
    scopes = _Scopes(workloads, ns_labels, index)
    local = frozenset(i for i, w in enumerate(workloads) if w.resource.spec.node == node)

    sets = SetTable()
    policies: dict[str, Policy] = {}
    ingress: dict[int, list[str]] = {i: [] for i in local}
    egress: dict[int, list[str]] = {i: [] for i in local}
    # In evaluation order once, so that every endpoint's lists come out ordered without a sort each.
    ordered = sorted((*snapshot.network_policies.values(), *snapshot.global_policies.values()), key=order_key)
    for resource in ordered:
        spec = resource.spec
        if resource.kind.NAMESPACED:
            scope = scopes.namespace(resource.namespace or "")
        else:
            scope = scopes.selected_namespaces(spec.namespace_selector) if spec.namespace_selector else index.all
        selected = index.select(spec.selector) & local & scope
        if not selected:
            continue
        pid = policy_id(resource)
        policies[pid] = convert(resource, sets)
        for direction, lists in (("Ingress", ingress), ("Egress", egress)):
            if spec.applies_to(direction):
                for i in selected:
                    lists[i].append(pid)

    endpoints = []
    for i in sorted(local, key=lambda i: workloads[i].key):
        w = workloads[i]
        endpoints.append(Endpoint(
            key=w.key,
            interface=w.resource.spec.interface_name,
            addresses=tuple(route for _, _, route in w.addresses),
            ingress_policies=tuple(ingress[i]),
            egress_policies=tuple(egress[i]),
            profiles=_profiles(w, profiles, policies, sets),
        ))

    ipsets = [s for spec in sets.specs.values() for s in _resolve(spec, workloads, index, scopes)]
    local_addresses = [(_address(a)[2], e.interface) for e in endpoints for a in e.addresses]
    routes = routing(snapshot, node, local_addresses)
    pools = list(snapshot.ippools.values())
    return DesiredState(
        node=node,
        endpoints=frozenset(endpoints),
        policies=frozenset(policies.values()),
        ipsets=frozenset(ipsets),
        routes=routes.routes,
        vxlan_peers=routes.vxlan_peers,
        local_vtep=routes.local_vtep,
        ipip_enabled=routes.ipip_enabled,
        nat_pools=frozenset(p.spec.cidr for p in pools if p.spec.nat_outgoing),
        all_pools=frozenset(p.spec.cidr for p in pools),
        mtu=None,
    )


def _workload(resource: Resource, ns_labels: Mapping[str, Mapping[str, str]],
              profiles: Mapping[str, Resource]) -> _Workload:
    namespace = resource.namespace or "default"
    spec = resource.spec
    labels: dict[str, str] = {}
    own_ns_profile = NAMESPACE_PROFILE + namespace
    for name in (*spec.profiles, NETWORK_PROFILE + spec.network if spec.network else ""):
        profile = profiles.get(name)
        if profile is not None and name != own_ns_profile:
            labels.update(profile.spec.labels_to_apply)
    labels.update({NAMESPACE_LABEL_PREFIX + k: v for k, v in ns_labels.get(namespace, {}).items()})
    labels.update(resource.metadata.labels)  # the endpoint's own labels win
    addresses = tuple(_address(a) for a in spec.ip_networks)
    ports = tuple((p.name, *_PROTOCOL_NAMES[p.protocol.lower()], p.port) for p in spec.ports
                  if p.protocol.lower() in _PROTOCOL_NAMES)
    return _Workload(f"{namespace}/{resource.name}", namespace, resource, labels, addresses,
                     tuple(m for v, m, _ in addresses if v == 4), tuple(m for v, m, _ in addresses if v == 6), ports)


def _profiles(w: _Workload, profiles: Mapping[str, Resource], policies: dict[str, Policy],
              sets: SetTable) -> tuple[str, ...]:
    """The endpoint's profile ids in order: those it lists (and its namespace's) that exist and have
    rules, then its network's. Converted profiles are added to ``policies``."""
    network = w.resource.spec.network
    network_name = NETWORK_PROFILE + network if network else None
    names = dict.fromkeys((*w.resource.spec.profiles, NAMESPACE_PROFILE + w.namespace))
    ids = []
    for name in names:
        profile = profiles.get(name)
        if profile is None or name == network_name or not (profile.spec.ingress or profile.spec.egress):
            continue
        pid = policy_id(profile)
        if pid not in policies:
            policies[pid] = convert(profile, sets)
        ids.append(pid)
    if network_name is not None:
        stored = profiles.get(network_name)
        pid = f"pro/{network_name}"
        if stored is None:
            policies.setdefault(pid, network_profile(network, sets))
            ids.append(pid)
        elif stored.spec.ingress or stored.spec.egress:
            if pid not in policies:
                policies[pid] = convert(stored, sets)
            ids.append(pid)
    return tuple(ids)


class _Scopes:
    """Which endpoints a SetSpec scope (or a policy's namespace) covers."""

    def __init__(self, workloads: list[_Workload], ns_labels: Mapping[str, Mapping[str, str]],
                 index: LabelIndex) -> None:
        by_ns: dict[str, set[int]] = {}
        for i, w in enumerate(workloads):
            by_ns.setdefault(w.namespace, set()).add(i)
        self.by_ns = {ns: frozenset(ids) for ns, ids in by_ns.items()}
        self.ns_labels = ns_labels
        self.all = index.all
        self._memo: dict[str, Ids] = {}

    def namespace(self, namespace: str) -> Ids:
        return self.by_ns.get(namespace, frozenset())

    def selected_namespaces(self, selector: str) -> Ids:
        """Endpoints of the namespaces whose labels match ``selector`` (a namespace without a
        ``kns.`` profile has no labels); ``global()`` means non-namespaced endpoints: none here."""
        found = self._memo.get(selector)
        if found is None:
            sel = parsed(selector)
            if str(sel) == "global()":
                found = frozenset()
            else:
                found = frozenset().union(*(ids for ns, ids in self.by_ns.items()
                                            if sel.matches(self.ns_labels.get(ns, {}))))
            self._memo[selector] = found
        return found

    def of(self, scope: str) -> Ids:
        if scope == ALL_NAMESPACES:
            return self.all
        kind, _, value = scope.partition(":")
        return self.namespace(value) if kind == "ns" else self.selected_namespaces(value)


def _resolve(spec: SetSpec, workloads: list[_Workload], index: LabelIndex, scopes: _Scopes) -> list[IPSet]:
    """The set's members, one IPSet per IP family (both always exist, so rules can name them)."""
    selected = [workloads[i] for i in index.select(spec.selector) & scopes.of(spec.scope)]
    if not spec.named_port:
        return [IPSet(spec.id, 4, "net", frozenset(chain.from_iterable(w.v4 for w in selected))),
                IPSet(spec.id, 6, "net", frozenset(chain.from_iterable(w.v6 for w in selected)))]
    names, protocol = spec.port_names, spec.protocol
    ports = [(w, f"{proto}:{port}") for w in selected for name, number, proto, port in w.ports
             if name in names and (protocol is None or number == protocol)]
    return [IPSet(spec.id, 4, "named-port", frozenset(f"{a},{p}" for w, p in ports for a in w.v4)),
            IPSet(spec.id, 6, "named-port", frozenset(f"{a},{p}" for w, p in ports for a in w.v6))]
