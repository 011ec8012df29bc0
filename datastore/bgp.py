"""Calico v3's BGP kinds: ``BGPConfiguration``, ``BGPPeer`` and ``BGPFilter``, their validation.

Field names and meaning follow Calico's API (``api/pkg/apis/projectcalico/v3``): the
``BGPConfiguration`` named ``default`` holds the cluster's AS number, whether the node-to-node mesh
is on and the BGP port; a ``BGPPeer`` says which nodes (``node``, ``nodeSelector``, or every node)
peer with what (``peerIP`` + ``asNumber``, or the nodes ``peerSelector`` selects) and with which
per-session options and ``filters`` (``BGPFilter`` names, applied in order). Validation
happens once, while a document is decoded, and names the field path of the problem; afterwards AS
numbers are plain integers (asdot ``1.10`` converted) and peer addresses canonical.

What needs other resources (a ``node`` that must exist) is ``datastore.references``, called by
``netctl`` before it writes. Turning these resources into a speaker's configuration is
``bgp.config``'s job, not this module's.

Imports only the model, the selector grammar and the errors: ``datastore.resources`` imports this
module to register the kinds, never the other way round.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from datastore import selector
from datastore.bgp_filter import BGPFilter
from datastore.bgp_options import (
    Community,
    PrefixAdvertisement,
    ServiceCIDR,
    check_duration,
    check_filter_names,
    check_services,
    resolve_communities,
)
from datastore.errors import ValidationError
from datastore.model import Kind, check_name, json_field

ASN_MAX = 4294967295
PORT_MAX = 65535
TCP_MD5_KEY_MAX = 80  # bytes; the kernel's TCP_MD5SIG_MAXKEYLEN
DEFAULT_CONFIGURATION = "default"  # the BGPConfiguration that holds the cluster-wide settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_ASDOT = re.compile(r"^(\d+)\.(\d+)$")
_BRACKETED = re.compile(r"^\[(?P<ip>[^\]]+)\]:(?P<port>\d+)$")  # [fd00::1]:179
_WITH_PORT = re.compile(r"^(?P<ip>[\d.]+):(?P<port>\d+)$")  # 10.0.0.1:179


def parse_asn(value: int | float | str, where: str) -> int:
    """An AS number as an integer: ``64512``, ``"64512"`` or asdot ``"1.10"`` (= 1 * 65536 + 10)."""
    if isinstance(value, float):
        # YAML reads an unquoted 1.10 as the float 1.1: the ".10" is already lost.
        raise ValidationError(f"{where} {value} is not an AS number; write asdot numbers quoted ('1.10')")
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif m := _ASDOT.match(text):
            high, low = int(m[1]), int(m[2])
            if high > 65535 or low > 65535:
                raise ValidationError(f"{where} {value!r}: both halves of an asdot number must be 0-65535")
            value = high * 65536 + low
        else:
            raise ValidationError(f"{where} {value!r} is not an AS number (1-{ASN_MAX}, or asdot such as '1.10')")
    if not 1 <= value <= ASN_MAX:
        raise ValidationError(f"{where} {value} is out of range (1-{ASN_MAX})")
    return value


def parse_peer_address(value: str, where: str) -> tuple[Address, int | None]:
    """``ip``, ``ipv4:port`` or ``[ipv6]:port`` as (address, port or None)."""
    text = value.strip()
    host, port = text, None
    if m := _BRACKETED.match(text) or _WITH_PORT.match(text):
        host, port = m["ip"], int(m["port"])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValidationError(
            f"{where} {value!r} is not an IP address (give an address, ipv4:port or [ipv6]:port)") from None
    if address.is_unspecified or address.is_multicast:
        raise ValidationError(f"{where} {value!r} cannot be a BGP peer (unspecified or multicast address)")
    if port is not None and not 1 <= port <= PORT_MAX:
        raise ValidationError(f"{where} {value!r}: port {port} is out of range (1-{PORT_MAX})")
    return address, port


def format_peer_address(address: Address, port: int | None) -> str:
    if port is None:
        return str(address)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _check_selector(value: str, where: str) -> str:
    text = value.strip()
    try:
        selector.parse(text)
    except selector.SelectorError as e:
        raise ValidationError(f"{where}: {e}") from None
    return text


@dataclass
class BGPConfigurationSpec:
    # Typed loosely so that asdot strings decode; validate() leaves an int (or None) behind.
    as_number: int | float | str | None = None
    node_to_node_mesh_enabled: bool = True
    listen_port: int = 179
    log_severity_screen: str = ""  # accepted for Calico files; the speaker logs through the agent
    communities: list[Community] = field(default_factory=list)
    prefix_advertisements: list[PrefixAdvertisement] = field(default_factory=list)
    service_cluster_ips: list[ServiceCIDR] = json_field("serviceClusterIPs", default_factory=list)
    service_external_ips: list[ServiceCIDR] = json_field("serviceExternalIPs", default_factory=list)
    service_load_balancer_ips: list[ServiceCIDR] = json_field("serviceLoadBalancerIPs", default_factory=list)

    @property
    def asn(self) -> int | None:
        return None if self.as_number is None else int(self.as_number)

    def validate(self, where: str) -> None:
        if self.as_number is not None:
            self.as_number = parse_asn(self.as_number, f"{where}.asNumber")
        if not 1 <= self.listen_port <= PORT_MAX:
            raise ValidationError(f"{where}.listenPort {self.listen_port} is out of range (1-{PORT_MAX})")
        names: set[str] = set()
        for i, c in enumerate(self.communities):
            if c.name in names:
                raise ValidationError(f"{where}.communities[{i}].name {c.name!r} is defined twice")
            names.add(c.name)
        for i, a in enumerate(self.prefix_advertisements):
            resolve_communities(a.communities, self.communities, f"{where}.prefixAdvertisements[{i}].communities")
        for name, cidrs in (("serviceClusterIPs", self.service_cluster_ips),
                            ("serviceExternalIPs", self.service_external_ips),
                            ("serviceLoadBalancerIPs", self.service_load_balancer_ips)):
            check_services(cidrs, f"{where}.{name}")

    def advertised_communities(self) -> list[tuple[str, list[str]]]:
        """(cidr, community values) per ``prefixAdvertisements`` entry, names resolved."""
        return [(a.cidr, resolve_communities(a.communities, self.communities, "")) for a in self.prefix_advertisements]

    def service_cidrs(self) -> list[str]:
        """Every service CIDR the nodes announce (cluster, external, load-balancer), in order."""
        return [s.cidr for s in (*self.service_cluster_ips, *self.service_external_ips,
                                 *self.service_load_balancer_ips)]


@dataclass
class BGPPasswordFile:
    path: str


@dataclass
class BGPPassword:
    """Where the TCP-MD5 key is: ``file.path`` on the node. Calico's ``secretKeyRef`` names a
    Kubernetes secret, which Tortie does not have."""

    file: BGPPasswordFile | None = None
    secret_key_ref: dict[str, str] | None = None

    def validate(self, where: str) -> None:
        if self.secret_key_ref is not None:
            raise ValidationError(f"{where}.secretKeyRef is not supported (no Kubernetes secrets): put the key in "
                                  "a file on the nodes and give its path as password.file.path")
        if self.file is None:
            raise ValidationError(f"{where}.file is required (password: {{file: {{path: /path/to/key}}}})")
        if not self.file.path.startswith("/"):
            raise ValidationError(f"{where}.file.path {self.file.path!r} must be an absolute path")


@dataclass
class BGPPeerSpec:
    node: str | None = None
    peer_ip: str | None = json_field("peerIP", default=None)
    as_number: int | float | str | None = None
    node_selector: str = ""
    peer_selector: str = ""
    # Calico takes {secretKeyRef: ...}; Tortie has no secret store: the key is in a file on the
    # nodes and only its path is in etcd. A plain string is refused by validate().
    password: BGPPassword | str | None = None
    keep_original_next_hop: bool = False
    local_as_number: int | float | str | None = json_field("localASNumber", default=None)
    max_restart_time: str | None = None  # a duration, "120s"
    source_address: str = "UseNodeIP"
    num_allowed_local_as_numbers: int | None = json_field("numAllowedLocalASNumbers", default=None)
    ttl_security: int | None = None  # hops (GTSM)
    filters: list[str] = field(default_factory=list)

    @property
    def local_asn(self) -> int | None:
        return None if self.local_as_number is None else int(self.local_as_number)

    @property
    def password_path(self) -> str | None:
        if isinstance(self.password, BGPPassword) and self.password.file is not None:
            return self.password.file.path
        return None

    @property
    def restart_seconds(self) -> int | None:
        return None if self.max_restart_time is None else check_duration(self.max_restart_time, "maxRestartTime")

    @property
    def asn(self) -> int | None:
        return None if self.as_number is None else int(self.as_number)

    def address(self) -> tuple[Address, int | None] | None:
        """The peer's address and port (None: the default), or None for a ``peerSelector`` peer."""
        return parse_peer_address(self.peer_ip, "peerIP") if self.peer_ip else None

    @property
    def is_global(self) -> bool:
        """Whether every node peers (neither ``node`` nor ``nodeSelector`` is set)."""
        return not self.node and not self.node_selector

    def validate(self, where: str) -> None:
        if self.node is not None:
            check_name(self.node, f"{where}.node")
        self.node_selector = _check_selector(self.node_selector, f"{where}.nodeSelector") \
            if self.node_selector.strip() else ""
        if self.node and self.node_selector:
            raise ValidationError(
                f"{where}: node and nodeSelector cannot both be set (node names one node, "
                "nodeSelector selects several)")
        if self.peer_selector.strip():
            if self.peer_ip:
                raise ValidationError(
                    f"{where}: peerIP and peerSelector cannot both be set (peerSelector peers with "
                    "the nodes it selects, at their own addresses)")
            if self.as_number is not None:
                raise ValidationError(
                    f"{where}.asNumber must not be set with peerSelector (each selected node's own AS "
                    "number is used)")
            self.peer_selector = _check_selector(self.peer_selector, f"{where}.peerSelector")
        else:
            self.peer_selector = ""
            if not self.peer_ip:
                raise ValidationError(f"{where}: one of peerIP or peerSelector is required")
            address, port = parse_peer_address(self.peer_ip, f"{where}.peerIP")
            self.peer_ip = format_peer_address(address, port)
            if self.as_number is None:
                raise ValidationError(f"{where}.asNumber is required with peerIP")
        if self.as_number is not None:
            self.as_number = parse_asn(self.as_number, f"{where}.asNumber")
        if isinstance(self.password, str):
            raise ValidationError(
                f"{where}.password must not hold the key itself (it would be stored in etcd): put it in a file "
                "on the nodes and give password: {file: {path: /path/to/key}}")
        if self.local_as_number is not None:
            self.local_as_number = parse_asn(self.local_as_number, f"{where}.localASNumber")
        if self.max_restart_time is not None:
            seconds = check_duration(self.max_restart_time, f"{where}.maxRestartTime")
            if not 1 <= seconds <= 4095:
                raise ValidationError(f"{where}.maxRestartTime {self.max_restart_time!r} must be 1s to 4095s "
                                      "(BGP's graceful-restart time is 12 bits)")
        if self.source_address not in ("UseNodeIP", "None"):
            raise ValidationError(f"{where}.sourceAddress {self.source_address!r} must be UseNodeIP or None")
        if self.num_allowed_local_as_numbers is not None and not 0 <= self.num_allowed_local_as_numbers <= 10:
            raise ValidationError(f"{where}.numAllowedLocalASNumbers {self.num_allowed_local_as_numbers} must be "
                                  "0-10 (how often our own AS may appear in a received AS path)")
        if self.ttl_security is not None and not 0 <= self.ttl_security <= 254:
            raise ValidationError(f"{where}.ttlSecurity {self.ttl_security} must be 0-254 (the number of hops "
                                  "to the peer; 0: off)")
        check_filter_names(self.filters, f"{where}.filters")


class BGPConfiguration(Kind):
    KIND = "BGPConfiguration"
    PLURAL = "bgpconfigurations"
    SHORT_NAMES = ("bgpconfiguration", "bgpconfig", "bgpconfigs")
    SPEC = BGPConfigurationSpec
    TABLE = (("LOGSEVERITY", "logSeverityScreen"), ("MESHENABLED", "nodeToNodeMeshEnabled"),
             ("ASNUMBER", "asNumber"))
    WIDE = TABLE + (("LISTENPORT", "listenPort"),)


class BGPPeer(Kind):
    KIND = "BGPPeer"
    PLURAL = "bgppeers"
    SHORT_NAMES = ("bgppeer",)
    SPEC = BGPPeerSpec
    TABLE = (("PEERIP", "peerIP"), ("NODE", "node"), ("ASN", "asNumber"))
    WIDE = TABLE + (("NODESELECTOR", "nodeSelector"), ("PEERSELECTOR", "peerSelector"), ("FILTERS", "filters"))


BGP_KINDS: tuple[type[Kind], ...] = (BGPConfiguration, BGPPeer, BGPFilter)
