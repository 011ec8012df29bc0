"""Calico v3's BGP kinds: ``BGPConfiguration`` and ``BGPPeer``, their validation and reference checks.

Field names and meaning follow Calico's API (``api/pkg/apis/projectcalico/v3``): the
``BGPConfiguration`` named ``default`` holds the cluster's AS number, whether the node-to-node mesh
is on and the BGP port; a ``BGPPeer`` says which nodes (``node``, ``nodeSelector``, or every node)
peer with what (``peerIP`` + ``asNumber``, or the nodes ``peerSelector`` selects). Validation
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
from dataclasses import dataclass

from datastore import selector
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

    @property
    def asn(self) -> int | None:
        return None if self.as_number is None else int(self.as_number)

    def validate(self, where: str) -> None:
        if self.as_number is not None:
            self.as_number = parse_asn(self.as_number, f"{where}.asNumber")
        if not 1 <= self.listen_port <= PORT_MAX:
            raise ValidationError(f"{where}.listenPort {self.listen_port} is out of range (1-{PORT_MAX})")


@dataclass
class BGPPeerSpec:
    node: str | None = None
    peer_ip: str | None = json_field("peerIP", default=None)
    as_number: int | float | str | None = None
    node_selector: str = ""
    peer_selector: str = ""
    # Calico takes {secretKeyRef: ...}; Tortie has no secret store, so the TCP-MD5 key is given as is.
    password: str | None = None
    keep_original_next_hop: bool = False

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
        if self.password is not None and not 1 <= len(self.password.encode()) <= TCP_MD5_KEY_MAX:
            raise ValidationError(f"{where}.password must be 1-{TCP_MD5_KEY_MAX} bytes (a TCP-MD5 key)")


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
    WIDE = TABLE + (("NODESELECTOR", "nodeSelector"), ("PEERSELECTOR", "peerSelector"))


BGP_KINDS: tuple[type[Kind], ...] = (BGPConfiguration, BGPPeer)
