"""This node's host endpoints and the policies that apply to each (Felix's host endpoint half of the
PolicyResolver), and the host's protection settings from FelixConfiguration.

Owns which HostEndpoints are this node's (``spec.node``), their labels (their own over those their
profiles apply; host endpoints have no namespace), which GlobalNetworkPolicies select them and in
which role (local traffic, applyOnForward, preDNAT, doNotTrack; NetworkPolicies are namespaced and
never select a host endpoint, as in Calico), their profiles (``projectcalico-default-allow`` is
synthesised when not stored: Calico gives it to automatic host endpoints), and the
:class:`~felix_agent.calc.model.HostEndpoint` s handed out. It tells
:class:`~felix_agent.calc.active_rules.ActiveRules` which policies and profiles its endpoints use, so
that their rules and IP sets are output like a workload's; and every node's host endpoint as the
selector index sees it (:func:`as_workload`: its expectedIPs and named ports, no namespace), so
that rule selectors resolve to it. A node has a handful of host endpoints:
any change of host endpoints or global policies re-evaluates all of them (``release`` before the
policies change, ``update`` after), which the graph keeps equal to a computation from nothing.
Pure: no I/O. Must not render rules (``felix_agent.dataplane.host_policy`` does).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping

from datastore.felixconfig import failsafe_ports
from datastore.hostendpoint import DEFAULT_ALLOW_PROFILE
from datastore.model import Resource
from datastore.policy import PROTOCOLS, order_key
from felix_agent.calc.active_rules import ActiveRules
from felix_agent.calc.labels import canonical, parsed
from felix_agent.calc.model import FailsafePort, HostEndpoint, HostProtection, Policy, RuleMatch
from felix_agent.calc.policy import SetTable, convert, policy_id
from felix_agent.calc.settings import settings
from felix_agent.calc.snapshot import GLOBAL_NETWORK_POLICY, HOST_ENDPOINT, Snapshot
from felix_agent.calc.workloads import _PROTOCOL_NAMES, HOST_NAMESPACE, Workload, address


def host_labels(resource: Resource, profiles: Mapping[str, Resource]) -> dict[str, str]:
    """A host endpoint's labels: its own over those its profiles apply."""
    labels: dict[str, str] = {}
    for name in resource.spec.profiles:
        profile = profiles.get(name)
        if profile is not None:
            labels.update(profile.spec.labels_to_apply)
    labels.update(resource.metadata.labels)
    return labels


def as_workload(key: str, resource: Resource, profiles: Mapping[str, Resource]) -> Workload:
    """A host endpoint (any node's) as the selector index sees endpoints: so that rule selectors
    and named ports resolve to its ``expectedIPs`` and ``ports``, as in Calico. Never local: the
    policy resolver's local endpoints are workloads."""
    addresses = tuple(address(ip) for ip in resource.spec.expected_ips)
    ports = tuple((p.name, *_PROTOCOL_NAMES[p.protocol.lower()], p.port) for p in resource.spec.ports)
    return Workload(key, HOST_NAMESPACE, resource, host_labels(resource, profiles), addresses,
                    tuple(m for v, m, _ in addresses if v == 4), tuple(m for v, m, _ in addresses if v == 6),
                    ports, False)


def default_allow(sets: SetTable) -> Policy:
    """Calico's ``projectcalico-default-allow`` profile: every ingress and egress allowed."""
    pid = f"pro/{DEFAULT_ALLOW_PROFILE}"
    return Policy(pid, ingress=(RuleMatch("Allow", comment=f"{pid} ingress 0"),),
                  egress=(RuleMatch("Allow", comment=f"{pid} egress 0"),))


class HostEndpoints:
    """The node's host endpoints, re-evaluated as a whole when host endpoints or global policies change."""

    def __init__(self, node: str, profiles: Mapping[str, Resource], rules: ActiveRules) -> None:
        self.node = node
        self._profiles = profiles
        self._rules = rules
        self._uses: Counter[str] = Counter()  # policy/profile id → uses told to ActiveRules
        self._out: frozenset[HostEndpoint] = frozenset()

    def release(self) -> None:
        """Withdraw every use told to ActiveRules (before the policies they name change)."""
        for pid, count in self._uses.items():
            for _ in range(count):  # one at a time: ActiveRules counts a policy's sets by its 0 ↔ 1 steps
                self._rules.use(pid, -1)
        self._uses = Counter()

    def update(self, snapshot: Snapshot) -> None:
        """Re-evaluate every local host endpoint against every global policy (after :meth:`release`)."""
        policies = sorted(snapshot.tables[GLOBAL_NETWORK_POLICY].values(), key=order_key)
        out = []
        for resource in snapshot.tables[HOST_ENDPOINT].values():
            if resource.spec.node == self.node:
                out.append(self._endpoint(resource, policies))
        for hep in out:
            for pid in {p for p, _ in hep.policy_refs()}:
                self._uses[pid] += 1
                self._rules.use(pid, 1)
        found = frozenset(out)
        if found != self._out:
            self._out = found

    def endpoints(self) -> frozenset[HostEndpoint]:
        """The local host endpoints; the same object while nothing about them changed."""
        return self._out

    def _endpoint(self, resource: Resource, policies: list[Resource]) -> HostEndpoint:
        spec = resource.spec
        labels = host_labels(resource, self._profiles)
        roles: dict[str, list[str]] = {role: [] for role in (
            "in", "out", "fwd-in", "fwd-out", "pre", "raw-in", "raw-out")}
        for policy in policies:
            p = policy.spec
            if (p.namespace_selector and canonical(p.namespace_selector) != "global()") or not parsed(
                    canonical(p.selector)).matches(labels):
                continue  # a namespaceSelector other than global() selects namespaced endpoints only
            pid = policy_id(policy)
            ingress, egress = p.applies_to("Ingress"), p.applies_to("Egress")
            if p.pre_dnat:
                if ingress:
                    roles["pre"].append(pid)
                continue
            if p.do_not_track:
                roles["raw-in"] += [pid] if ingress else []
                roles["raw-out"] += [pid] if egress else []
                continue
            roles["in"] += [pid] if ingress else []
            roles["out"] += [pid] if egress else []
            if p.apply_on_forward:
                roles["fwd-in"] += [pid] if ingress else []
                roles["fwd-out"] += [pid] if egress else []
        return HostEndpoint(
            key=resource.name, interface=spec.interface_name,
            ingress_policies=tuple(roles["in"]), egress_policies=tuple(roles["out"]),
            forward_ingress_policies=tuple(roles["fwd-in"]), forward_egress_policies=tuple(roles["fwd-out"]),
            pre_dnat_policies=tuple(roles["pre"]),
            untracked_ingress_policies=tuple(roles["raw-in"]), untracked_egress_policies=tuple(roles["raw-out"]),
            profiles=self._profile_ids(spec.profiles))

    def _profile_ids(self, names: list[str]) -> tuple[str, ...]:
        ids = []
        for name in dict.fromkeys(names):
            stored = self._profiles.get(name)
            if stored is not None:
                ids.append(self._rules.profile(policy_id(stored), functools.partial(convert, stored)))
            elif name == DEFAULT_ALLOW_PROFILE:
                ids.append(self._rules.profile(f"pro/{name}", default_allow))
            # a profile that does not exist contributes nothing (it allows nothing)
        return tuple(ids)


def protection(snapshot: Snapshot, node: str) -> HostProtection:
    """Failsafe ports and the workload-to-host action in force on ``node``."""
    config = settings(snapshot, node)

    def ports(value: object, inbound: bool) -> tuple[FailsafePort, ...]:
        return tuple(FailsafePort(PROTOCOLS[p.protocol], p.port, p.net)
                     for p in failsafe_ports(value, inbound))  # type: ignore[arg-type]

    return HostProtection(ports(config.failsafe_inbound_host_ports, True),
                          ports(config.failsafe_outbound_host_ports, False),
                          str(config.default_endpoint_to_host_action or "Accept"))
