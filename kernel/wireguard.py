"""WireGuard devices over netlink: create the link, configure it (``WG_CMD_SET_DEVICE``), read it back
(``WG_CMD_GET_DEVICE``), and the firewall-mark routing rule a WireGuard setup needs.

Owns the ``wireguard`` generic netlink family's attributes (``WGDEVICE_A_*``, ``WGPEER_A_*``,
``WGALLOWEDIP_A_*``, from the kernel's ``uapi/linux/wireguard.h``) and the rtnetlink rule
``[not] fwmark M/M lookup T`` (what ``ip rule add not fwmark ...`` sends). What ``wg`` and
``wg-quick`` do, without exec'ing them. Reads return plain values; writes do exactly what they are
told. Must not know any Tortie concept. Standard library only.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from kernel.genl import GenericSocket
from kernel.netlink import (
    NLA_F_NESTED,
    NLM_F_CREATE,
    NLM_F_EXCL,
    KernelError,
    Socket,
    attr,
    attr_list,
    attrs,
    u32,
)
from kernel.rtnl import ifinfo

WG_GENL_NAME, WG_GENL_VERSION = "wireguard", 1
WG_CMD_GET_DEVICE, WG_CMD_SET_DEVICE = 0, 1
WGDEVICE_A_IFINDEX, WGDEVICE_A_IFNAME, WGDEVICE_A_PRIVATE_KEY, WGDEVICE_A_PUBLIC_KEY = 1, 2, 3, 4
WGDEVICE_A_FLAGS, WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FWMARK, WGDEVICE_A_PEERS = 5, 6, 7, 8
WGDEVICE_F_REPLACE_PEERS = 1
WGPEER_A_PUBLIC_KEY, WGPEER_A_FLAGS, WGPEER_A_ENDPOINT = 1, 3, 4
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, WGPEER_A_LAST_HANDSHAKE_TIME = 5, 6
WGPEER_A_RX_BYTES, WGPEER_A_TX_BYTES, WGPEER_A_ALLOWEDIPS = 7, 8, 9
WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS = 1, 2
WGALLOWEDIP_A_FAMILY, WGALLOWEDIP_A_IPADDR, WGALLOWEDIP_A_CIDR_MASK = 1, 2, 3

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 16, 32, 33, 34
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 18, 1
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
FR_ACT_TO_TBL, FIB_RULE_INVERT = 1, 0x2

_RULE = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, res1, res2, action, flags
_U16, _U32, _U64 = struct.Struct("=H"), struct.Struct("=I"), struct.Struct("=Q")
_TIMESPEC = struct.Struct("=qq")
_SOCKADDR_IN = struct.Struct("!HH4s8x")  # family (host order, fixed below), port, address
_SOCKADDR_IN6 = struct.Struct("!HHI16sI")


@dataclass(frozen=True)
class Peer:
    """A peer as written (``endpoint`` "ip:port" or None, ``allowed_ips`` canonical CIDRs) and read
    back (plus the handshake time, Unix seconds, 0 = never, and the byte counters)."""

    public_key: bytes
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] = ()
    keepalive: int = 0
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class Device:
    ifindex: int
    name: str
    public_key: bytes | None
    private_key_set: bool
    listen_port: int
    fwmark: int
    peers: tuple[Peer, ...]


def create_link(name: str) -> None:
    """``ip link add NAME type wireguard`` (down), in the calling thread's namespace. Asking for the
    kind loads the module when it can be loaded; EOPNOTSUPP means the kernel has none."""
    with Socket(NETLINK_ROUTE, timeout=10.0) as sock:
        body = (ifinfo() + attr(IFLA_IFNAME, name.encode() + b"\0")
                + attr(IFLA_LINKINFO | NLA_F_NESTED, attr(IFLA_INFO_KIND, b"wireguard")))
        sock.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"creating the WireGuard device {name}")


class WireGuard:
    """The ``wireguard`` generic netlink family, in the namespace of the thread that opened it."""

    def __init__(self) -> None:
        self._genl = GenericSocket(WG_GENL_NAME, WG_GENL_VERSION)

    def close(self) -> None:
        self._genl.close()

    def __enter__(self) -> WireGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def device(self, name: str) -> Device:
        """The device's keys, port, mark and peers with their handshakes and counters."""
        replies = self._genl.dump(WG_CMD_GET_DEVICE, attr(WGDEVICE_A_IFNAME, name.encode() + b"\0"),
                                  f"reading the WireGuard device {name}")
        # A device with many peers comes in several messages, each repeating the device attributes.
        first = replies[0] if replies else {}
        peers = [parse_peer(p) for reply in replies if WGDEVICE_A_PEERS in reply
                 for p in attr_list(reply[WGDEVICE_A_PEERS])]
        merged: dict[bytes, Peer] = {}
        for peer in peers:
            old = merged.get(peer.public_key)
            merged[peer.public_key] = peer if old is None else Peer(
                peer.public_key, old.endpoint or peer.endpoint, old.allowed_ips + peer.allowed_ips, old.keepalive,
                max(old.last_handshake, peer.last_handshake), max(old.rx_bytes, peer.rx_bytes),
                max(old.tx_bytes, peer.tx_bytes))
        public = first.get(WGDEVICE_A_PUBLIC_KEY)
        private = first.get(WGDEVICE_A_PRIVATE_KEY)
        return Device(
            ifindex=_U32.unpack(first[WGDEVICE_A_IFINDEX])[0] if WGDEVICE_A_IFINDEX in first else 0,
            name=name,
            public_key=public if public and any(public) else None,
            private_key_set=bool(private and any(private)),
            listen_port=_U16.unpack(first[WGDEVICE_A_LISTEN_PORT])[0] if WGDEVICE_A_LISTEN_PORT in first else 0,
            fwmark=_U32.unpack(first[WGDEVICE_A_FWMARK])[0] if WGDEVICE_A_FWMARK in first else 0,
            peers=tuple(merged.values()),
        )

    def set_device(self, name: str, *, private_key: bytes | None = None, listen_port: int | None = None,
                   fwmark: int | None = None, peers: tuple[Peer, ...] = (), remove: tuple[bytes, ...] = (),
                   replace_peers: bool = False) -> None:
        """Set what is given: keys, port, mark; ``peers`` are added or updated (their allowed IPs
        replaced), ``remove`` peers removed; ``replace_peers`` drops every peer not in ``peers``."""
        body = attr(WGDEVICE_A_IFNAME, name.encode() + b"\0")
        if private_key is not None:
            body += attr(WGDEVICE_A_PRIVATE_KEY, private_key)
        if listen_port is not None:
            body += attr(WGDEVICE_A_LISTEN_PORT, _U16.pack(listen_port))
        if fwmark is not None:
            body += attr(WGDEVICE_A_FWMARK, u32(fwmark))
        if replace_peers:
            body += attr(WGDEVICE_A_FLAGS, u32(WGDEVICE_F_REPLACE_PEERS))
        items = [peer_attrs(p) for p in peers] + [
            attr(WGPEER_A_PUBLIC_KEY, key) + attr(WGPEER_A_FLAGS, u32(WGPEER_F_REMOVE_ME)) for key in remove]
        if items:
            body += attr(WGDEVICE_A_PEERS | NLA_F_NESTED,
                         b"".join(attr(i | NLA_F_NESTED, item) for i, item in enumerate(items)))
        self._genl.request(WG_CMD_SET_DEVICE, body, f"configuring the WireGuard device {name}")


def peer_attrs(peer: Peer) -> bytes:
    body = attr(WGPEER_A_PUBLIC_KEY, peer.public_key) + attr(WGPEER_A_FLAGS, u32(WGPEER_F_REPLACE_ALLOWEDIPS))
    if peer.endpoint:
        body += attr(WGPEER_A_ENDPOINT, _sockaddr(peer.endpoint))
    body += attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, _U16.pack(peer.keepalive))
    allowed = b""
    for i, cidr in enumerate(peer.allowed_ips):
        net = ipaddress.ip_network(cidr)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        allowed += attr(i | NLA_F_NESTED, attr(WGALLOWEDIP_A_FAMILY, _U16.pack(family))
                        + attr(WGALLOWEDIP_A_IPADDR, net.network_address.packed)
                        + attr(WGALLOWEDIP_A_CIDR_MASK, bytes([net.prefixlen])))
    return body + attr(WGPEER_A_ALLOWEDIPS | NLA_F_NESTED, allowed)


def parse_peer(data: bytes) -> Peer:
    a = attrs(data)
    allowed = []
    for item in attr_list(a.get(WGPEER_A_ALLOWEDIPS, b"")):
        ia = attrs(item)
        raw = ia.get(WGALLOWEDIP_A_IPADDR, b"")
        mask = ia.get(WGALLOWEDIP_A_CIDR_MASK, b"\0")[0]
        if raw:
            allowed.append(str(ipaddress.ip_network(f"{ipaddress.ip_address(raw)}/{mask}", strict=False)))
    seconds, nanos = _TIMESPEC.unpack(a[WGPEER_A_LAST_HANDSHAKE_TIME]) if WGPEER_A_LAST_HANDSHAKE_TIME in a else (0, 0)
    return Peer(
        public_key=a.get(WGPEER_A_PUBLIC_KEY, b""),
        endpoint=_endpoint(a[WGPEER_A_ENDPOINT]) if WGPEER_A_ENDPOINT in a else None,
        allowed_ips=tuple(allowed),
        keepalive=_U16.unpack(a[WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL])[0]
        if WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL in a else 0,
        last_handshake=seconds + nanos / 1e9,
        rx_bytes=_U64.unpack(a[WGPEER_A_RX_BYTES])[0] if WGPEER_A_RX_BYTES in a else 0,
        tx_bytes=_U64.unpack(a[WGPEER_A_TX_BYTES])[0] if WGPEER_A_TX_BYTES in a else 0,
    )


def _sockaddr(endpoint: str) -> bytes:
    host, _, port = endpoint.rpartition(":")
    ip = ipaddress.ip_address(host.strip("[]"))
    if ip.version == 4:
        raw = bytearray(_SOCKADDR_IN.pack(0, int(port), ip.packed))
        raw[0:2] = _U16.pack(socket.AF_INET)  # sa_family is host order; the rest network order
        return bytes(raw)
    raw = bytearray(_SOCKADDR_IN6.pack(0, int(port), 0, ip.packed, 0))
    raw[0:2] = _U16.pack(socket.AF_INET6)
    return bytes(raw)


def _endpoint(raw: bytes) -> str | None:
    (family,) = _U16.unpack_from(raw)
    if family == socket.AF_INET:
        _, port, packed = _SOCKADDR_IN.unpack_from(raw)
        return f"{ipaddress.IPv4Address(packed)}:{port}"
    if family == socket.AF_INET6:
        _, port, _, packed6, _ = _SOCKADDR_IN6.unpack_from(raw)
        return f"[{ipaddress.IPv6Address(packed6)}]:{port}"
    return None


# -- the firewall-mark rule ------------------------------------------------------------------------

@dataclass(frozen=True)
class MarkRule:
    """``[not] fwmark mark/mask lookup table`` at ``priority`` (IPv4 or IPv6 by ``family``)."""

    priority: int
    table: int
    mark: int
    mask: int
    invert: bool
    family: int = socket.AF_INET


def _rule_body(rule: MarkRule) -> bytes:
    return (_RULE.pack(rule.family, 0, 0, 0, rule.table if rule.table < 256 else 0, 0, 0, FR_ACT_TO_TBL,
                       FIB_RULE_INVERT if rule.invert else 0)
            + attr(FRA_PRIORITY, u32(rule.priority)) + attr(FRA_TABLE, u32(rule.table))
            + attr(FRA_FWMARK, u32(rule.mark)) + attr(FRA_FWMASK, u32(rule.mask)))


class MarkRules:
    """Firewall-mark rules, over an rtnetlink socket of the calling thread's namespace."""

    def __init__(self) -> None:
        self._sock = Socket(NETLINK_ROUTE, timeout=10.0)

    def close(self) -> None:
        self._sock.close()

    def list(self, family: int = socket.AF_INET) -> list[MarkRule]:
        """The rules of ``family`` that match a firewall mark and look a table up."""
        found = []
        for payload in self._sock.dump(RTM_GETRULE, _RULE.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), "listing rules"):
            fam, _, _, _, table, _, _, action, flags = _RULE.unpack_from(payload)
            a = attrs(payload, _RULE.size)
            if FRA_FWMARK not in a or action != FR_ACT_TO_TBL:
                continue
            if FRA_TABLE in a:
                (table,) = _U32.unpack(a[FRA_TABLE])
            found.append(MarkRule(
                priority=_U32.unpack(a[FRA_PRIORITY])[0] if FRA_PRIORITY in a else 0, table=table,
                mark=_U32.unpack(a[FRA_FWMARK])[0],
                mask=_U32.unpack(a[FRA_FWMASK])[0] if FRA_FWMASK in a else 0xFFFFFFFF,
                invert=bool(flags & FIB_RULE_INVERT), family=fam))
        return found

    def add(self, rule: MarkRule) -> None:
        try:
            self._sock.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, _rule_body(rule), f"adding the rule {rule}")
        except KernelError as e:
            if e.code != errno.EEXIST:
                raise

    def delete(self, rule: MarkRule) -> None:
        try:
            self._sock.request(RTM_DELRULE, 0, _rule_body(rule), f"deleting the rule {rule}")
        except KernelError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise

