"""A minimal rtnetlink client on the standard library: the dozen requests the CNI wiring makes.

pyroute2 costs ~80 ms to import and ~1–2 ms of Python per request (an asyncio loop per call);
the plugin makes about twelve requests per ADD, in the agent and in-process alike. This module
packs and parses only the messages the wiring needs (links, addresses, routes), one request at a
time, and reports the kernel's refusals as :class:`NetlinkError` with the errno.

A socket works in the network namespace it was opened in: open it while the calling thread is in
the namespace you mean (``wiring.netns``). Not thread-safe; open one per thread and per call.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

# typing costs milliseconds at import and is only needed by the type checker (mypy reads this idiom).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x200, 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
NLM_F_REPLACE = 0x100
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
FRA_SRC, FRA_PRIORITY, FRA_TABLE = 2, 6, 15
FR_ACT_TO_TBL = 1
RTNH_F_ONLINK = 0x4
IFF_UP = 0x1
RTN_UNICAST = 1
RT_TABLE_MAIN = 254
NLA_F_NESTED = 0x8000

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, index, state, flags, type
_RULE = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, res1, res2, action, flags
_ATTR = struct.Struct("=HH")


class NetlinkError(Exception):
    """The kernel refused a request; ``code`` is the errno."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))
        self.code = code


def attr(kind: int, data: bytes) -> bytes:
    length = _ATTR.size + len(data)
    return _ATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def attrs(data: bytes, offset: int = 0, until: int | None = None) -> dict[int, bytes]:
    """The attributes in ``data`` from ``offset``, by type (the nested flag masked off); with
    ``until``, the walk ends at the first attribute of that type (what a caller looks for first)."""
    found: dict[int, bytes] = {}
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            break
        found[kind & 0x3FFF] = data[offset + _ATTR.size:offset + length]
        if kind & 0x3FFF == until:
            break
        offset += (length + 3) & ~3
    return found


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _ip(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address)
    return (socket.AF_INET if ip.version == 4 else socket.AF_INET6), ip.packed


class Link:
    __slots__ = ("index", "name", "mac", "kind", "flags")

    def __init__(self, index: int, name: str, mac: str, kind: str, flags: int) -> None:
        self.index, self.name, self.mac, self.kind, self.flags = index, name, mac, kind, flags


class Route:
    __slots__ = ("family", "dst", "dst_len", "oif", "gateway", "table", "protocol")

    def __init__(self, family: int, dst: str, dst_len: int, oif: int, gateway: str, table: int,
                 protocol: int) -> None:
        self.family, self.dst, self.dst_len, self.oif = family, dst, dst_len, oif
        self.gateway, self.table, self.protocol = gateway, table, protocol


class RTNL:
    """One rtnetlink socket in the namespace of the thread that opened it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RTNL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ----
    def _send(self, kind: int, flags: int, payload: bytes) -> int:
        self._seq += 1
        self._sock.send(_HDR.pack(_HDR.size + len(payload), kind, flags | NLM_F_REQUEST, self._seq, 0) + payload)
        return self._seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, body) of each reply to ``seq`` until the ack or the end of the dump."""
        while True:
            data = self._sock.recv(1 << 20)
            offset = 0
            while offset + _HDR.size <= len(data):
                length, kind, flags, msg_seq, _ = _HDR.unpack_from(data, offset)
                body = data[offset + _HDR.size:offset + length]
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue  # a late answer to an earlier request
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body)
                    if code:
                        raise NetlinkError(-code)
                    return
                if kind == NLMSG_DONE:
                    return
                yield kind, body
                if not flags & NLM_F_MULTI:
                    return

    def do(self, kind: int, flags: int, payload: bytes) -> None:
        """A request that changes something: waits for its ack."""
        for _ in self._replies(self._send(kind, flags | NLM_F_ACK, payload)):
            pass

    def get(self, kind: int, payload: bytes) -> list[bytes]:
        return [body for _, body in self._replies(self._send(kind, 0, payload))]

    def dump(self, kind: int, payload: bytes) -> list[bytes]:
        return [body for _, body in self._replies(self._send(kind, NLM_F_DUMP, payload))]

    # ---- links ----
    @staticmethod
    def _link(body: bytes) -> Link:
        _, _, index, flags, _ = _IFINFO.unpack_from(body)
        a = attrs(body, _IFINFO.size)
        info = attrs(a.get(IFLA_LINKINFO, b""))
        return Link(index, a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
                    ":".join(f"{b:02x}" for b in a.get(IFLA_ADDRESS, b"")),
                    info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode(), flags)

    def link(self, name: str) -> Link | None:
        try:
            (body,) = self.get(RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, name.encode() + b"\0"))
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise
        return self._link(body)

    def links(self) -> list[Link]:
        return [self._link(body) for body in self.dump(RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0))]

    def add_veth(self, name: str, mac: str, mtu: int, peer: str, peer_netns_fd: int) -> None:
        """Create a veth pair, ``name`` here and up, ``peer`` in the namespace ``peer_netns_fd`` (down)."""
        peer_msg = (_IFINFO.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, peer.encode() + b"\0")
                    + attr(IFLA_MTU, _u32(mtu)) + attr(IFLA_NET_NS_FD, _u32(peer_netns_fd)))
        info = attr(IFLA_INFO_KIND, b"veth") + attr(IFLA_INFO_DATA | NLA_F_NESTED, attr(VETH_INFO_PEER, peer_msg))
        self.do(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                _IFINFO.pack(0, 0, 0, IFF_UP, IFF_UP) + attr(IFLA_IFNAME, name.encode() + b"\0")
                + attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", ""))) + attr(IFLA_MTU, _u32(mtu))
                + attr(IFLA_LINKINFO | NLA_F_NESTED, info))

    def set_up(self, index: int) -> None:
        self.do(RTM_NEWLINK, 0, _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP))

    def delete_link(self, name: str) -> bool:
        """False when there was no such link."""
        try:
            self.do(RTM_DELLINK, 0, _IFINFO.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, name.encode() + b"\0"))
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise
        return True

    # ---- addresses ----
    def add_address(self, index: int, address: str, prefixlen: int, flags: int = 0) -> None:
        family, packed = _ip(address)
        self.do(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, _IFADDR.pack(family, prefixlen, flags, 0, index)
                + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed))

    def addresses(self, index: int) -> list[tuple[str, int]]:
        found = []
        for body in self.dump(RTM_GETADDR, _IFADDR.pack(0, 0, 0, 0, 0)):
            family, prefixlen, _, _, ifindex = _IFADDR.unpack_from(body)
            a = attrs(body, _IFADDR.size)
            packed = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if ifindex == index and packed:
                found.append((str(ipaddress.ip_address(packed)), prefixlen))
        return found

    # ---- routes ----
    def add_route(self, dst: str, dst_len: int, *, oif: int, gateway: str = "", scope: int = 0,
                  protocol: int = 3, table: int = RT_TABLE_MAIN, onlink: bool = False) -> None:
        family, packed = _ip(dst)
        body = _RTMSG.pack(family, dst_len, 0, 0, table if table < 256 else 0, protocol, scope, RTN_UNICAST,
                           RTNH_F_ONLINK if onlink else 0)
        if dst_len:
            body += attr(RTA_DST, packed)
        if gateway:
            body += attr(RTA_GATEWAY, _ip(gateway)[1])
        body += attr(RTA_OIF, _u32(oif))
        if table >= 256:
            body += attr(RTA_TABLE, _u32(table))
        self.do(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)

    @staticmethod
    def _route(body: bytes) -> Route:
        family, dst_len, _, _, table, protocol, _, _, _ = _RTMSG.unpack_from(body)
        a = attrs(body, _RTMSG.size)
        if RTA_TABLE in a:
            (table,) = struct.unpack("=I", a[RTA_TABLE])
        default = "0.0.0.0" if family == socket.AF_INET else "::"
        dst = str(ipaddress.ip_address(a[RTA_DST])) if RTA_DST in a else default
        gateway = str(ipaddress.ip_address(a[RTA_GATEWAY])) if RTA_GATEWAY in a else ""
        oif = struct.unpack("=I", a[RTA_OIF])[0] if RTA_OIF in a else 0
        return Route(family, dst, dst_len, oif, gateway, table, protocol)

    def routes(self, family: int) -> list[Route]:
        return [self._route(b) for b in self.dump(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))]

    def route_to(self, address: str) -> Route:
        """The route the kernel would use for ``address`` (``ip route get``)."""
        family, packed = _ip(address)
        (body,) = self.get(RTM_GETROUTE, _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0)
                           + attr(RTA_DST, packed))
        return self._route(body)

    # ---- neighbours ----
    def set_neighbour(self, index: int, address: str, mac: str) -> None:
        """A permanent neighbour entry: ``address`` is at ``mac`` on the link ``index``."""
        family, packed = _ip(address)
        self.do(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, _NDMSG.pack(family, 0, 0, index, NUD_PERMANENT, 0, 0)
                + attr(NDA_DST, packed) + attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", ""))))

    def neighbours(self, index: int) -> list[tuple[str, str, int]]:
        """(address, MAC, state) of the neighbour entries on the link ``index``."""
        found = []
        for body in self.dump(RTM_GETNEIGH, _NDMSG.pack(0, 0, 0, 0, 0, 0, 0)):
            _, _, _, ifindex, state, _, _ = _NDMSG.unpack_from(body)
            a = attrs(body, _NDMSG.size)
            if ifindex == index and NDA_DST in a:
                found.append((str(ipaddress.ip_address(a[NDA_DST])),
                              ":".join(f"{b:02x}" for b in a.get(NDA_LLADDR, b"")), state))
        return found

    # ---- policy routing rules ----
    def add_rule(self, src: str, src_len: int, table: int, priority: int) -> None:
        """``from src/src_len lookup table``, at ``priority``."""
        family, packed = _ip(src)
        self.do(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL,
                _RULE.pack(family, 0, src_len, 0, table if table < 256 else 0, 0, 0, FR_ACT_TO_TBL, 0)
                + attr(FRA_SRC, packed) + attr(FRA_PRIORITY, _u32(priority)) + attr(FRA_TABLE, _u32(table)))

    def rules(self, family: int) -> list[tuple[str, int, int, int]]:
        """(source, source prefix length, table, priority) of the rules of ``family`` that match a source."""
        found = []
        for body in self.dump(RTM_GETRULE, _RULE.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            fam, _, src_len, _, table, _, _, _, _ = _RULE.unpack_from(body)
            a = attrs(body, _RULE.size)
            if FRA_TABLE in a:
                (table,) = struct.unpack("=I", a[FRA_TABLE])
            if FRA_SRC in a:
                (priority,) = struct.unpack("=I", a[FRA_PRIORITY]) if FRA_PRIORITY in a else (0,)
                found.append((str(ipaddress.ip_address(a[FRA_SRC])), src_len, table, priority))
        return found

    def delete_rule(self, src: str, src_len: int, table: int, priority: int) -> None:
        family, packed = _ip(src)
        self.do(RTM_DELRULE, 0, _RULE.pack(family, 0, src_len, 0, table if table < 256 else 0, 0, 0, FR_ACT_TO_TBL, 0)
                + attr(FRA_SRC, packed) + attr(FRA_PRIORITY, _u32(priority)) + attr(FRA_TABLE, _u32(table)))
