"""Calico v3's ``HostEndpoint`` kind: one of a host's own interfaces (or all of them), to which policy applies.

Owns the resource's shape and its validation, with Calico's field names: ``spec.node`` (the host),
``interfaceName`` (a name, or ``"*"`` for every interface of the host that is not a workload's),
``expectedIPs`` (the interface's addresses, what rule selectors resolve the endpoint to),
``profiles`` and ``ports`` (named ports, as a WorkloadEndpoint's). Its labels are the metadata's
labels, matched by policy selectors as a workload's are. As in Calico, a HostEndpoint needs either an
``interfaceName`` or at least one expected IP (Tortie programs the interface by name, so one without
a name matches the interface that holds one of the addresses: not built; refused with a message).

Imports only the model and the errors; what an agent does with a host endpoint is
``felix_agent.calc.host_endpoints``' and ``felix_agent.dataplane.host_policy``'s business.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from datastore.errors import ValidationError
from datastore.model import Kind, json_field

ALL_INTERFACES = "*"
AUTO_SUFFIX = "-auto-hep"  # <node>-auto-hep, the name of an automatic host endpoint (as Calico's)
DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"  # the profile Calico gives automatic host endpoints
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # IFNAMSIZ - 1, no '/' or blanks
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9](-?[a-z0-9])*$")
_PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass
class HostEndpointPort:
    """A named port of the host (``ports[]``): policy rules may name it instead of a number."""

    name: str
    port: int
    protocol: str = "TCP"

    def validate(self, where: str) -> None:
        if len(self.name) > 15 or not _PORT_NAME.match(self.name):
            raise ValidationError(f"{where}.name {self.name!r} is not a port name "
                                  "(at most 15 lower-case letters, digits and '-', with at least one letter)")
        if not 1 <= self.port <= 65535:
            raise ValidationError(f"{where}.port {self.port} is out of range (1-65535)")
        for choice in _PROTOCOLS:
            if self.protocol.lower() == choice.lower():
                self.protocol = choice
                return
        raise ValidationError(f"{where}.protocol {self.protocol!r} must be one of {', '.join(_PROTOCOLS)}")


@dataclass
class HostEndpointSpec:
    node: str = ""
    interface_name: str = ""
    expected_ips: list[str] = json_field("expectedIPs", default_factory=list)
    profiles: list[str] = field(default_factory=list)
    ports: list[HostEndpointPort] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if not self.node:
            raise ValidationError(f"{where}.node is required (the host this endpoint belongs to)")
        name = self.interface_name
        if name and name != ALL_INTERFACES and not _IFNAME.match(name):
            raise ValidationError(f"{where}.interfaceName {name!r} is not an interface name "
                                  "(1-15 letters, digits, '.', '-', '_') or '*'")
        for i, value in enumerate(self.expected_ips):
            try:
                self.expected_ips[i] = str(ipaddress.ip_address(str(value).strip()))
            except ValueError:
                raise ValidationError(f"{where}.expectedIPs[{i}] {value!r} is not an IP address") from None
        if not name:
            raise ValidationError(
                f"{where}.interfaceName is required: give the interface's name, or '*' for all of the "
                "host's interfaces (Tortie does not find an interface by its expectedIPs)")
        names = [p.name for p in self.ports]
        if len(set(names)) != len(names):
            raise ValidationError(f"{where}.ports names a port twice")

    @property
    def all_interfaces(self) -> bool:
        return self.interface_name == ALL_INTERFACES


class HostEndpoint(Kind):
    KIND = "HostEndpoint"
    PLURAL = "hostendpoints"
    SHORT_NAMES = ("hostendpoint", "hep", "heps")
    SPEC = HostEndpointSpec
    TABLE = (("NODE", "node"), ("INTERFACE", "interfaceName"))
    WIDE = TABLE + (("EXPECTEDIPS", "expectedIPs"), ("PROFILES", "profiles"))


HOST_ENDPOINT_KINDS: tuple[type[Kind], ...] = (HostEndpoint,)


def auto_name(node: str) -> str:
    """The name of ``node``'s automatic host endpoint."""
    return node + AUTO_SUFFIX
