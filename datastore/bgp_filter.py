"""Calico's ``BGPFilter`` kind: ordered Accept/Reject rules for the routes exported to and imported
from the BGP peers whose ``BGPPeer.spec.filters`` name it. Owns the document and its validation
(one line naming the field); what a rule matches, and the decision, is ``bgp.filters``.

A rule is ``action`` (Accept or Reject) plus what it matches, all optional and all required to
match: ``cidr`` with ``matchOperator`` (Equal, NotEqual, In, NotIn; given together),
``prefixLength`` {min, max} (with ``cidr``), ``source: RemotePeers`` (routes learned from a BGP
peer), ``interface`` (routes out of an interface: a name, ``*`` as wildcard). A rule with no match
field matches everything. Imports only the model and the errors.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from datastore.errors import ValidationError
from datastore.model import Kind

ACTIONS = ("Accept", "Reject")
OPERATORS = ("Equal", "NotEqual", "In", "NotIn")
SOURCES = ("RemotePeers",)
DIRECTIONS = (("export_v4", "exportV4", 4), ("import_v4", "importV4", 4),
              ("export_v6", "exportV6", 6), ("import_v6", "importV6", 6))


@dataclass
class PrefixLength:
    min: int | None = None
    max: int | None = None


@dataclass
class BGPFilterRule:
    action: str
    match_operator: str = ""
    cidr: str = ""
    prefix_length: PrefixLength | None = None
    source: str = ""
    interface: str = ""

    def check(self, version: int, where: str) -> None:
        if self.action not in ACTIONS:
            raise ValidationError(f"{where}.action {self.action!r} must be Accept or Reject")
        if bool(self.cidr) != bool(self.match_operator):
            raise ValidationError(f"{where}: cidr and matchOperator must be given together")
        if self.match_operator and self.match_operator not in OPERATORS:
            raise ValidationError(f"{where}.matchOperator {self.match_operator!r} must be one of "
                                  f"{', '.join(OPERATORS)}")
        bits = 32 if version == 4 else 128
        if self.cidr:
            try:
                net = ipaddress.ip_network(self.cidr.strip(), strict=False)
            except ValueError:
                raise ValidationError(f"{where}.cidr {self.cidr!r} is not a CIDR") from None
            if net.version != version:
                raise ValidationError(f"{where}.cidr {self.cidr!r} is not an IPv{version} CIDR "
                                      f"(IPv{net.version} rules go under the V{net.version} lists)")
            self.cidr = str(net)
        if self.prefix_length is not None:
            if not self.cidr:
                raise ValidationError(f"{where}.prefixLength needs cidr and matchOperator")
            low, high = self.prefix_length.min, self.prefix_length.max
            for name, value in (("min", low), ("max", high)):
                if value is not None and not 0 <= value <= bits:
                    raise ValidationError(f"{where}.prefixLength.{name} {value} is out of range (0-{bits})")
            if low is not None and high is not None and low > high:
                raise ValidationError(f"{where}.prefixLength: min {low} is greater than max {high}")
        if self.source and self.source not in SOURCES:
            raise ValidationError(f"{where}.source {self.source!r} must be RemotePeers")
        if self.interface and not self.interface.strip():
            raise ValidationError(f"{where}.interface must not be blank")


@dataclass
class BGPFilterSpec:
    export_v4: list[BGPFilterRule] = field(default_factory=list)
    import_v4: list[BGPFilterRule] = field(default_factory=list)
    export_v6: list[BGPFilterRule] = field(default_factory=list)
    import_v6: list[BGPFilterRule] = field(default_factory=list)

    def validate(self, where: str) -> None:
        for attr, name, version in DIRECTIONS:
            for i, rule in enumerate(getattr(self, attr)):
                rule.check(version, f"{where}.{name}[{i}]")


class BGPFilter(Kind):
    KIND = "BGPFilter"
    PLURAL = "bgpfilters"
    SHORT_NAMES = ("bgpfilter",)
    SPEC = BGPFilterSpec
