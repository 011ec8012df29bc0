"""Calico v3's network sets: ``GlobalNetworkSet`` (cluster-wide) and ``NetworkSet`` (namespaced).

A network set names address ranges outside the cluster (``spec.nets``) and carries labels
(``metadata.labels``), so that a policy rule's ``selector`` can match it as it matches endpoints:
its nets join the IP set the selector resolves to (``felix_agent.calc.selector_index``). This
module owns the two kinds and the check of ``nets``; it must not know how a selector reaches them.

``nets`` entries are CIDRs or bare addresses, IPv4 or IPv6, mixed freely (each family goes to its
own kernel set). As in a policy rule's ``nets`` (and Calico's ``ParseCIDROrIP``), host bits are
forgiven: ``10.0.0.1/24`` is stored as ``10.0.0.0/24``, and a bare address as itself with its full
prefix (``198.51.100.7/32``), so that what ``netctl get`` shows is what the kernel holds.

Imports only the model and the errors: ``datastore.resources`` imports this module to register the
kinds, never the other way round.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from datastore.errors import ValidationError
from datastore.model import Kind

MAX_NETS = 100_000  # a set far larger than any policy needs is a mistake (and megabytes in etcd)


def check_nets(nets: list[str], where: str) -> list[str]:
    """``nets`` in canonical form (networks, no duplicates, order kept); the first bad entry is named."""
    if len(nets) > MAX_NETS:
        raise ValidationError(f"{where} has {len(nets)} entries; at most {MAX_NETS} are accepted")
    canonical: dict[str, None] = {}
    for i, value in enumerate(nets):
        try:
            net = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValidationError(f"{where}[{i}] {value!r} is not a CIDR or an IP address") from None
        canonical[str(net)] = None
    return list(canonical)


@dataclass
class NetworkSetSpec:
    """What a GlobalNetworkSet and a NetworkSet hold: the networks their labels stand for."""

    nets: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        self.nets = check_nets(self.nets, f"{where}.nets")


@dataclass
class GlobalNetworkSetSpec(NetworkSetSpec):
    """Matched by GlobalNetworkPolicy rules, and by NetworkPolicy rules whose namespaceSelector is ``global()``."""


class GlobalNetworkSet(Kind):
    KIND = "GlobalNetworkSet"
    PLURAL = "globalnetworksets"
    SHORT_NAMES = ("globalnetworkset", "gns", "gnsets")
    SPEC = GlobalNetworkSetSpec
    TABLE = (("NETS", "nets"),)


class NetworkSet(Kind):
    KIND = "NetworkSet"
    PLURAL = "networksets"
    SHORT_NAMES = ("networkset", "netset", "netsets")
    NAMESPACED = True
    SPEC = NetworkSetSpec
    TABLE = (("NETS", "nets"),)


NETSET_KINDS: tuple[type[Kind], ...] = (GlobalNetworkSet, NetworkSet)
