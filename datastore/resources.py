"""Tortie's resource kinds, with Calico v3's field names, and their validation.

Later issues add the policy and BGP kinds here; each kind is a :class:`Kind` subclass naming its
spec dataclass, registered in :data:`KINDS`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from datastore.errors import ValidationError
from datastore.model import Kind, check_labels, check_name, json_field

ENCAP_MODES = ("Never", "Always", "CrossSubnet")
BLOCK_SIZE_RANGE = {4: (20, 32), 6: (116, 128)}
DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


def parse_cidr(value: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValidationError(f"{where} {value!r} is not a CIDR") from None
    if str(net.network_address) != value.split("/")[0] and "/" in value:
        raise ValidationError(f"{where} {value!r} has host bits set; did you mean {net}?")
    return net


def check_selector(value: str, where: str) -> None:
    if value.strip() == "all()":
        return  # the default, valid without loading the parser (a one-shot plugin reads pools)
    from datastore import selector

    try:
        selector.parse(value)
    except selector.SelectorError as e:
        raise ValidationError(f"{where}: {e}") from None


def check_asn(value: int | None, where: str) -> None:
    if value is not None and not 1 <= value <= 4294967295:
        raise ValidationError(f"{where} {value} is out of range (1-4294967295)")


@dataclass
class IPPoolSpec:
    cidr: str
    block_size: int = 0  # 0 → the family's default, filled in by validate()
    ipip_mode: str = "Never"
    vxlan_mode: str = "Never"
    nat_outgoing: bool = False
    disabled: bool = False
    disable_bgp_export: bool = json_field("disableBGPExport", default=False)
    node_selector: str = "all()"
    strict_affinity: bool = False

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.cidr)

    def validate(self, where: str) -> None:
        net = parse_cidr(self.cidr, f"{where}.cidr")
        self.cidr = str(net)
        if any(net.overlaps(ll) for ll in _LINK_LOCAL if ll.version == net.version):
            raise ValidationError(f"{where}.cidr {net} overlaps the link-local range")
        low, high = BLOCK_SIZE_RANGE[net.version]
        if not self.block_size:
            self.block_size = DEFAULT_BLOCK_SIZE[net.version]
        if not low <= self.block_size <= high:
            raise ValidationError(
                f"{where}.blockSize {self.block_size} is out of range for IPv{net.version} ({low}-{high})")
        if self.block_size < net.prefixlen:
            raise ValidationError(
                f"{where}.blockSize {self.block_size} is larger than the pool {net} itself")
        for mode_field in ("ipip_mode", "vxlan_mode"):
            mode = getattr(self, mode_field)
            if mode not in ENCAP_MODES:
                name = "ipipMode" if mode_field == "ipip_mode" else "vxlanMode"
                raise ValidationError(f"{where}.{name} {mode!r} must be one of {', '.join(ENCAP_MODES)}")
        if self.ipip_mode != "Never" and self.vxlan_mode != "Never":
            raise ValidationError(f"{where}: ipipMode and vxlanMode cannot both be enabled")
        if net.version == 6 and self.ipip_mode != "Never":
            raise ValidationError(f"{where}.ipipMode: IPIP is not supported for IPv6 pools")
        self.node_selector = self.node_selector.strip() or "all()"
        check_selector(self.node_selector, f"{where}.nodeSelector")


@dataclass
class NodeBGPSpec:
    ipv4_address: str | None = None
    ipv6_address: str | None = None
    as_number: int | None = None
    route_reflector_cluster_id: str | None = json_field("routeReflectorClusterID", default=None)

    def validate(self, where: str) -> None:
        for attr, version, name in (("ipv4_address", 4, "ipv4Address"), ("ipv6_address", 6, "ipv6Address")):
            value = getattr(self, attr)
            if value is None:
                continue
            try:
                iface = ipaddress.ip_interface(value)
            except ValueError:
                raise ValidationError(f"{where}.{name} {value!r} is not an address") from None
            if iface.version != version:
                raise ValidationError(f"{where}.{name} {value!r} is not an IPv{version} address")
        check_asn(self.as_number, f"{where}.asNumber")
        if self.route_reflector_cluster_id is not None:
            try:
                ipaddress.IPv4Address(self.route_reflector_cluster_id)
            except ValueError:
                raise ValidationError(
                    f"{where}.routeReflectorClusterID {self.route_reflector_cluster_id!r} "
                    "must be an IPv4 address (e.g. 224.0.0.1)") from None


@dataclass
class NodeAddress:
    address: str
    type: str = "InternalIP"


@dataclass
class NodeSpec:
    bgp: NodeBGPSpec | None = None
    addresses: list[NodeAddress] = field(default_factory=list)
    ipv4_vxlan_tunnel_addr: str | None = json_field("ipv4VXLANTunnelAddr", default=None)
    vxlan_tunnel_mac_addr: str | None = json_field("vxlanTunnelMACAddr", default=None)


@dataclass
class NodeStatus:
    """What the node's agent reports about itself (Calico's ``NodeStatus``): its WireGuard public key,
    base64, empty when WireGuard is off on that node. Written by the agent only, never the private key."""

    wireguard_public_key: str = ""

    def validate(self, where: str) -> None:
        if self.wireguard_public_key:
            import base64
            import binascii

            try:
                raw = base64.b64decode(self.wireguard_public_key, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 32:
                raise ValidationError(f"{where}.wireguardPublicKey is not a base64 32-byte key")


@dataclass
class EndpointPort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass
class WorkloadEndpointSpec:
    node: str
    interface_name: str
    container_id: str = json_field("containerID", default="")
    orchestrator: str = "cni"
    workload: str = ""
    pod: str = ""
    endpoint: str = "eth0"
    network: str = ""
    mac: str = ""
    ip_networks: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    ports: list[EndpointPort] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if not self.container_id:
            raise ValidationError(f"{where}.containerID is required")
        for i, net in enumerate(self.ip_networks):
            try:
                ipaddress.ip_interface(net)
            except ValueError:
                raise ValidationError(f"{where}.ipNetworks[{i}] {net!r} is not an address/prefix") from None


@dataclass
class IPAMConfigurationSpec:
    max_blocks_per_host: int = 20

    def validate(self, where: str) -> None:
        if self.max_blocks_per_host < 0:
            raise ValidationError(f"{where}.maxBlocksPerHost must be 0 (no limit) or more")


@dataclass
class IPReservationSpec:
    """Addresses IPAM must not hand out (Calico's ``IPReservation``): CIDRs or single addresses, v4 or
    v6, kept as written. Host bits set in a CIDR are refused, as an IPPool's are."""

    reserved_cidrs: list[str] = json_field("reservedCIDRs", default_factory=list)

    def validate(self, where: str) -> None:
        for i, value in enumerate(self.reserved_cidrs):
            if not isinstance(value, str):
                raise ValidationError(f"{where}.reservedCIDRs[{i}] {value!r} is not a CIDR or an address")
            parse_cidr(value.strip(), f"{where}.reservedCIDRs[{i}]")
            self.reserved_cidrs[i] = value.strip()

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c) for c in self.reserved_cidrs]


class IPPool(Kind):
    KIND = "IPPool"
    PLURAL = "ippools"
    SHORT_NAMES = ("ippool", "pool", "pools")
    SPEC = IPPoolSpec
    TABLE = (("CIDR", "cidr"), ("BLOCKSIZE", "blockSize"), ("DISABLED", "disabled"))
    WIDE = TABLE + (("IPIP", "ipipMode"), ("VXLAN", "vxlanMode"), ("NAT", "natOutgoing"),
                    ("STRICT", "strictAffinity"), ("SELECTOR", "nodeSelector"))


class Node(Kind):
    KIND = "Node"
    PLURAL = "nodes"
    SHORT_NAMES = ("node", "no")
    SPEC = NodeSpec
    STATUS = NodeStatus
    TABLE = (("ASN", "bgp.asNumber"), ("IPV4", "bgp.ipv4Address"))
    WIDE = TABLE + (("IPV6", "bgp.ipv6Address"), ("RR-CLUSTER", "bgp.routeReflectorClusterID"))


class WorkloadEndpoint(Kind):
    KIND = "WorkloadEndpoint"
    PLURAL = "workloadendpoints"
    SHORT_NAMES = ("workloadendpoint", "wep", "weps")
    NAMESPACED = True
    SPEC = WorkloadEndpointSpec
    TABLE = (("NODE", "node"), ("NETWORKS", "ipNetworks"), ("INTERFACE", "interfaceName"))
    WIDE = TABLE + (("CONTAINER", "containerID"), ("MAC", "mac"), ("POD", "pod"))


class IPAMConfiguration(Kind):
    KIND = "IPAMConfiguration"
    PLURAL = "ipamconfigurations"
    SHORT_NAMES = ("ipamconfiguration", "ipamconfig")
    SPEC = IPAMConfigurationSpec
    TABLE = (("MAXBLOCKSPERHOST", "maxBlocksPerHost"),)


class IPReservation(Kind):
    KIND = "IPReservation"
    PLURAL = "ipreservations"
    SHORT_NAMES = ("ipreservation",)
    SPEC = IPReservationSpec
    TABLE = (("RESERVEDCIDRS", "reservedCIDRs"),)


KINDS: dict[str, type[Kind]] = {}


def register(*kinds: type[Kind]) -> None:
    for kind in kinds:
        for alias in (kind.KIND, kind.PLURAL, *kind.SHORT_NAMES):
            KINDS[alias.lower()] = kind


register(IPPool, Node, WorkloadEndpoint, IPAMConfiguration, IPReservation)


def all_kinds() -> dict[str, type[Kind]]:
    """Every kind, by each of its lower-case names (the policy and BGP kinds loaded on first use)."""
    _load_all()
    return KINDS


def _load_all() -> None:
    # The policy and BGP kinds live in their own modules, which import nothing from this one (no
    # cycle). Loaded on demand: a CNI call, which decodes pools and endpoints only, would pay
    # ~15 ms of CPU building their dataclasses.
    if "networkpolicy" not in KINDS:
        from datastore.bgp import BGP_KINDS
        from datastore.felixconfig import FELIX_KINDS
        from datastore.hostendpoint import HOST_ENDPOINT_KINDS
        from datastore.policy import POLICY_KINDS

        register(*POLICY_KINDS, *BGP_KINDS, *FELIX_KINDS)
        register(*HOST_ENDPOINT_KINDS)
        from datastore.netsets import NETSET_KINDS  # GlobalNetworkSet, NetworkSet

        register(*NETSET_KINDS)


def kind_named(name: str) -> type[Kind]:
    """A kind by any of its names, in any case (``IPPool``, ``ippools``, ``pool``...)."""
    kind = KINDS.get(name.lower())
    if kind is None:
        _load_all()
        kind = KINDS.get(name.lower())
    if kind is None:
        known = sorted({k.KIND for k in KINDS.values()})
        raise ValidationError(f"unknown resource kind {name!r} (known: {', '.join(known)})")
    return kind


def check_metadata_name(kind: type[Kind], name: str) -> None:
    check_name(name, f"{kind.KIND} name")


def validate_labels(labels: dict[str, Any], where: str) -> None:
    check_labels(labels, where)

