"""rtnetlink for long-lived drivers: bulk route writes, VXLAN and IPIP devices, FDB entries, the
underlay's lookups and link notifications.

Owns what a dataplane driver (the agent's managers, its orphan sweep, BGP's route writer) needs of
rtnetlink beyond ``kernel.rtnl``'s common set: ``BulkRTNL`` (a long-lived socket with strict dumps,
many route writes per ``sendmsg``, device creation, FDB entries) and ``LinkEvents``. It builds on
``kernel.rtnl``'s parsers and ``kernel.netlink``'s codec, never a parser of its own for an object
``kernel.rtnl`` reads. It lives apart so that the CNI wiring, which the in-process path imports on
every call, does not pay for loading it. Must not know any Tortie concept.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct

from kernel.netlink import (
    NLA_F_NESTED,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    KernelError,
    Socket,
    attr,
    messages,
    u32,
)
from kernel.netns import netns
from kernel.rtnl import (
    _COMMANDS,
    _NDMSG,
    _NO_LINK,
    _RTMSG,
    AF_BRIDGE,
    IFLA_ADDRESS,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_MTU,
    IFLA_VXLAN_ID,
    IFLA_VXLAN_LEARNING,
    IFLA_VXLAN_LOCAL,
    IFLA_VXLAN_LOCAL6,
    IFLA_VXLAN_PORT,
    NDA_DST,
    NDA_LLADDR,
    NETLINK_ROUTE,
    NTF_SELF,
    NUD_PERMANENT,
    RTA_DST,
    RTM_DELNEIGH,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTMGRP_LINK,
    RTNL,
    KernelRoute,
    Link,
    LinkEvent,
    _describe,
    _destination,
    _mac,
    _name,
    _route_body,
    ifinfo,
    link_event,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


class EventsLost(Exception):
    """The kernel dropped notifications (the receive buffer was full): re-read the links."""


class BulkRTNL(RTNL):
    """``RTNL`` with what long-lived drivers add (module docstring); ``open`` makes one."""

    @classmethod
    def open(cls, netns_path: str | None = None) -> BulkRTNL:
        """A long-lived socket (strict dumps, bulk writes) for ``netns_path`` (a /run/netns path),
        or for the calling thread's namespace."""
        if netns_path is None:
            return cls(strict=True, timeout=10.0)
        with netns(netns_path):
            return cls(strict=True, timeout=10.0)  # the socket stays in the namespace it was opened in

    def link_by_index(self, index: int) -> Link | None:
        return self._get_link(ifinfo(index), f"index {index}")

    # -- the underlay -----------------------------------------------------------------------------

    def address_link(self, address: str) -> Link | None:
        """The link that holds ``address`` (the node's underlay interface), if any."""
        wanted = ipaddress.ip_address(address)
        # Of the address's family only: every pod's host-side veth holds an IPv6 link-local address,
        # and parsing 5,000 of them made each periodic resync's MTU check cost ~0.2-0.5 s.
        family = socket.AF_INET if wanted.version == 4 else socket.AF_INET6
        for index, ip, _, _ in self.address_list(family=family):
            if ipaddress.ip_address(ip) == wanted:
                return self.link_by_index(index)
        return None

    def default_route_link(self) -> Link | None:
        """The link of the IPv4 default route, if there is one."""
        for r in self.routes(indexes={}, family=socket.AF_INET):
            if r.dst == "0.0.0.0/0" and r.ifindex:
                return self.link_by_index(r.ifindex)
        return None

    # -- devices ------------------------------------------------------------------------------------

    def add_vxlan(self, name: str, *, vni: int, port: int, local: str, mac: str, mtu: int) -> None:
        ip = ipaddress.ip_address(local)
        data = (attr(IFLA_VXLAN_ID, u32(vni)) + attr(IFLA_VXLAN_PORT, struct.pack(">H", port))
                + attr(IFLA_VXLAN_LOCAL if ip.version == 4 else IFLA_VXLAN_LOCAL6, ip.packed)
                + attr(IFLA_VXLAN_LEARNING, b"\0"))
        info = attr(IFLA_INFO_KIND, b"vxlan") + attr(IFLA_INFO_DATA | NLA_F_NESTED, data)
        self._sock.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                           _NO_LINK + _name(name) + attr(IFLA_ADDRESS, _mac(mac)) + attr(IFLA_MTU, u32(mtu))
                           + attr(IFLA_LINKINFO | NLA_F_NESTED, info), f"creating {name}")

    def add_ipip(self, name: str) -> None:
        """Create ``name`` as an IPIP device; asking for it loads the module, which makes the fallback
        ``tunl0`` in every namespace, so EEXIST for ``tunl0`` means success. EOPNOTSUPP: no module."""
        try:
            self._sock.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                               _NO_LINK + _name(name) + attr(IFLA_LINKINFO | NLA_F_NESTED,
                                                             attr(IFLA_INFO_KIND, b"ipip")), f"creating {name}")
        except KernelError as e:
            if e.code != errno.EEXIST:
                raise

    # -- routes in bulk -----------------------------------------------------------------------------

    def write_routes(self, ops: Sequence[tuple[str, KernelRoute]]) -> list[KernelError | None]:
        """Many route writes (``("add" | "replace" | "delete", route)``) at once: the requests go
        to the kernel many per ``sendmsg`` and their acknowledgements are read afterwards, instead of
        one round trip each. One result per op, in order: None, or the KernelError that ``add_route``
        etc. would have raised (deleting a route that is gone is a success, as in ``delete_route``)."""
        names: dict[str, int] | None = None
        requests: list[tuple[int, int, bytes] | None] = []
        append = requests.append
        body = RouteBodies().body
        commands = {action: (kind, flags) for action, (_, kind, flags) in _COMMANDS.items()}
        for action, route in ops:
            oif = route.ifindex
            if oif is None and route.device is not None and route.type == "unicast":
                if names is None:
                    names = self.link_indexes()
                oif = names.get(route.device)
                if oif is None:
                    append(None)
                    continue
            kind, flags = commands[action]
            append((kind, flags, body(route, oif)))
        codes = self._sock.batch(requests)
        out: list[KernelError | None] = []
        for (action, route), request, code in zip(ops, requests, codes, strict=True):
            if request is None:
                code = errno.ENODEV
            if code == 0 or (action == "delete" and code in (errno.ESRCH, errno.ENOENT)):
                out.append(None)
            else:
                out.append(KernelError(f"{_COMMANDS[action][0]} route {_describe(route)}", code))
        return out

    # -- FDB and neighbours ---------------------------------------------------------------------

    def fdb(self, index: int) -> set[tuple[str, str]]:
        """The (MAC, remote address) entries of a VXLAN device."""
        return {(mac, dst) for dst, mac, _ in self._neighbours(AF_BRIDGE, index) if mac}

    def add_fdb(self, index: int, mac: str, dst: str) -> None:
        """A permanent entry on the device itself (``bridge fdb append ... self permanent``)."""
        try:
            self._sock.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND, _fdb_body(index, mac, dst),
                               f"adding the FDB entry {mac} dst {dst}")
        except KernelError as e:
            if e.code != errno.EEXIST:
                raise

    def delete_fdb(self, index: int, mac: str, dst: str) -> None:
        try:
            self._sock.request(RTM_DELNEIGH, 0, _fdb_body(index, mac, dst), f"deleting the FDB entry {mac} dst {dst}")
        except KernelError as e:
            if e.code not in (errno.ENOENT, errno.ENODEV):
                raise

    def delete_neighbour(self, index: int, ip: str) -> None:
        address = ipaddress.ip_address(ip)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        try:
            self._sock.request(RTM_DELNEIGH, 0, _NDMSG.pack(family, index, 0, 0, 0) + attr(NDA_DST, address.packed),
                               f"deleting the neighbour {ip}")
        except KernelError as e:
            if e.code not in (errno.ENOENT, errno.ENODEV):
                raise


class RouteBodies:
    """``_route_body`` for many routes that differ in their destination only (a BGP table: one
    next hop, one device, 10,000 prefixes): the bytes around the destination are made once per
    shape of route and prefix length, not once per route (a third of the Python work of writing a
    large table). Must produce exactly what ``_route_body`` does."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[object, ...], tuple[bytes, bytes]] = {}

    def body(self, route: KernelRoute, oif: int | None) -> bytes:
        version, prefixlen, packed = _cached_destination(route.dst)
        if not prefixlen:
            return _route_body(route, oif)  # no RTA_DST at all: rare, not worth a shape
        key = (route.gateway, oif, prefixlen, version, route.type, route.scope, route.proto, route.table, route.metric,
               route.onlink)
        shape = self._shapes.get(key)
        if shape is None:
            whole = _route_body(route, oif)
            head = _RTMSG.size + 8  # rtmsg, then RTA_TABLE (4 + 4)
            dst = attr(RTA_DST, packed)
            assert whole[head:head + len(dst)] == dst
            shape = self._shapes[key] = (whole[:head] + dst[:4], whole[head + len(dst):])
        return shape[0] + packed + shape[1]


# A table's prefixes are written again when they are withdrawn, re-announced or refreshed: each
# is taken apart once (~0.7 us a time), not at every write.
_cached_destination = functools.lru_cache(maxsize=1 << 15)(_destination)


class LinkEvents:
    """The link notifications (``RTMGRP_LINK``) of the namespace it was opened in, through a
    non-blocking socket that a caller waits on with ``select`` (``fileno``) and drains with
    ``receive``."""

    RCVBUF = 4 << 20  # a namespace's worth of veths going at once (one message is ~1.5 kB)

    def __init__(self) -> None:
        self._sock = Socket(NETLINK_ROUTE, groups=RTMGRP_LINK, rcvbuf=self.RCVBUF)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LinkEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def receive(self) -> list[LinkEvent]:
        """Every notification queued now, oldest first ([] when none); EventsLost on an overflow
        (the notifications before it are lost with it: the caller re-reads the links)."""
        events: list[LinkEvent] = []
        while True:
            try:
                data = self._sock.recv()
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise EventsLost("link notifications were dropped by the kernel") from None
                raise
            events += parse_link_events(data)


def parse_link_events(data: bytes) -> list[LinkEvent]:
    """What the messages of one datagram of ``LinkEvents`` say (``kernel.rtnl.link_event``)."""
    events = []
    for kind, _, _, payload in messages(data):
        event = link_event(kind, payload)
        if event is not None:
            events.append(event)
    return events


def _fdb_body(index: int, mac: str, dst: str) -> bytes:
    return (_NDMSG.pack(AF_BRIDGE, index, NUD_PERMANENT, NTF_SELF, 0) + attr(NDA_LLADDR, _mac(mac))
            + attr(NDA_DST, ipaddress.ip_address(dst).packed))
