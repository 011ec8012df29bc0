"""Calico v3's policy model: ``NetworkPolicy``, ``GlobalNetworkPolicy`` and ``Profile``, their rules and validation.

Field names, defaults and checks follow Calico's API (``api/pkg/apis/projectcalico/v3``) and its
validator, so a Calico policy file means the same thing here. Validation happens once, while a
document is decoded, and names the field path of the problem; afterwards the values are canonical
(``Allow`` not ``allow``, protocols by their Calico name or number, CIDRs as networks, ``types``
filled in) and the calculation graph can trust them.

What Tortie does not implement (tiers other than ``default``, service accounts, services, HTTP
match) is rejected with a message rather than silently ignored.

Imports only the model, the selector grammar and the errors: ``datastore.resources`` imports this
module to register the kinds, never the other way round.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datastore.errors import ValidationError
from datastore.model import Kind, Resource, check_labels, json_field
from datastore.selector import All, And, Expr, Not, Or, SelectorError, parse

ACTIONS = ("Allow", "Deny", "Log", "Pass")
DIRECTIONS = ("Ingress", "Egress")
PROTOCOLS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMPv6": 58, "SCTP": 132, "UDPLite": 136}
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})  # the protocols that have ports
ICMP_VERSIONS = {1: 4, 58: 6}  # ICMP and ICMPv6, and the IP version each belongs to

# Kubernetes' IANA_SVC_NAME, which Calico uses for named ports: at most 15 of [a-z0-9-], a letter
# somewhere, no hyphen at either end or next to another.
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9](-?[a-z0-9])*$")
_PORT_RANGE = re.compile(r"^(\d+):(\d+)$")


# --- Values shared by the rule fields --------------------------------------------------------


def canonical(value: str, choices: tuple[str, ...], where: str) -> str:
    """``value`` spelled as in ``choices``; case is forgiven (Calico v1 documents say ``allow``)."""
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise ValidationError(f"{where} {value!r} must be one of {', '.join(choices)}")


def protocol_number(protocol: int | str) -> int:
    """The IP protocol number of a canonical protocol value (``"TCP"`` → 6, ``47`` → 47)."""
    return protocol if isinstance(protocol, int) else PROTOCOLS[protocol]


def parse_port(port: int | str) -> tuple[int, int] | str:
    """A canonical port value as an inclusive ``(low, high)`` range, or the name of a named port."""
    if isinstance(port, int):
        return port, port
    if m := _PORT_RANGE.match(port):
        return int(m[1]), int(m[2])
    return port


def _check_protocol(value: int | str, where: str) -> int | str:
    if isinstance(value, int):
        if not 1 <= value <= 255:
            raise ValidationError(f"{where}: {value} is out of range (1-255)")
        return value
    try:
        return canonical(value, tuple(PROTOCOLS), where)
    except ValidationError:
        raise ValidationError(
            f"{where} {value!r} must be one of {', '.join(PROTOCOLS)} or a number 1-255") from None


def check_port(value: int | str, where: str) -> int | str:
    """A port, range ``"low:high"`` or port name, checked and in canonical form; errors name ``where``."""
    if isinstance(value, str) and (m := _PORT_RANGE.match(value)):
        low, high = int(m[1]), int(m[2])
        for end in (low, high):
            if not 1 <= end <= 65535:
                raise ValidationError(f"{where}: {end} in range {value!r} is out of range (1-65535)")
        if low > high:
            raise ValidationError(f"{where}: range {value!r} is backwards; write '{high}:{low}'")
        return f"{low}:{high}"
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValidationError(f"{where}: {value} is out of range (1-65535)")
        return value
    if ":" in value or not _PORT_NAME.match(value) or len(value) > 15:
        raise ValidationError(
            f"{where}: {value!r} is not a port (1-65535), a range 'low:high', or a port name "
            "(at most 15 lower-case letters, digits and '-', with at least one letter)")
    return value


def _check_net(value: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # As in Calico, a rule's CIDR may have host bits ("10.0.0.1/24" means 10.0.0.0/24) and a bare
    # address means just that address; the stored form is the network.
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValidationError(f"{where} {value!r} is not a CIDR or an IP address") from None


def _uses_global(expr: Expr) -> bool:
    if isinstance(expr, All):
        return expr.name == "global"
    if isinstance(expr, Not):
        return _uses_global(expr.operand)
    if isinstance(expr, And | Or):
        return any(_uses_global(term) for term in expr.terms)
    return False


def _check_selector(value: str, where: str, *, global_alone: bool = False) -> None:
    """Parses a selector; ``global()`` is allowed only where Calico allows it, alone in a rule's namespaceSelector."""
    try:
        parsed = parse(value)
    except SelectorError as e:
        raise ValidationError(f"{where}: {e}") from None
    if _uses_global(parsed.expr) and not (global_alone and isinstance(parsed.expr, All)):
        raise ValidationError(
            f"{where}: global() can only be used, on its own, in a rule's namespaceSelector")


def _reject_unsupported(where: str, fields: Mapping[str, Any], why: str) -> None:
    for name, value in fields.items():
        if value not in (None, {}, [], "", False):
            raise ValidationError(f"{where}.{name} is not supported by Tortie ({why})")


# --- Rules -----------------------------------------------------------------------------------


@dataclass
class ICMPFields:
    """``icmp`` / ``notICMP``: an ICMP type, and optionally a code within it."""

    type: int | None = None
    code: int | None = None

    def validate(self, where: str) -> None:
        if self.type is None:
            raise ValidationError(f"{where}.type is required (a code is matched only within a type)")
        if not 0 <= self.type <= 254:
            raise ValidationError(f"{where}.type {self.type} is out of range (0-254)")
        if self.code is not None and not 0 <= self.code <= 255:
            raise ValidationError(f"{where}.code {self.code} is out of range (0-255)")


@dataclass
class EntityRule:
    """A rule's ``source`` or ``destination``: every field given must match (empty = anything)."""

    nets: list[str] = field(default_factory=list)
    not_nets: list[str] = field(default_factory=list)
    selector: str = ""
    not_selector: str = ""
    namespace_selector: str = ""
    ports: list[int | str] = field(default_factory=list)
    not_ports: list[int | str] = field(default_factory=list)
    service_accounts: Any = None
    services: Any = None

    def validate(self, where: str) -> None:
        _reject_unsupported(where, {"serviceAccounts": self.service_accounts, "services": self.services},
                            "there is no Kubernetes API to resolve them; use selector")
        self.service_accounts = self.services = None
        self.nets = [str(_check_net(n, f"{where}.nets[{i}]")) for i, n in enumerate(self.nets)]
        self.not_nets = [str(_check_net(n, f"{where}.notNets[{i}]")) for i, n in enumerate(self.not_nets)]
        for i, net in enumerate(self.not_nets):
            if net.endswith("/0"):
                raise ValidationError(
                    f"{where}.notNets[{i}] {net} matches every address, so the rule could never match")
        for attr, json in (("selector", "selector"), ("not_selector", "notSelector"),
                           ("namespace_selector", "namespaceSelector")):
            value = getattr(self, attr).strip()
            setattr(self, attr, value)
            if value:
                _check_selector(value, f"{where}.{json}", global_alone=attr == "namespace_selector")
        self.ports = [check_port(p, f"{where}.ports[{i}]") for i, p in enumerate(self.ports)]
        self.not_ports = [check_port(p, f"{where}.notPorts[{i}]") for i, p in enumerate(self.not_ports)]

    def versions(self) -> dict[str, set[int]]:
        """The IP versions of ``nets`` and ``notNets``, by field name."""
        return {"nets": {ipaddress.ip_network(n).version for n in self.nets},
                "notNets": {ipaddress.ip_network(n).version for n in self.not_nets}}


@dataclass
class RuleMetadata:
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Rule:
    """One rule of a policy or profile: when every given match holds, ``action`` is taken."""

    action: str
    ip_version: int | None = None
    protocol: int | str | None = None
    not_protocol: int | str | None = None
    icmp: ICMPFields | None = None
    not_icmp: ICMPFields | None = json_field("notICMP", default=None)
    source: EntityRule = field(default_factory=EntityRule)
    destination: EntityRule = field(default_factory=EntityRule)
    metadata: RuleMetadata | None = None
    http: Any = None

    def validate(self, where: str) -> None:
        self.action = canonical(self.action, ACTIONS, f"{where}.action")
        _reject_unsupported(where, {"http": self.http}, "it matches HTTP, and Tortie filters at layers 3 and 4")
        self.http = None
        if self.ip_version is not None and self.ip_version not in (4, 6):
            raise ValidationError(f"{where}.ipVersion {self.ip_version} must be 4 or 6")
        if self.protocol is not None:
            self.protocol = _check_protocol(self.protocol, f"{where}.protocol")
        if self.not_protocol is not None:
            self.not_protocol = _check_protocol(self.not_protocol, f"{where}.notProtocol")
        self._check_icmp(where)
        self._check_ports(where)
        self._check_nets(where)

    def _check_icmp(self, where: str) -> None:
        number = protocol_number(self.protocol) if self.protocol is not None else None
        for name, value in (("icmp", self.icmp), ("notICMP", self.not_icmp)):
            if value is not None and number not in ICMP_VERSIONS:
                raise ValidationError(f"{where}.{name} needs protocol ICMP or ICMPv6")
        if number in ICMP_VERSIONS and self.ip_version not in (None, ICMP_VERSIONS[number]):
            raise ValidationError(
                f"{where}.ipVersion {self.ip_version} does not match protocol {self.protocol} "
                f"(IPv{ICMP_VERSIONS[number]})")

    def _check_ports(self, where: str) -> None:
        # Calico's rule: numbers and ranges need a protocol that has ports; a named port carries
        # its own protocol (from the endpoint), so it needs none, but a portless one forbids it.
        number = protocol_number(self.protocol) if self.protocol is not None else None
        for side, entity in (("source", self.source), ("destination", self.destination)):
            for name, ports in (("ports", entity.ports), ("notPorts", entity.not_ports)):
                if not ports:
                    continue
                numeric = any(not isinstance(parse_port(p), str) for p in ports)
                if number is None and numeric:
                    raise ValidationError(
                        f"{where}.{side}.{name}: port numbers and ranges need protocol TCP, UDP, SCTP or UDPLite")
                if number is not None and number not in PORT_PROTOCOLS:
                    raise ValidationError(f"{where}.{side}.{name}: protocol {self.protocol} has no ports; "
                                          "ports need protocol TCP, UDP, SCTP or UDPLite")

    def _check_nets(self, where: str) -> None:
        seen: set[int] = set()
        for side, entity in (("source", self.source), ("destination", self.destination)):
            for name, versions in entity.versions().items():
                if self.ip_version is not None and versions - {self.ip_version}:
                    raise ValidationError(
                        f"{where}.{side}.{name} has an IPv{(versions - {self.ip_version}).pop()} CIDR "
                        f"but ipVersion is {self.ip_version}")
                seen |= versions
                if len(seen) > 1:
                    raise ValidationError(
                        f"{where}.{side}.{name}: the rule mixes IPv4 and IPv6 CIDRs; split it in two")


# --- Policies and profiles -------------------------------------------------------------------


@dataclass
class PolicySpec:
    """What NetworkPolicy and GlobalNetworkPolicy share. ``order`` None means after every ordered policy."""

    order: float | None = None
    selector: str = "all()"
    types: list[str] = field(default_factory=list)
    ingress: list[Rule] = field(default_factory=list)
    egress: list[Rule] = field(default_factory=list)
    tier: str = ""
    service_account_selector: str = ""
    performance_hints: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if self.tier not in ("", "default"):
            raise ValidationError(f"{where}.tier {self.tier!r}: Tortie has only the default tier")
        _reject_unsupported(where, {"serviceAccountSelector": self.service_account_selector,
                                    "performanceHints": self.performance_hints},
                            "use selector")
        if self.order is not None:
            if not math.isfinite(self.order):
                raise ValidationError(f"{where}.order must be a finite number, not {self.order}")
            if self.order.is_integer():  # keep "order: 100" from coming back as 100.0
                self.order = int(self.order)
        self.selector = self.selector.strip() or "all()"
        _check_selector(self.selector, f"{where}.selector")
        self.types = [canonical(t, DIRECTIONS, f"{where}.types[{i}]") for i, t in enumerate(self.types)]
        for t in DIRECTIONS:
            if self.types.count(t) > 1:
                raise ValidationError(f"{where}.types lists {t} more than once")
        if not self.types:  # Calico's defaulting: by the rules present, Ingress when there are none
            self.types = ["Ingress"] if self.ingress or not self.egress else []
            self.types += ["Egress"] if self.egress else []
        for direction, rules in (("Ingress", self.ingress), ("Egress", self.egress)):
            if rules and direction not in self.types:
                raise ValidationError(
                    f"{where}.{direction.lower()} has rules but {where}.types does not include {direction}, "
                    "so they would never apply; add it to types or remove the rules")

    def applies_to(self, direction: str) -> bool:
        """Whether the policy governs ``Ingress`` or ``Egress`` traffic of the endpoints it selects."""
        return direction in self.types


@dataclass
class NetworkPolicySpec(PolicySpec):
    """A namespaced policy: its selector and its rules' selectors see only its own namespace,
    unless a rule's ``namespaceSelector`` says otherwise."""


@dataclass
class GlobalNetworkPolicySpec(PolicySpec):
    namespace_selector: str = ""
    # Host endpoint settings (datastore.hostendpoint): they change nothing for workload endpoints.
    do_not_track: bool | None = None
    pre_dnat: bool | None = json_field("preDNAT", default=None)
    apply_on_forward: bool | None = None

    def validate(self, where: str) -> None:
        super().validate(where)
        # Calico's validator: untracked and pre-DNAT policy see all forwarded traffic, so they must say
        # applyOnForward; pre-DNAT is ingress only; the two cannot be combined.
        if self.do_not_track and self.pre_dnat:
            raise ValidationError(f"{where}: preDNAT and doNotTrack cannot both be true")
        for name, value in (("doNotTrack", self.do_not_track), ("preDNAT", self.pre_dnat)):
            if value and not self.apply_on_forward:
                raise ValidationError(
                    f"{where}.{name} needs applyOnForward: true (it applies to forwarded traffic too)")
        if self.pre_dnat and "Egress" in self.types:
            raise ValidationError(f"{where}: a preDNAT policy applies to ingress only; remove Egress from types "
                                  "and the egress rules")
        self.namespace_selector = self.namespace_selector.strip()
        if self.namespace_selector:
            _check_selector(self.namespace_selector, f"{where}.namespaceSelector")


@dataclass
class ProfileSpec:
    """Rules applied to endpoints no policy governs in a direction, and labels given to its endpoints.

    ``kns.<namespace>`` profiles carry a namespace's labels (the CONTRACT's convention)."""

    labels_to_apply: dict[str, str] = field(default_factory=dict)
    ingress: list[Rule] = field(default_factory=list)
    egress: list[Rule] = field(default_factory=list)

    def validate(self, where: str) -> None:
        check_labels(self.labels_to_apply, f"{where}.labelsToApply")


class NetworkPolicy(Kind):
    KIND = "NetworkPolicy"
    PLURAL = "networkpolicies"
    # "networkpolicy" is always this kind; Kubernetes' NetworkPolicy is told apart by its apiVersion.
    SHORT_NAMES = ("networkpolicy", "netpol", "netpols", "np", "nps", "policy", "policies")
    NAMESPACED = True
    SPEC = NetworkPolicySpec
    TABLE = (("ORDER", "order"), ("SELECTOR", "selector"), ("TYPES", "types"))


class GlobalNetworkPolicy(Kind):
    KIND = "GlobalNetworkPolicy"
    PLURAL = "globalnetworkpolicies"
    SHORT_NAMES = ("globalnetworkpolicy", "gnp", "gnps", "globalpolicy", "globalpolicies")
    SPEC = GlobalNetworkPolicySpec
    TABLE = NetworkPolicy.TABLE
    WIDE = TABLE + (("NAMESPACESELECTOR", "namespaceSelector"),)


class Profile(Kind):
    KIND = "Profile"
    PLURAL = "profiles"
    SHORT_NAMES = ("profile", "pro", "pros")
    SPEC = ProfileSpec
    TABLE = (("LABELS", "labelsToApply"),)


POLICY_KINDS: tuple[type[Kind], ...] = (NetworkPolicy, GlobalNetworkPolicy, Profile)


def order_key(policy: Resource) -> tuple[float, str]:
    """Calico's evaluation order: by ``order`` (none last), ties broken by ``namespace/name``."""
    order = policy.spec.order
    name = f"{policy.namespace}/{policy.name}" if policy.namespace else policy.name
    return (math.inf if order is None else float(order), name)
