"""The value types of Calico's BGP options: communities, prefix advertisements, service CIDRs,
durations, and the checks each needs. Shared by ``datastore.bgp`` (which puts them in its specs)
and ``bgp.config`` (which reads them); imports only the errors and the name check.

Communities are written as Calico writes them: standard ``aa:nn`` (two 16-bit numbers, RFC 1997)
or large ``aa:nn:mm`` (three 32-bit numbers, RFC 8092); a prefix advertisement names them by the
``name`` given under ``communities`` or gives the value itself.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from datastore.errors import ValidationError
from datastore.model import check_name

_STANDARD = re.compile(r"^(\d+):(\d+)$")
_LARGE = re.compile(r"^(\d+):(\d+):(\d+)$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def community_kind(value: str) -> str | None:
    """"standard" or "large" for a well-formed community value, None otherwise."""
    if m := _STANDARD.match(value):
        return "standard" if all(int(g) <= 0xFFFF for g in m.groups()) else None
    if m := _LARGE.match(value):
        return "large" if all(int(g) <= 0xFFFFFFFF for g in m.groups()) else None
    return None


def check_community(value: str, where: str) -> str:
    text = value.strip()
    if community_kind(text) is None:
        raise ValidationError(f"{where} {value!r} is not a community (standard aa:nn with numbers 0-65535, or "
                              "large aa:nn:mm with numbers 0-4294967295)")
    return text


@dataclass
class Community:
    name: str
    value: str

    def validate(self, where: str) -> None:
        if not self.name.strip():
            raise ValidationError(f"{where}.name must not be empty")
        self.value = check_community(self.value, f"{where}.value")


@dataclass
class PrefixAdvertisement:
    cidr: str
    communities: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        self.cidr = check_cidr(self.cidr, f"{where}.cidr")


@dataclass
class ServiceCIDR:
    cidr: str

    def validate(self, where: str) -> None:
        self.cidr = check_cidr(self.cidr, f"{where}.cidr")


def check_cidr(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValidationError(f"{where} {value!r} is not a CIDR (such as 10.96.0.0/12)") from None


def resolve_communities(given: list[str], defined: list[Community], where: str) -> list[str]:
    """The values ``given`` stands for: a defined community's name, or a literal value."""
    by_name = {c.name: c.value for c in defined}
    out = []
    for i, item in enumerate(given):
        if item in by_name:
            out.append(by_name[item])
        elif community_kind(item.strip()) is not None:
            out.append(item.strip())
        else:
            raise ValidationError(f"{where}[{i}] {item!r} is neither a community defined under spec.communities "
                                  "nor a community value (aa:nn or aa:nn:mm)")
    return out


def check_services(cidrs: list[ServiceCIDR], where: str) -> None:
    seen: set[str] = set()
    for i, s in enumerate(cidrs):
        if s.cidr in seen:
            raise ValidationError(f"{where}[{i}].cidr {s.cidr} is listed twice")
        seen.add(s.cidr)


def check_duration(value: str, where: str) -> int:
    """Whole seconds of a Kubernetes duration (``120s``, ``2m``, ``1h30m``)."""
    text = value.strip()
    if not text or _DURATION.sub("", text):
        raise ValidationError(f"{where} {value!r} is not a duration (such as 120s, 2m or 1h30m)")
    return round(sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text)))


def check_filter_names(names: list[str], where: str) -> None:
    for i, name in enumerate(names):
        check_name(name, f"{where}[{i}]")
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ValidationError(f"{where}: filter {dup!r} is named twice")
