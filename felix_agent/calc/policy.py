"""Policies and profiles → :class:`~felix_agent.calc.model.Policy`, their selectors → IP-set ids.

A rule never names endpoints: each ``selector``/``namespaceSelector``/``notSelector`` (and each
named port) becomes a :class:`SetSpec`, whose id is a hash of its canonical text and scope. The
rule only references the id, so a label change alters the set's members, never the rules, and
equal selectors in different policies share one set. Members are resolved separately
(``felix_agent.calc.selector_index``).

Calico's scoping, as ``libcalico-go``'s rule conversion does it: when an entity gives a selector,
a notSelector or a namespaceSelector, its positive match is ``<namespace scope> && selector``,
where the scope is the namespaceSelector (matched against the ``kns.<ns>`` profiles' labels) or,
in a NetworkPolicy without one, the policy's own namespace; GlobalNetworkPolicies and profiles
are unscoped. ``notSelector`` is never scoped.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field

from datastore.model import Resource
from datastore.policy import EntityRule, Rule, parse_port, protocol_number
from datastore.selector import Match, Selector
from felix_agent.calc.labels import canonical
from felix_agent.calc.model import Policy, PortRange, RuleMatch

log = logging.getLogger(__name__)

# The CNI plugin labels every endpoint with its network (cni_plugins.tortie_ops.LABEL_NETWORK).
NETWORK_LABEL = "tortie.dev/network"
ALL_NAMESPACES = ""  # SetSpec.scope of an unscoped selector


@dataclass(frozen=True)
class SetSpec:
    """What an IP set holds: the addresses of endpoints matching ``selector`` within ``scope``.

    ``scope`` is ``""`` (every namespace), ``"ns:<namespace>"``, or ``"nssel:<selector>"`` (the
    namespaces whose labels match). A named-port set (``port_names`` given) holds
    ``"addr,proto:port"`` for those endpoints' ports of those names (and ``protocol``, if set).
    """

    scope: str
    selector: str
    port_names: tuple[str, ...] = ()
    protocol: int | None = None

    @property
    def named_port(self) -> bool:
        return bool(self.port_names)

    @functools.cached_property
    def id(self) -> str:
        text = f"{self.scope}|{self.selector}"
        if self.port_names:
            text += f"|{self.protocol or ''}|{','.join(self.port_names)}"
        return f"{'n' if self.port_names else 's'}:{hashlib.sha1(text.encode()).hexdigest()[:16]}"


@dataclass
class SetTable:
    """The sets referenced by the policies converted so far, by id."""

    specs: dict[str, SetSpec] = field(default_factory=dict)

    def add(self, spec: SetSpec) -> str:
        set_id = spec.id
        self.specs.setdefault(set_id, spec)
        return set_id


def policy_id(resource: Resource) -> str:
    kind = resource.kind.KIND
    if kind == "NetworkPolicy":
        return f"np/{resource.namespace}/{resource.name}"
    if kind == "GlobalNetworkPolicy":
        return f"gnp/{resource.name}"
    return f"pro/{resource.name}"


def convert(resource: Resource, sets: SetTable) -> Policy:
    """A NetworkPolicy, GlobalNetworkPolicy or Profile as rules over IP-set ids."""
    pid = policy_id(resource)
    namespace = resource.namespace if resource.kind.KIND == "NetworkPolicy" else None
    spec = resource.spec
    directions = []
    for direction, rules in (("ingress", spec.ingress), ("egress", spec.egress)):
        converted = (_rule(rule, namespace, sets, f"{pid} {direction} {i}") for i, rule in enumerate(rules))
        directions.append(tuple(r for r in converted if r is not None))
    return Policy(pid, directions[0], directions[1])


def network_profile(network: str, sets: SetTable) -> Policy:
    """The profile every endpoint of ``network`` ends with: ingress from the network, any egress."""
    members = Selector(Match(NETWORK_LABEL, "==", (network,)))
    same_network = sets.add(SetSpec(ALL_NAMESPACES, str(members)))
    pid = f"pro/net.{network}"
    return Policy(pid, ingress=(RuleMatch("Allow", src_sets=(same_network,), comment=f"{pid} ingress 0"),),
                  egress=(RuleMatch("Allow", comment=f"{pid} egress 0"),))


@dataclass
class _Side:
    """One entity (source or destination) of a rule, resolved."""

    sets: tuple[str, ...] = ()
    not_sets: tuple[str, ...] = ()
    ports: tuple[PortRange, ...] = ()
    not_ports: tuple[PortRange, ...] = ()
    named_port_sets: tuple[str, ...] = ()


def _rule(rule: Rule, namespace: str | None, sets: SetTable, comment: str) -> RuleMatch | None:
    protocol = protocol_number(rule.protocol) if rule.protocol is not None else None
    src = _side(rule.source, rule.action, protocol, namespace, sets, comment)
    dst = _side(rule.destination, rule.action, protocol, namespace, sets, comment)
    if src is None or dst is None:
        return None
    return RuleMatch(
        action=rule.action,
        ip_version=rule.ip_version,
        protocol=protocol,
        not_protocol=protocol_number(rule.not_protocol) if rule.not_protocol is not None else None,
        icmp_type=rule.icmp.type if rule.icmp else None,
        icmp_code=rule.icmp.code if rule.icmp else None,
        not_icmp_type=rule.not_icmp.type if rule.not_icmp else None,
        not_icmp_code=rule.not_icmp.code if rule.not_icmp else None,
        src_nets=tuple(rule.source.nets),
        src_not_nets=tuple(rule.source.not_nets),
        dst_nets=tuple(rule.destination.nets),
        dst_not_nets=tuple(rule.destination.not_nets),
        src_sets=src.sets,
        src_not_sets=src.not_sets,
        dst_sets=dst.sets,
        dst_not_sets=dst.not_sets,
        src_ports=src.ports,
        src_not_ports=src.not_ports,
        dst_ports=dst.ports,
        dst_not_ports=dst.not_ports,
        src_named_port_sets=src.named_port_sets,
        dst_named_port_sets=dst.named_port_sets,
        comment=comment,
    )


def _scope(entity: EntityRule, namespace: str | None) -> str:
    if entity.namespace_selector:
        return f"nssel:{canonical(entity.namespace_selector)}"
    return f"ns:{namespace}" if namespace else ALL_NAMESPACES


def _side(entity: EntityRule, action: str, protocol: int | None, namespace: str | None, sets: SetTable,
          comment: str) -> _Side | None:
    side = _Side()
    selector = canonical(entity.selector or "all()")
    # As in Calico, the namespace scope applies only once the entity selects endpoints at all.
    selects = bool(entity.selector or entity.not_selector or entity.namespace_selector)
    scope = _scope(entity, namespace) if selects else ALL_NAMESPACES
    if selects and (entity.selector or scope != ALL_NAMESPACES):
        # (a GlobalNetworkPolicy's lone notSelector has no positive part: Calico leaves it empty)
        side.sets = (sets.add(SetSpec(scope, selector)),)
    if entity.not_selector:
        side.not_sets = (sets.add(SetSpec(ALL_NAMESPACES, canonical(entity.not_selector))),)
    ports, names = _ports(entity.ports)
    side.ports = ports
    if names:
        # One set per side holding every named port of it: "port is any of these names".
        side.named_port_sets = (sets.add(SetSpec(scope, selector, names, protocol)),)
    not_ports, not_names = _ports(entity.not_ports)
    side.not_ports = not_ports
    if not_names:
        # The model has no "not in named-port set" match yet. Fail closed: a Deny rule denies
        # more without the exception; any other rule is left out, so it allows nothing extra.
        if action != "Deny":
            log.warning("%s: named notPorts %s are not supported; rule skipped", comment, ", ".join(not_names))
            return None
        log.warning("%s: named notPorts %s are not supported; ignored (the rule denies more)",
                    comment, ", ".join(not_names))
    return side


def _ports(values: list[int | str]) -> tuple[tuple[PortRange, ...], tuple[str, ...]]:
    ranges: list[PortRange] = []
    names: list[str] = []
    for value in values:
        port = parse_port(value)
        if isinstance(port, str):
            names.append(port)
        else:
            ranges.append(port)
    return tuple(ranges), tuple(sorted(set(names)))
