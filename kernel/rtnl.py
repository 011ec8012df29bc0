"""rtnetlink: links, addresses, routes, neighbour entries and rules (the common set).

Owns the rtnetlink messages: one parser per object (a link, an address, a route, a neighbour, a
rule), one builder per request, and the requests the CNI wiring makes (``RTNL``). Reads return
plain values; writes do exactly what they are told and report a refusal as ``KernelError`` naming
the request. Must not know any Tortie concept (pools, endpoints, Tortie's route protocols: callers
say which protocol they write and read). Standard library only and cheap to import: the in-process
CNI path loads it on every call, so what only long-lived drivers use (bulk route writes, VXLAN and
IPIP devices, FDB entries, the underlay's lookups, the subscription to link notifications) lives in
``kernel.rtnl_bulk``, on top of these parsers. A link notification is read by ``link_event`` here,
for the subscription and for ``kernel.unlisting`` (DEL's wait) alike. pyroute2 is not used: it
costs ~330 ms to import and parsed a link in ~1.5 ms.

Over 450 lines because each of the five objects has its parser and its requests here, on purpose
in one module: the in-process CNI path pays for every module it loads (~0.1 ms each), and these are
the ones the wiring needs together.

An ``RTNL`` works in the network namespace its socket was opened in: ``RTNL()`` in the calling
thread's (``BulkRTNL.open(path)`` opens one inside another namespace). Not thread-safe: one per thread.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import re
import socket
import struct

from kernel.netlink import (
    NLA_F_NESTED,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    KernelError,
    Socket,
    attr,
    attrs,
    u32,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, Self

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 18, 28
IFLA_NUM_TX_QUEUES, IFLA_NUM_RX_QUEUES = 31, 32
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFLA_VXLAN_ID, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT, IFLA_VXLAN_LOCAL6 = 1, 4, 7, 15, 17
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
FRA_SRC, FRA_PRIORITY, FRA_TABLE = 2, 6, 15
FR_ACT_TO_TBL = 1
RTNH_F_ONLINK = 0x4
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST, RTN_LOCAL, RTN_BLACKHOLE, RTN_THROW = 1, 2, 6, 9
RTPROT_KERNEL, RTPROT_BOOT = 2, 3  # connected subnets; what `ip route add` gives a route
DEFAULT_METRIC = {4: 0, 6: 1024}  # what the kernel gives a route added without one
IPIP_FALLBACK_DEVICE = "tunl0"  # the device the ipip module creates in every namespace
LOOPBACK_INDEX = 1  # the kernel gives every namespace's lo index 1

_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, index, state, flags, type
_RULE = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, res1, res2, action, flags
_U32 = struct.Struct("=I")
_SCOPES = {"universe": RT_SCOPE_UNIVERSE, "link": RT_SCOPE_LINK}
_TYPES = {"unicast": RTN_UNICAST, "blackhole": RTN_BLACKHOLE, "throw": RTN_THROW}
_COMMANDS = {  # action -> (verb in messages, message type, flags)
    "add": ("add", RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL),
    "replace": ("replace", RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE),
    "delete": ("del", RTM_DELROUTE, 0),
}
_NO_LINK = _IFINFO.pack(0, 0, 0, 0, 0)
AF_UNSPEC, AF_BRIDGE = 0, 7


RTM_F_FIB_MATCH = 0x2000  # rtm_flags: answer with the matching FIB entry, not the resolved route


class _Value:
    """Equality, hash, repr and ``replace`` from ``__slots__``: what a frozen dataclass gives, without
    the ~0.5 ms per class a dataclass costs at import (the in-process CNI path pays every import).
    The values are not to be changed after they are made (they are hashed)."""

    __slots__: tuple[str, ...] = ()

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (what ``dataclasses.replace`` does for a dataclass)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return type(self)(**values)


class VXLANAttrs(_Value):
    __slots__ = ("vni", "port", "local", "learning")

    def __init__(self, vni: int, port: int, local: str | None, learning: bool) -> None:
        self.vni, self.port, self.local, self.learning = vni, port, local, learning


class Link(_Value):
    """A link as read back. ``kind``: "veth", "vxlan", "ipip", ... (None without link info, e.g.
    lo); ``up``: administratively (IFF_UP)."""

    __slots__ = ("index", "name", "kind", "mtu", "mac", "up", "vxlan")

    def __init__(self, index: int, name: str, kind: str | None, mtu: int, mac: str | None, up: bool,
                 vxlan: VXLANAttrs | None = None) -> None:
        self.index, self.name, self.kind, self.mtu, self.mac, self.up = index, name, kind, mtu, mac, up
        self.vxlan = vxlan


class LinkEvent(_Value):
    """A link notification: the link appeared or changed (``present``), or was deleted."""

    __slots__ = ("name", "index", "present")

    def __init__(self, name: str, index: int, present: bool) -> None:
        self.name, self.index, self.present = name, index, present


class Neighbour(_Value):
    __slots__ = ("ip", "mac", "permanent")

    def __init__(self, ip: str, mac: str | None, permanent: bool) -> None:
        self.ip, self.mac, self.permanent = ip, mac, permanent


class KernelRoute(_Value):
    """A route as written and read back. ``dst`` is a canonical CIDR; ``device`` a link name (None:
    let the kernel choose); ``scope`` "universe" or "link"; ``metric`` None means the family's
    default; ``ifindex``, read back: which incarnation of ``device`` holds it (written: it wins over
    ``device``); ``type`` "unicast", "blackhole" or "throw" (read back: also "local", ...)."""

    __slots__ = ("dst", "type", "gateway", "device", "onlink", "scope", "proto", "metric", "ifindex", "table")

    def __init__(self, dst: str, type: str = "unicast", gateway: str | None = None, device: str | None = None,
                 onlink: bool = False, scope: str = "universe", proto: int = RTPROT_BOOT, metric: int | None = None,
                 ifindex: int | None = None, table: int = RT_TABLE_MAIN) -> None:
        self.dst, self.type, self.gateway, self.device, self.onlink = dst, type, gateway, device, onlink
        self.scope, self.proto, self.metric, self.ifindex, self.table = scope, proto, metric, ifindex, table

    @property
    def version(self) -> int:
        return 6 if ":" in self.dst else 4


class RTNL:
    """One rtnetlink socket and the typed requests made over it."""

    def __init__(self, *, strict: bool = False, timeout: float | None = None) -> None:
        # strict: dump headers filter (table, protocol), so a route dump skips the local table's
        # routes and other protocols in the kernel: at 5,000 veths ~45,000 of ~50,000 routes.
        self._sock = Socket(NETLINK_ROUTE, strict=strict, cap_ack=strict, timeout=timeout)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RTNL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- links ---------------------------------------------------------------------------------

    def links(self) -> list[Link]:
        return [_link(payload) for payload in self._sock.dump(RTM_GETLINK, _NO_LINK, "listing links")]

    def link_indexes(self) -> dict[str, int]:
        """Every link's name → index, and nothing else: a tenth of ``links()``'s cost at 10,000
        veths (its time is parsing each link's ~50 attributes, not the kernel's dump)."""
        out: dict[str, int] = {}
        for payload in self._sock.dump(RTM_GETLINK, _NO_LINK, "listing links"):
            # the kernel puts IFLA_IFNAME first: the walk stops there
            name = attrs(payload, _IFINFO.size, until=IFLA_IFNAME).get(IFLA_IFNAME)
            if name is not None:
                out[name.rstrip(b"\0").decode()] = _IFINFO.unpack_from(payload)[2]
        return out

    def link(self, name: str) -> Link | None:
        return self._get_link(_NO_LINK + _name(name), name)

    def _get_link(self, request: bytes, key: str) -> Link | None:
        try:
            (payload,) = self._sock.get(RTM_GETLINK, request, f"looking up link {key}")
        except KernelError as e:
            if e.code == errno.ENODEV:
                return None
            raise
        return _link(payload)

    def add_veth(self, name: str, mac: str, mtu: int, peer: str, peer_netns_fd: int) -> None:
        """Create a veth pair, ``name`` here and up, ``peer`` in the namespace ``peer_netns_fd`` (down).

        Each end gets one transmit and one receive queue, what the kernel leaves a veth with anyway
        when none is asked for: it allocates one per possible CPU, then cuts the real count to one,
        and each cut waits for an expedited RCU grace period with the rtnl lock held (two per pair,
        0.5-2 ms each here; measured in a scratch namespace: a pair 2.6 ms p50, max 15 ms, against
        0.42 ms, max 0.62 ms, with the queues given). Every other rtnetlink request of the machine
        (the other pods' ADDs and DELs, the agent's routes) waits meanwhile."""
        queues = attr(IFLA_NUM_TX_QUEUES, u32(1)) + attr(IFLA_NUM_RX_QUEUES, u32(1))
        peer_msg = (_NO_LINK + _name(peer) + attr(IFLA_MTU, u32(mtu)) + attr(IFLA_NET_NS_FD, u32(peer_netns_fd))
                    + queues)
        info = attr(IFLA_INFO_KIND, b"veth") + attr(IFLA_INFO_DATA | NLA_F_NESTED, attr(VETH_INFO_PEER, peer_msg))
        self._sock.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                           ifinfo(flags=IFF_UP, change=IFF_UP) + _name(name) + attr(IFLA_ADDRESS, _mac(mac))
                           + attr(IFLA_MTU, u32(mtu)) + queues + attr(IFLA_LINKINFO | NLA_F_NESTED, info),
                           f"creating the veth pair {name}/{peer}")

    def set_link(self, index: int, *, mtu: int | None = None, mac: str | None = None, up: bool | None = None) -> None:
        body = ifinfo(index, IFF_UP if up else 0, IFF_UP if up is not None else 0)
        changes: dict[str, object] = {}
        if mtu is not None:
            body += attr(IFLA_MTU, u32(mtu))
            changes["mtu"] = mtu
        if mac is not None:
            body += attr(IFLA_ADDRESS, _mac(mac))
            changes["address"] = mac
        if up is not None:
            changes["state"] = "up" if up else "down"
        self._sock.request(RTM_NEWLINK, 0, body, f"setting {changes} on link {index}")

    def delete_link(self, link: int | str) -> bool:
        """Delete the link of that index or name; False when there was no such link."""
        body = ifinfo(link) if isinstance(link, int) else _NO_LINK + _name(link)
        try:
            self._sock.request(RTM_DELLINK, 0, body, f"deleting link {link}")
        except KernelError as e:
            if e.code == errno.ENODEV:
                return False
            raise
        return True

    # -- addresses -----------------------------------------------------------------------------

    def address_list(self, family: int = 0, index: int = 0) -> list[tuple[int, str, int, int]]:
        """(link index, address, prefix length, scope) of every address in the kernel's order; of
        ``family`` and link ``index`` only when they are not 0."""
        found = []
        for payload in self._sock.dump(RTM_GETADDR, _IFADDR.pack(family, 0, 0, 0, index), "listing addresses"):
            fam, prefixlen, _, scope, ifindex = _IFADDR.unpack_from(payload)
            if (index and ifindex != index) or (family and fam != family):
                continue  # a kernel without strict dumps sends every link's
            a = attrs(payload, _IFADDR.size)
            packed = a.get(IFA_ADDRESS) or a.get(IFA_LOCAL)
            if packed:
                found.append((ifindex, str(ipaddress.ip_address(packed)), prefixlen, scope))
        return found

    def addresses(self, index: int) -> set[str]:
        """The addresses on link ``index`` as canonical "ip/prefixlen"."""
        return {f"{ip}/{prefixlen}" for _, ip, prefixlen, _ in self.address_list(index=index)}

    def add_address(self, index: int, cidr: str) -> None:
        """Add ``cidr`` ("ip/prefixlen") to link ``index`` (IPv6 without duplicate detection); EEXIST
        is success."""
        iface = ipaddress.ip_interface(cidr)
        family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        flags = IFA_F_NODAD if iface.version == 6 else 0
        packed = iface.ip.packed
        try:
            self._sock.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
                               _IFADDR.pack(family, iface.network.prefixlen, flags, 0, index)
                               + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed),
                               f"adding {cidr} to link {index}")
        except KernelError as e:
            if e.code != errno.EEXIST:
                raise

    def delete_address(self, index: int, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        try:
            self._sock.request(RTM_DELADDR, 0, _IFADDR.pack(family, iface.network.prefixlen, 0, 0, index)
                               + attr(IFA_LOCAL, iface.ip.packed), f"deleting {cidr} from link {index}")
        except KernelError as e:
            if e.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                raise

    # -- routes --------------------------------------------------------------------------------

    def routes(self, protocol: int | None = None, indexes: Mapping[str, int] | None = None, *,
               table: int | None = RT_TABLE_MAIN, family: int | None = None) -> list[KernelRoute]:
        """The unicast and blackhole routes of ``table`` (None: every table) of both families (or
        ``family``); of ``protocol`` only when it is given. ``indexes``: the links' name → index as
        the caller just listed them, to name each route's device (saves a listing; ``{}``: no names)."""
        names = {i: n for n, i in (indexes if indexes is not None else self.link_indexes()).items()}
        out: list[KernelRoute] = []
        for fam in (socket.AF_INET, socket.AF_INET6) if family is None else (family,):
            header = _RTMSG.pack(fam, 0, 0, 0, table if table is not None and table < 256 else 0,
                                 protocol or 0, 0, 0, 0)
            for payload in self._sock.dump(RTM_GETROUTE, header, "listing routes"):
                route = _route(payload, names)
                if (route.type in _TYPES and (table is None or route.table == table)
                        and (protocol is None or route.proto == protocol)):
                    out.append(route)
        return out

    def route_to(self, address: str) -> KernelRoute:
        """The route the kernel would use for ``address`` (``ip route get``)."""
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        (payload,) = self._sock.get(RTM_GETROUTE, _RTMSG.pack(family, ip.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
                                    + attr(RTA_DST, ip.packed), f"looking up the route to {address}")
        return _route(payload, {})

    def route_at(self, address: str) -> KernelRoute:
        """The routing entry itself that the kernel would use for ``address``, with its own prefix,
        protocol and scope (``ip route get fibmatch``); the device by index only."""
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        header = _RTMSG.pack(family, ip.max_prefixlen, 0, 0, 0, 0, 0, 0, RTM_F_FIB_MATCH)
        (payload,) = self._sock.get(RTM_GETROUTE, header + attr(RTA_DST, ip.packed),
                                    f"looking up the route entry for {address}")
        return _route(payload, {})

    def add_route(self, route: KernelRoute) -> None:
        self._write("add", route)

    def replace_route(self, route: KernelRoute) -> None:
        self._write("replace", route)

    def delete_route(self, route: KernelRoute) -> None:
        """Delete ``route``; one that is gone already is success."""
        try:
            self._write("delete", route)
        except KernelError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise

    def _write(self, action: str, route: KernelRoute) -> None:
        verb, kind, flags = _COMMANDS[action]
        oif = route.ifindex
        if route.type == "unicast" and oif is None and route.device is not None:
            link = self.link(route.device)
            if link is None:
                raise KernelError(f"{verb} route {route.dst} via {route.device}", errno.ENODEV)
            oif = link.index
        self._sock.request(kind, flags, _route_body(route, oif), f"{verb} route {_describe(route)}")

    # -- FDB and neighbours --------------------------------------------------------------------

    def _neighbours(self, family: int, index: int) -> list[tuple[str, str | None, int]]:
        """(address, MAC, state) of the entries on link ``index`` (the FDB for AF_BRIDGE)."""
        # Strict dumps refuse an index in the header (it goes in an attribute): filtered here.
        found = []
        for payload in self._sock.dump(RTM_GETNEIGH, _NDMSG.pack(family, 0, 0, 0, 0), "listing neighbours"):
            _, ifindex, state, _, _ = _NDMSG.unpack_from(payload)
            if ifindex != index:
                continue
            a = attrs(payload, _NDMSG.size)
            if NDA_DST in a:
                lladdr = a.get(NDA_LLADDR)
                found.append((str(ipaddress.ip_address(a[NDA_DST])), _mac_text(lladdr) if lladdr else None, state))
        return found

    def neighbours(self, index: int) -> list[Neighbour]:
        return [Neighbour(ip, mac, bool(state & NUD_PERMANENT)) for ip, mac, state in self._neighbours(0, index)]

    def set_neighbour(self, index: int, ip: str, mac: str) -> None:
        """A permanent neighbour entry: ``ip`` is at ``mac`` on the link ``index``."""
        address = ipaddress.ip_address(ip)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        self._sock.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE,
                           _NDMSG.pack(family, index, NUD_PERMANENT, 0, 0) + attr(NDA_DST, address.packed)
                           + attr(NDA_LLADDR, _mac(mac)), f"setting the neighbour {ip} lladdr {mac}")

    # -- policy routing rules ------------------------------------------------------------------

    def add_rule(self, src: str, src_len: int, table: int, priority: int) -> None:
        """``from src/src_len lookup table``, at ``priority``."""
        self._sock.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, _rule_body(src, src_len, table, priority),
                           f"adding the rule from {src}/{src_len} lookup {table}")

    def rules(self, family: int) -> list[tuple[str, int, int, int]]:
        """(source, source prefix length, table, priority) of the rules of ``family`` that match a source."""
        found = []
        for payload in self._sock.dump(RTM_GETRULE, _RULE.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), "listing rules"):
            _, _, src_len, _, table, _, _, _, _ = _RULE.unpack_from(payload)
            a = attrs(payload, _RULE.size)
            if FRA_TABLE in a:
                (table,) = _U32.unpack(a[FRA_TABLE])
            if FRA_SRC in a:
                (priority,) = _U32.unpack(a[FRA_PRIORITY]) if FRA_PRIORITY in a else (0,)
                found.append((str(ipaddress.ip_address(a[FRA_SRC])), src_len, table, priority))
        return found

    def delete_rule(self, src: str, src_len: int, table: int, priority: int) -> None:
        self._sock.request(RTM_DELRULE, 0, _rule_body(src, src_len, table, priority),
                           f"deleting the rule from {src}/{src_len} lookup {table}")


def write_each(driver: Any, ops: Sequence[tuple[str, KernelRoute]]) -> list[KernelError | None]:
    """``ops`` (``("add" | "replace" | "delete", route)``) one request at a time through the
    driver's ``add_route``, ``replace_route`` and ``delete_route``, with the outcomes
    ``RTNL.write_routes`` reports: None, or the KernelError the write raised (for drivers without
    bulk writes, e.g. a test's fake kernel)."""
    out: list[KernelError | None] = []
    for action, route in ops:
        try:
            {"add": driver.add_route, "replace": driver.replace_route, "delete": driver.delete_route}[action](route)
            out.append(None)
        except KernelError as e:
            out.append(e)
    return out


# -- messages ------------------------------------------------------------------------------------


def ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    """The ifinfomsg a link request starts with (family AF_UNSPEC, any device type)."""
    return _IFINFO.pack(0, 0, index, flags, change)


def _name(name: str) -> bytes:
    return attr(IFLA_IFNAME, name.encode() + b"\0")


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _link(payload: bytes) -> Link:
    """One RTM_NEWLINK message."""
    _, _, index, flags, _ = _IFINFO.unpack_from(payload)
    a = attrs(payload, _IFINFO.size)
    info = attrs(a.get(IFLA_LINKINFO, b""))
    kind = info[IFLA_INFO_KIND].rstrip(b"\0").decode() if IFLA_INFO_KIND in info else None
    vxlan = None
    if kind == "vxlan":
        data = attrs(info.get(IFLA_INFO_DATA, b""))
        local = data.get(IFLA_VXLAN_LOCAL) or data.get(IFLA_VXLAN_LOCAL6)
        vxlan = VXLANAttrs(
            vni=_U32.unpack(data[IFLA_VXLAN_ID])[0] if IFLA_VXLAN_ID in data else 0,
            port=struct.unpack(">H", data[IFLA_VXLAN_PORT])[0] if IFLA_VXLAN_PORT in data else 0,
            local=str(ipaddress.ip_address(local)) if local else None,
            learning=bool(data.get(IFLA_VXLAN_LEARNING, b"\0")[0]),
        )
    address = a.get(IFLA_ADDRESS)
    return Link(
        index=index,
        name=a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
        kind=kind,
        mtu=_U32.unpack(a[IFLA_MTU])[0] if IFLA_MTU in a else 0,
        mac=_mac_text(address) if address else None,
        up=bool(flags & IFF_UP),
        vxlan=vxlan,
    )


def link_event(kind: int, payload: bytes) -> LinkEvent | None:
    """What one message of the link notifications (``RTMGRP_LINK``) says of a link's existence;
    None for any other message. Only family AF_UNSPEC speaks of the link itself, and the kernel
    sends one whenever a link appears, changes or goes: an AF_BRIDGE RTM_DELLINK is a bridge port
    leaving its bridge (``ip link set X nomaster``: the link stays), and the other families'
    RTM_NEWLINKs (AF_BRIDGE, AF_INET6) speak of its bridge port or its IPv6 settings."""
    if (kind != RTM_NEWLINK and kind != RTM_DELLINK) or len(payload) < _IFINFO.size:
        return None
    family, _, index, _, _ = _IFINFO.unpack_from(payload)
    if family != AF_UNSPEC:
        return None
    name = attrs(payload, _IFINFO.size, until=IFLA_IFNAME).get(IFLA_IFNAME)
    if name is None:
        return None
    return LinkEvent(name.rstrip(b"\0").decode(), index, kind == RTM_NEWLINK)


_TYPE_NAMES = {RTN_UNICAST: "unicast", RTN_LOCAL: "local", RTN_BLACKHOLE: "blackhole", RTN_THROW: "throw"}


def _route(payload: bytes, names: Mapping[int, str]) -> KernelRoute:
    """One RTM_NEWROUTE message."""
    family, dst_len, _, _, table, proto, scope, kind, flags = _RTMSG.unpack_from(payload)
    a = attrs(payload, _RTMSG.size)
    if RTA_TABLE in a:
        (table,) = _U32.unpack(a[RTA_TABLE])
    version = 4 if family == socket.AF_INET else 6
    blackhole = kind in (RTN_BLACKHOLE, RTN_THROW)  # neither has a device
    if RTA_DST in a:
        dst = f"{ipaddress.ip_address(a[RTA_DST])}/{dst_len}"
        if dst_len != (32 if version == 4 else 128):  # a network: canonical (host bits cleared)
            dst = str(ipaddress.ip_network(dst, strict=False))
    else:
        dst = "0.0.0.0/0" if version == 4 else "::/0"
    oif = _U32.unpack(a[RTA_OIF])[0] if RTA_OIF in a else None
    metric = _U32.unpack(a[RTA_PRIORITY])[0] if RTA_PRIORITY in a else 0
    gateway = a.get(RTA_GATEWAY)
    return KernelRoute(
        dst=dst,
        type=_TYPE_NAMES.get(kind, str(kind)),
        gateway=str(ipaddress.ip_address(gateway)) if gateway else None,
        device=None if blackhole or oif is None else names.get(oif),  # v6 blackholes hang on lo
        onlink=bool(flags & RTNH_F_ONLINK),
        scope="link" if scope == RT_SCOPE_LINK else "universe",
        proto=proto,
        metric=None if metric == DEFAULT_METRIC[version] else metric,
        ifindex=None if blackhole or oif is None else oif,
        table=table,
    )


def _route_body(route: KernelRoute, oif: int | None) -> bytes:
    """The body of one RTM_NEWROUTE/RTM_DELROUTE for ``route`` through link ``oif``."""
    version, prefixlen, packed = _destination(route.dst)
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    table = route.table
    body = _RTMSG.pack(family, prefixlen, 0, 0, table if table < 256 else 0, route.proto, _SCOPES[route.scope],
                       _TYPES[route.type], RTNH_F_ONLINK if route.onlink else 0)
    body += attr(RTA_TABLE, u32(table))
    if prefixlen:
        body += attr(RTA_DST, packed)
    metric = route.metric if route.metric is not None else DEFAULT_METRIC[version]
    body += attr(RTA_PRIORITY, u32(metric))
    if route.gateway:
        body += attr(RTA_GATEWAY, _packed_address(route.gateway))
    if route.type == "unicast" and oif is not None:
        body += attr(RTA_OIF, u32(oif))
    return body


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_PREFIX = re.compile(rf"((?:{_OCTET}\.){{3}}{_OCTET})/(3[0-2]|[12]?[0-9])", re.ASCII)


def _destination(dst: str) -> tuple[int, int, bytes]:
    """(IP version, prefix length, packed network address) of ``dst``, which ``ipaddress``
    would accept as a network (ValueError otherwise). A plain IPv4 prefix is taken apart
    without it: BGP writes 10,000 routes at a time, and ``ipaddress`` parses at ~20 us each."""
    match = _IPV4_PREFIX.fullmatch(dst)
    if match is not None:
        packed, prefixlen = socket.inet_aton(match[1]), int(match[2])
        if int.from_bytes(packed) & (0xFFFFFFFF >> prefixlen) == 0:  # no host bits: a network
            return 4, prefixlen, packed
    net = ipaddress.ip_network(dst)
    return net.version, net.prefixlen, net.network_address.packed


@functools.lru_cache(maxsize=1024)
def _packed_address(text: str) -> bytes:
    """A gateway's address, packed (a few gateways, named by many routes)."""
    return ipaddress.ip_address(text).packed


def _rule_body(src: str, src_len: int, table: int, priority: int) -> bytes:
    ip = ipaddress.ip_address(src)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return (_RULE.pack(family, 0, src_len, 0, table if table < 256 else 0, 0, 0, FR_ACT_TO_TBL, 0)
            + attr(FRA_SRC, ip.packed) + attr(FRA_PRIORITY, u32(priority)) + attr(FRA_TABLE, u32(table)))


def _describe(r: KernelRoute) -> str:
    parts = [r.type if r.type != "unicast" else "", r.dst]
    parts += [f"via {r.gateway}"] if r.gateway else []
    parts += [f"dev {r.device}"] if r.device else []
    parts += ["onlink"] if r.onlink else []
    return " ".join(p for p in parts if p)
