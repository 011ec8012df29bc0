"""The netlink driver of the dataplane managers: links, addresses, routes, FDB and neighbour entries,
and the link notifications the orphan sweep listens to.

Knows nothing of pools, nodes or policy: it reads what the kernel holds as plain values and
writes exactly what it is told, turning pyroute2's errors into ``KernelError``. It works in the
network namespace its socket was opened in, so a lab opens it inside ``wiring.netns(path)``
(``Netlink.open(path)``) and the root namespace is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_plugins.rtnl import attr as _attr  # packing and walking rtattrs: shared with the CNI wiring
from cni_plugins.rtnl import attrs as _attrs
from cni_plugins.wiring import netns

ROUTE_PROTOCOL = 80  # Tortie's agent (CONTRACT, "Kernel objects")
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST, RTN_BLACKHOLE = 1, 6
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
IFF_UP = 0x1
IFA_F_NODAD = 0x02
DEFAULT_METRIC = {4: 0, 6: 1024}  # what the kernel gives a route added without one
_SCOPES = {"universe": RT_SCOPE_UNIVERSE, "link": RT_SCOPE_LINK}
_TYPES = {"unicast": RTN_UNICAST, "blackhole": RTN_BLACKHOLE}


class KernelError(Exception):
    """One netlink request was refused; ``code`` is the errno, the message names the request."""

    def __init__(self, doing: str, code: int) -> None:
        super().__init__(f"{doing}: {os.strerror(code)}")
        self.code = code


class ApplyError(Exception):
    """Some writes of an ``apply()`` failed (the others were made); the next apply retries them."""

    def __init__(self, manager: str, failures: list[KernelError]) -> None:
        shown = "; ".join(str(f) for f in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{manager}: {len(failures)} kernel writes failed: {shown}{more}")
        self.failures = failures


@dataclass(frozen=True)
class VXLANAttrs:
    vni: int
    port: int
    local: str | None
    learning: bool


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None  # "veth", "vxlan", "ipip", ... (None for devices without link info, e.g. lo)
    mtu: int
    mac: str | None
    up: bool  # administratively (IFF_UP)
    vxlan: VXLANAttrs | None = None


@dataclass(frozen=True)
class KernelRoute:
    """A main-table route as the managers compare them. ``dst`` is a canonical CIDR; ``device`` a
    link name (None: let the kernel choose); ``metric`` None means the family's default."""

    dst: str
    type: str = "unicast"  # "unicast" | "blackhole"
    gateway: str | None = None
    device: str | None = None
    onlink: bool = False
    scope: str = "universe"  # "universe" | "link"
    proto: int = ROUTE_PROTOCOL
    metric: int | None = None
    ifindex: int | None = None  # read back only: which incarnation of ``device`` holds it

    @property
    def version(self) -> int:
        return ipaddress.ip_network(self.dst).version


@dataclass(frozen=True)
class Neighbour:
    ip: str
    mac: str | None
    permanent: bool


class Netlink:
    """One rtnetlink socket and the few typed requests the managers need."""

    def __init__(self, ipr: Any, batch: _RouteBatch | None = None) -> None:
        self._ipr = ipr
        self._batch = batch

    @classmethod
    def open(cls, netns_path: str | None = None) -> Netlink:
        """A driver for ``netns_path`` (a /run/netns path), or for the calling thread's namespace."""
        if netns_path is None:
            return cls(IPRoute(), _RouteBatch())
        with netns(netns_path):
            return cls(IPRoute(), _RouteBatch())  # the sockets stay in the namespace they were opened in

    def close(self) -> None:
        self._ipr.close()
        if self._batch is not None:
            self._batch.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- links ---------------------------------------------------------------------------------

    def links(self) -> list[Link]:
        if self._batch is not None:  # pyroute2 parses ~1.5 ms per link: 15 s at 10,000 veths
            return [_raw_link(payload) for payload in self._batch.dump(RTM_GETLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0))]
        with _kernel("listing links"):
            return [_link(msg) for msg in self._ipr.link("dump")]

    def link_indexes(self) -> dict[str, int]:
        """Every link's name → index, and nothing else: a tenth of ``links()``'s cost at 10,000
        veths (its time is parsing each link's ~50 attributes, not the kernel's dump)."""
        if self._batch is None:
            return {link.name: link.index for link in self.links()}
        out: dict[str, int] = {}
        for payload in self._batch.dump(RTM_GETLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0)):
            # the kernel puts IFLA_IFNAME first: the walk stops there
            name = _attrs(payload, _IFINFOMSG.size, until=IFLA_IFNAME).get(IFLA_IFNAME)
            if name is not None:
                out[name.rstrip(b"\0").decode()] = _IFINFOMSG.unpack_from(payload)[2]
        return out

    def link(self, name: str) -> Link | None:
        return self._get_link(ifname=name)

    def address_link(self, address: str) -> Link | None:
        """The link that holds ``address`` (the node's underlay interface), if any."""
        wanted = ipaddress.ip_address(address)
        with _kernel(f"looking for the link with {address}"):
            found = [m["index"] for m in self._ipr.addr("dump") if _ip(m.get("address")) == wanted]
        return self._get_link(index=found[0]) if found else None

    def default_route_link(self) -> Link | None:
        """The link of the IPv4 default route, if there is one."""
        with _kernel("reading the default route"):
            routes = self._ipr.route("dump", family=socket.AF_INET, table=RT_TABLE_MAIN)
        for r in routes:
            if r["dst_len"] == 0 and r.get("oif"):
                return self._get_link(index=int(r.get("oif")))
        return None

    def add_vxlan(self, name: str, *, vni: int, port: int, local: str, mac: str, mtu: int) -> None:
        with _kernel(f"creating {name}"):
            self._ipr.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=vni,
                vxlan_port=port,
                vxlan_local=local,
                vxlan_learning=0,
                address=mac,
                mtu=mtu,
            )

    def add_ipip(self, name: str) -> None:
        """Create ``name`` as an IPIP device; asking for it loads the module, which makes the fallback
        ``tunl0`` in every namespace, so EEXIST for ``tunl0`` means success. EOPNOTSUPP: no module."""
        try:
            self._ipr.link("add", ifname=name, kind="ipip")
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(f"creating {name}", e.code) from e

    def set_link(self, index: int, *, mtu: int | None = None, mac: str | None = None, up: bool | None = None) -> None:
        changes: dict[str, Any] = {}
        if mtu is not None:
            changes["mtu"] = mtu
        if mac is not None:
            changes["address"] = mac
        if up is not None:
            changes["state"] = "up" if up else "down"
        with _kernel(f"setting {changes} on link {index}"):
            self._ipr.link("set", index=index, **changes)

    def delete_link(self, index: int) -> None:
        try:
            self._ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise KernelError(f"deleting link {index}", e.code) from e

    # -- addresses -----------------------------------------------------------------------------

    def addresses(self, index: int) -> set[str]:
        """The addresses on link ``index`` as canonical "ip/prefixlen"."""
        with _kernel(f"listing the addresses of link {index}"):
            return {
                str(ipaddress.ip_interface(f"{m.get('address')}/{m['prefixlen']}"))
                for m in self._ipr.addr("dump", index=index)
            }

    def add_address(self, index: int, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        flags = IFA_F_NODAD if iface.version == 6 else 0
        try:
            self._ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen, flags=flags)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(f"adding {cidr} to link {index}", e.code) from e

    def delete_address(self, index: int, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        try:
            self._ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as e:
            if e.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                raise KernelError(f"deleting {cidr} from link {index}", e.code) from e

    # -- routes --------------------------------------------------------------------------------

    def routes(self, protocol: int | None = None, indexes: Mapping[str, int] | None = None) -> list[KernelRoute]:
        """Every main-table route of both families; of ``protocol`` only when it is given.
        ``indexes``: the links' name → index as the caller just listed them (saves a listing)."""
        names = ({i: n for n, i in indexes.items()} if indexes is not None
                 else {link.index: link.name for link in self.links()})
        out: list[KernelRoute] = []
        if self._batch is not None:  # as for links: pyroute2's parsing is the cost, not the kernel
            for family in (socket.AF_INET, socket.AF_INET6):
                # With strict checking the kernel itself skips other tables (the local table holds
                # several routes per interface) and other protocols: at 5,000 veths, ~45,000 of
                # the ~50,000 routes a plain dump would have us parse.
                body = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, protocol or 0, 0, 0, 0)
                for payload in self._batch.dump(RTM_GETROUTE, body):
                    route = _raw_route(payload, names)
                    if route is not None and (protocol is None or route.proto == protocol):
                        out.append(route)
            return out
        with _kernel("listing routes"):
            for family in (socket.AF_INET, socket.AF_INET6):
                for m in self._ipr.route("dump", family=family, table=RT_TABLE_MAIN):
                    if m["type"] not in (RTN_UNICAST, RTN_BLACKHOLE):
                        continue
                    route = _route(m, family, names)
                    if protocol is None or route.proto == protocol:
                        out.append(route)
        return out

    def add_route(self, route: KernelRoute) -> None:
        self._route("add", route)

    def replace_route(self, route: KernelRoute) -> None:
        self._route("replace", route)

    def delete_route(self, route: KernelRoute) -> None:
        try:
            self._route("del", route)
        except KernelError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise

    def write_routes(self, ops: Sequence[tuple[str, KernelRoute]]) -> list[KernelError | None]:
        """Many route writes (``("add" | "replace" | "delete", route)``) at once: the requests go
        to the kernel many per ``sendmsg`` and their acknowledgements are read afterwards, instead of
        one round trip each. One result per op, in order: None, or the KernelError that ``add_route``
        etc. would have raised (deleting a route that is gone is a success, as in ``delete_route``)."""
        if self._batch is None:  # made around a bare IPRoute: one request at a time
            return write_each(self, ops)
        names: dict[str, int] | None = None
        messages: list[bytes | None] = []
        for action, route in ops:
            oif = route.ifindex
            if route.type == "unicast" and oif is None and route.device is not None:
                if names is None:
                    names = {link.name: link.index for link in self.links()}
                oif = names.get(route.device)
                if oif is None:
                    messages.append(None)
                    continue
            messages.append(_route_message(_COMMANDS[action], route, oif))
        codes = self._batch.send(messages)
        out: list[KernelError | None] = []
        for (action, route), message, code in zip(ops, messages, codes, strict=True):
            if message is None:
                code = errno.ENODEV
            if code == 0 or (action == "delete" and code in (errno.ESRCH, errno.ENOENT)):
                out.append(None)
            else:
                out.append(KernelError(f"{_COMMANDS[action][0]} route {_describe(route)}", code))
        return out

    def _route(self, command: str, route: KernelRoute) -> None:
        net = ipaddress.ip_network(route.dst)
        spec: dict[str, Any] = {
            "family": socket.AF_INET if net.version == 4 else socket.AF_INET6,
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "table": RT_TABLE_MAIN,
            "proto": route.proto,
            "type": route.type,
            "scope": _SCOPES[route.scope],
        }
        if route.gateway:
            spec["gateway"] = route.gateway
        if route.onlink:
            spec["flags"] = RTNH_F_ONLINK
        spec["priority"] = route.metric if route.metric is not None else DEFAULT_METRIC[net.version]
        if route.type == "unicast":
            if route.ifindex is not None:
                spec["oif"] = route.ifindex
            elif route.device is not None:
                link = self.link(route.device)
                if link is None:
                    raise KernelError(f"{command} route {route.dst} via {route.device}", errno.ENODEV)
                spec["oif"] = link.index
        try:
            self._ipr.route(command, **spec)
        except NetlinkError as e:
            raise KernelError(f"{command} route {_describe(route)}", e.code) from e

    # -- FDB and neighbours --------------------------------------------------------------------

    def fdb(self, index: int) -> set[tuple[str, str]]:
        """The (MAC, remote address) entries of a VXLAN device."""
        with _kernel(f"listing the FDB of link {index}"):
            entries = self._ipr.fdb("dump", ifindex=index)
        return {
            (str(e.get("lladdr")), str(e.get("dst")))
            for e in entries
            if e["ifindex"] == index and e.get("dst") and e.get("lladdr")
        }

    def add_fdb(self, index: int, mac: str, dst: str) -> None:
        try:
            self._ipr.fdb("append", ifindex=index, lladdr=mac, dst=dst)  # permanent, self (pyroute2's defaults)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(f"adding the FDB entry {mac} dst {dst}", e.code) from e

    def delete_fdb(self, index: int, mac: str, dst: str) -> None:
        try:
            self._ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ENODEV):
                raise KernelError(f"deleting the FDB entry {mac} dst {dst}", e.code) from e

    def neighbours(self, index: int) -> list[Neighbour]:
        with _kernel(f"listing the neighbours of link {index}"):
            entries = self._ipr.neigh("dump", ifindex=index)
        return [
            Neighbour(str(_ip(e.get("dst"))), e.get("lladdr"), bool(e["state"] & NUD_PERMANENT))
            for e in entries
            if e["ifindex"] == index and e.get("dst")
        ]

    def set_neighbour(self, index: int, ip: str, mac: str) -> None:
        family = socket.AF_INET if ipaddress.ip_address(ip).version == 4 else socket.AF_INET6
        with _kernel(f"setting the neighbour {ip} lladdr {mac}"):
            self._ipr.neigh("replace", family=family, ifindex=index, dst=ip, lladdr=mac, state=NUD_PERMANENT)

    def delete_neighbour(self, index: int, ip: str) -> None:
        family = socket.AF_INET if ipaddress.ip_address(ip).version == 4 else socket.AF_INET6
        try:
            self._ipr.neigh("del", family=family, ifindex=index, dst=ip)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ENODEV):
                raise KernelError(f"deleting the neighbour {ip}", e.code) from e

    def _get_link(self, **key: Any) -> Link | None:
        try:
            (msg,) = self._ipr.link("get", **key)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise KernelError(f"looking up link {key}", e.code) from e
        return _link(msg)


# -- link notifications ---------------------------------------------------------------------------

RTMGRP_LINK = 0x1
SO_RCVBUFFORCE = 33
RTM_NEWLINK, RTM_DELLINK = 16, 17


@dataclass(frozen=True)
class LinkEvent:
    """A link appeared or changed (``present``), or was deleted."""

    name: str
    index: int
    present: bool


class EventsLost(Exception):
    """The kernel dropped notifications (the receive buffer was full): re-read the links."""


class LinkEvents:
    """The link notifications (``RTMGRP_LINK``) of the namespace it was opened in, through a
    non-blocking socket that a caller waits on with ``select`` (``fileno``) and drains with
    ``receive``. Parsed with the same header and attribute walk as the rest of this driver."""

    RCVBUF = 4 << 20  # a namespace's worth of veths going at once (one message is ~1.5 kB)

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            try:  # root may exceed rmem_max; anyone else gets what rmem_max allows
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.RCVBUF)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
            self._sock.bind((0, RTMGRP_LINK))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LinkEvents:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def receive(self) -> list[LinkEvent]:
        """Every notification queued now, oldest first ([] when none); EventsLost on an overflow
        (the notifications before it are lost with it: the caller re-reads the links)."""
        events: list[LinkEvent] = []
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise EventsLost("link notifications were dropped by the kernel") from None
                raise
            events += parse_link_events(data)


def parse_link_events(data: bytes) -> list[LinkEvent]:
    """The RTM_NEWLINK/RTM_DELLINK messages in one datagram of ``LinkEvents``."""
    events = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            payload = data[offset + _HEADER.size:offset + length]
            index = _IFINFOMSG.unpack_from(payload)[2]
            name = _attrs(payload, _IFINFOMSG.size, until=IFLA_IFNAME).get(IFLA_IFNAME)
            if name is not None:
                events.append(LinkEvent(name.rstrip(b"\0").decode(), index, kind == RTM_NEWLINK))
        offset += (length + 3) & ~3
    return events


# -- batched route writes: rtnetlink messages packed by hand ---------------------------------------

NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
NLM_F_DUMP, RTM_GETLINK, RTM_GETROUTE = 0x300, 18, 26
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 3, 4, 18, 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT, IFLA_VXLAN_LOCAL6 = 1, 4, 7, 15, 17
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_GET_STRICT_CHK = 270, 10, 12
_COMMANDS = {  # action -> (verb in messages, message type, flags)
    "add": ("add", RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL),
    "replace": ("replace", RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE),
    "delete": ("del", RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK),
}
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags


def write_each(driver: Any, ops: Sequence[tuple[str, KernelRoute]]) -> list[KernelError | None]:
    """``ops`` (``("add" | "replace" | "delete", route)``) one request at a time through the
    driver's ``add_route``, ``replace_route`` and ``delete_route``, with the outcomes
    ``Netlink.write_routes`` reports: None, or the KernelError the write raised."""
    out: list[KernelError | None] = []
    for action, route in ops:
        try:
            {"add": driver.add_route, "replace": driver.replace_route, "delete": driver.delete_route}[action](route)
            out.append(None)
        except KernelError as e:
            out.append(e)
    return out


def _route_message(command: tuple[str, int, int], route: KernelRoute, oif: int | None) -> bytes:
    """The body of one RTM_NEWROUTE/RTM_DELROUTE (header added when sent), as ``_route`` asks pyroute2."""
    net = ipaddress.ip_network(route.dst)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    body = _RTMSG.pack(family, net.prefixlen, 0, 0, RT_TABLE_MAIN, route.proto, _SCOPES[route.scope],
                       _TYPES[route.type], RTNH_F_ONLINK if route.onlink else 0)
    body += _attr(RTA_TABLE, struct.pack("=I", RT_TABLE_MAIN))
    body += _attr(RTA_DST, net.network_address.packed)
    metric = route.metric if route.metric is not None else DEFAULT_METRIC[net.version]
    body += _attr(RTA_PRIORITY, struct.pack("=I", metric))
    if route.gateway:
        body += _attr(RTA_GATEWAY, ipaddress.ip_address(route.gateway).packed)
    if route.type == "unicast" and oif is not None:
        body += _attr(RTA_OIF, struct.pack("=I", oif))
    return struct.pack("=HH", command[1], command[2]) + body  # type and flags, for send()


class _RouteBatch:
    """A second rtnetlink socket (in the namespace it was opened in) for writes sent in bulk.

    Requests go ``CHUNK`` per ``sendmsg``; the kernel handles them in order and queues one ack
    each (capped: no copy of the request), which are read before the next chunk, so the receive
    buffer never overflows."""

    CHUNK = 128
    TIMEOUT = 10.0  # seconds without an ack: the kernel answers at once, so something is badly wrong

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        # Dump requests' headers are filters (table, protocol), not ignored; before Linux 4.20 the
        # option is unknown and the dumps are filtered here instead (routes() checks every route).
        with contextlib.suppress(OSError):
            self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, 0))
        self._sock.settimeout(self.TIMEOUT)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def send(self, messages: Sequence[bytes | None]) -> list[int]:
        """The errno of each message (0: done); None messages are skipped (their code is -1)."""
        codes = [-1] * len(messages)
        todo = [i for i, m in enumerate(messages) if m is not None]
        for start in range(0, len(todo), self.CHUNK):
            chunk = todo[start:start + self.CHUNK]
            by_seq: dict[int, int] = {}
            data = bytearray()
            for i in chunk:
                message = messages[i]
                assert message is not None
                self._seq = self._seq % 0x7FFFFFFF + 1
                by_seq[self._seq] = i
                kind, flags = struct.unpack_from("=HH", message)
                data += _HEADER.pack(_HEADER.size + len(message) - 4, kind, flags, self._seq, 0) + message[4:]
            try:
                self._sock.sendall(data)
                while by_seq:
                    self._receive(by_seq, codes)
            except OSError as e:  # acks lost (ENOBUFS) or none coming: those writes count as failed
                for i in by_seq.values():
                    codes[i] = e.errno or errno.EIO
        return codes

    def dump(self, kind: int, body: bytes) -> Iterator[bytes]:
        """The payload of every message a dump request of ``kind`` answers (KernelError on refusal)."""
        self._seq = self._seq % 0x7FFFFFFF + 1
        seq = self._seq
        self._sock.sendall(_HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        while True:
            data = self._sock.recv(1 << 20)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, msg_kind, _, msg_seq, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    break
                if msg_seq == seq:
                    if msg_kind == NLMSG_DONE:
                        return
                    if msg_kind == NLMSG_ERROR:
                        (error,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                        if error:
                            raise KernelError(f"dumping netlink objects of type {kind}", -error)
                    else:
                        yield data[offset + _HEADER.size:offset + length]
                offset += (length + 3) & ~3

    def _receive(self, by_seq: dict[int, int], codes: list[int]) -> None:
        data = self._sock.recv(1 << 16)
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _, seq, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                break
            if kind == NLMSG_ERROR and seq in by_seq:
                (error,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                codes[by_seq.pop(seq)] = -error
            offset += (length + 3) & ~3


@contextmanager
def _kernel(doing: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as e:
        raise KernelError(doing, e.code) from e


def _link(msg: Any) -> Link:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    vxlan = None
    if kind == "vxlan":
        data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        vxlan = VXLANAttrs(
            vni=int(data.get("IFLA_VXLAN_ID") or 0),
            port=int(data.get("IFLA_VXLAN_PORT") or 0),
            local=data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6"),
            learning=bool(data.get("IFLA_VXLAN_LEARNING")),
        )
    return Link(
        index=int(msg["index"]),
        name=str(msg.get("ifname")),
        kind=kind,
        mtu=int(msg.get("mtu") or 0),
        mac=msg.get("address"),
        up=bool(msg["flags"] & IFF_UP),
        vxlan=vxlan,
    )


def _route(m: Any, family: int, names: dict[int, str]) -> KernelRoute:
    default = "0.0.0.0" if family == socket.AF_INET else "::"
    version = 4 if family == socket.AF_INET else 6
    blackhole = m["type"] == RTN_BLACKHOLE
    oif = m.get("oif")
    metric = m.get("priority") or 0
    gateway = m.get("gateway")
    return KernelRoute(
        dst=_cidr(m.get("dst") or default, m["dst_len"]),
        type="blackhole" if blackhole else "unicast",
        gateway=str(ipaddress.ip_address(gateway)) if gateway else None,
        device=None if blackhole or oif is None else names.get(int(oif)),  # v6 blackholes hang on lo
        onlink=bool(m["flags"] & RTNH_F_ONLINK),
        scope="link" if m["scope"] == RT_SCOPE_LINK else "universe",
        proto=int(m["proto"]),
        metric=None if metric == DEFAULT_METRIC[version] else int(metric),
        ifindex=None if blackhole or oif is None else int(oif),
    )


def _raw_link(payload: bytes) -> Link:
    """``_link`` for an RTM_NEWLINK message parsed by hand."""
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
    attrs = _attrs(payload, _IFINFOMSG.size)
    info = _attrs(attrs.get(IFLA_LINKINFO, b""))
    kind = info[IFLA_INFO_KIND].rstrip(b"\0").decode() if IFLA_INFO_KIND in info else None
    vxlan = None
    if kind == "vxlan":
        data = _attrs(info.get(IFLA_INFO_DATA, b""))
        local = data.get(IFLA_VXLAN_LOCAL) or data.get(IFLA_VXLAN_LOCAL6)
        vxlan = VXLANAttrs(
            vni=struct.unpack("=I", data[IFLA_VXLAN_ID])[0] if IFLA_VXLAN_ID in data else 0,
            port=struct.unpack(">H", data[IFLA_VXLAN_PORT])[0] if IFLA_VXLAN_PORT in data else 0,
            local=str(ipaddress.ip_address(local)) if local else None,
            learning=bool(data.get(IFLA_VXLAN_LEARNING, b"\0")[0]),
        )
    address = attrs.get(IFLA_ADDRESS)
    return Link(
        index=index,
        name=attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
        kind=kind,
        mtu=struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0,
        mac=":".join(f"{b:02x}" for b in address) if address else None,
        up=bool(flags & IFF_UP),
        vxlan=vxlan,
    )


def _raw_route(payload: bytes, names: dict[int, str]) -> KernelRoute | None:
    """``_route`` for an RTM_NEWROUTE message parsed by hand; None for what ``routes()`` skips."""
    family, dst_len, _, _, table, proto, scope, kind, flags = _RTMSG.unpack_from(payload)
    if kind not in (RTN_UNICAST, RTN_BLACKHOLE):
        return None
    attrs = _attrs(payload, _RTMSG.size)
    if (struct.unpack("=I", attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else table) != RT_TABLE_MAIN:
        return None
    version = 4 if family == socket.AF_INET else 6
    blackhole = kind == RTN_BLACKHOLE
    dst = ipaddress.ip_address(attrs[RTA_DST]) if RTA_DST in attrs else ("0.0.0.0" if version == 4 else "::")
    oif = struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
    metric = struct.unpack("=I", attrs[RTA_PRIORITY])[0] if RTA_PRIORITY in attrs else 0
    gateway = attrs.get(RTA_GATEWAY)
    return KernelRoute(
        dst=_cidr(dst, dst_len),
        type="blackhole" if blackhole else "unicast",
        gateway=str(ipaddress.ip_address(gateway)) if gateway else None,
        device=None if blackhole or oif is None else names.get(oif),
        onlink=bool(flags & RTNH_F_ONLINK),
        scope="link" if scope == RT_SCOPE_LINK else "universe",
        proto=proto,
        metric=None if metric == DEFAULT_METRIC[version] else metric,
        ifindex=None if blackhole or oif is None else oif,
    )


def _describe(r: KernelRoute) -> str:
    parts = [r.type if r.type != "unicast" else "", r.dst]
    parts += [f"via {r.gateway}"] if r.gateway else []
    parts += [f"dev {r.device}"] if r.device else []
    parts += ["onlink"] if r.onlink else []
    return " ".join(p for p in parts if p)


def _ip(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(str(text).split("%")[0])
    except ValueError:
        return None


def _cidr(address: Any, prefixlen: int) -> str:
    return str(ipaddress.ip_network(f"{address}/{prefixlen}", strict=False))
