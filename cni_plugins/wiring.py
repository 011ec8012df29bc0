"""The veth/route wiring of one container, Calico's way.

Owns the kernel side of one attachment: the veth pair (host end ``tor…`` with the fixed MAC
``ee:ee:ee:ee:ee:ee`` and no address, container end ``CNI_IFNAME`` created directly in the
container's namespace), the host end's sysctls (proxy ARP / proxy NDP, forwarding), one host route
per address (route protocol 80), and inside the container the /32 and /128 addresses, a permanent
neighbour entry for each gateway (169.254.1.1 and the host end's link-local address, both at the host
end's fixed MAC, so nothing depends on the host answering ARP) and the default routes through them.
A container's further attachment (a second interface, as Multus makes) keeps the first one's default
route and gets a table of its own, used for traffic from its addresses.

"Host" means the namespace of the calling thread, so a lab can run all of this inside a namespace
of its own. Must not touch anything but the attachment's own links, routes and sysctls (plus
turning forwarding on in the host namespace), and keeps no state: the kernel is the record.
Speaks rtnetlink through ``cni_plugins.rtnl`` (standard library only), so the in-process plugin
does not pay for pyroute2's import and each request costs one system call.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from cni_plugins.naming import HOST_IF_PREFIX
from cni_plugins.rtnl import NUD_PERMANENT, RTNL, NetlinkError

Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"  # the EUI-64 link-local address HOST_MAC gives the host end
GATEWAY = {4: GATEWAY_V4, 6: GATEWAY_V6}
DEFAULT = {4: "0.0.0.0", 6: "::"}
ROUTE_PROTOCOL = 80  # Tortie's agent (CONTRACT, "Kernel objects")
# A container's second and later attachments route their own addresses' traffic through a table
# of their own, chosen by the interface's index in the container: ``from <address> lookup <table>``.
SECONDARY_TABLE_BASE = 10000
RULE_PRIORITY = 100
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # what `ip route add` and pyroute2 give a route by default
IFA_F_NODAD = 0x02
LOOPBACK_INDEX = 1  # the kernel gives every namespace's lo index 1
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class WiringError(Exception):
    """The kernel refused a step of the wiring; the message names the step and the reason."""


class NetnsNotFound(WiringError):
    """The container's network namespace does not exist (the container is gone)."""


class InterfaceExists(WiringError):
    """An interface with the attachment's name is already there (the spec says ADD must fail)."""


@dataclass(frozen=True)
class Wired:
    """What ``setup`` made, as the CNI result reports it."""

    host_ifname: str
    host_mac: str
    container_ifname: str
    container_mac: str
    container_index: int


@contextmanager
def netns(path: str | int) -> Iterator[None]:
    """Run the body with the calling thread in the network namespace ``path`` (a path or an open fd).

    The thread always returns to the namespace it came from, even when the body raises. Only the
    calling thread moves: the network namespace is a per-thread attribute.
    """
    target = _open_netns(path) if isinstance(path, str) else path
    origin = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, path)
        try:
            yield
        finally:
            _setns(origin, "this thread came from")
    finally:
        os.close(origin)
        if isinstance(path, str):
            os.close(target)


def setup(netns_path: str, ifname: str, host_if: str, mtu: int, addresses: list[Address]) -> Wired:
    """Create and configure the veth pair of one attachment; on any failure leave nothing behind."""
    families: set[int] = {a.version for a in addresses}
    with ExitStack() as resources:
        host = resources.enter_context(RTNL())
        with netns(netns_path):
            container = resources.enter_context(RTNL())  # the socket stays in the container's namespace
        ns_fd = _open_netns(netns_path)
        resources.callback(os.close, ns_fd)
        if container.link(ifname) is not None:
            raise InterfaceExists(f"the container {netns_path} already has an interface named {ifname}")
        _remove_leftover(host, host_if)

        with ExitStack() as undo:
            with _doing(f"creating the veth pair {host_if}/{ifname}"):
                try:
                    # The host end is created up; it has no carrier until the peer comes up, last.
                    host.add_veth(host_if, HOST_MAC, mtu, ifname, ns_fd)
                except NetlinkError as e:
                    if e.code == errno.EEXIST:  # lost a race with another ADD of the same name
                        raise InterfaceExists(f"{host_if} or {ifname} in {netns_path} appeared meanwhile") from e
                    raise
            # Registered as soon as the veth is ours: every later step's failure removes it (and its peer).
            undo.callback(_delete_link, host, host_if)

            with _doing(f"configuring the host end {host_if}"):
                link = host.link(host_if)
                if link is None:
                    raise WiringError(f"{host_if} vanished while it was being configured")
                host_index, host_mac = link.index, link.mac
                _host_sysctls(host_if, families)

            with _doing(f"configuring {ifname} in {netns_path}"):
                peer = container.link(ifname)
                if peer is None:
                    raise WiringError(f"{ifname} in {netns_path} vanished while it was being configured")
                index, mac = peer.index, peer.mac
                if 6 in families:
                    with netns(ns_fd):
                        _sysctl(f"ipv6/conf/{ifname}/accept_dad", "0")
                container.set_up(LOOPBACK_INDEX)
                container.set_up(index)
                for a in addresses:  # Calico's /32 and /128: everything is reached through the gateway
                    with _doing(f"adding the address {a.ip} to {ifname} in {netns_path}"):
                        flags = IFA_F_NODAD if a.version == 6 else 0
                        container.add_address(index, str(a.ip), a.max_prefixlen, flags)
                # The gateway's MAC is fixed: a permanent entry means the pod never needs an ARP or
                # NDP answer for it, so it works on a host with no route (proxy ARP needs one).
                for version in sorted(families):
                    container.set_neighbour(index, GATEWAY[version], HOST_MAC)
                taken = _families_with_default(container)
                for version in sorted(families):
                    if version not in taken:  # the container's first attachment: Calico's routes
                        if version == 4:
                            container.add_route(GATEWAY_V4, 32, oif=index, scope=RT_SCOPE_LINK, protocol=RTPROT_BOOT)
                        container.add_route(DEFAULT[version], 0, gateway=GATEWAY[version], oif=index,
                                            protocol=RTPROT_BOOT)
                        continue
                    # A further attachment: the main table's default route stays the first's; what is
                    # sent from this attachment's addresses leaves through it, by a table of its own.
                    table = secondary_table(index)
                    container.add_route(DEFAULT[version], 0, gateway=GATEWAY[version], oif=index,
                                        protocol=RTPROT_BOOT, table=table, onlink=True)
                    for a in addresses:
                        if a.version == version:
                            container.add_rule(str(a.ip), a.max_prefixlen, table, RULE_PRIORITY)

            with _doing(f"adding the host routes via {host_if}"):
                for a in addresses:
                    _add_host_route(host, host_index, a)
            undo.pop_all()
        return Wired(host_if, host_mac, ifname, mac, index)


def secondary_table(container_index: int) -> int:
    return SECONDARY_TABLE_BASE + container_index


def _families_with_default(container: RTNL) -> set[int]:
    """The address families for which the container already has a main-table default route."""
    return {4 if r.family == socket.AF_INET else 6
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in container.routes(family) if r.dst_len == 0 and r.table == RT_TABLE_MAIN and r.oif}


def forget_rules(netns_path: str, ifname: str) -> None:
    """Remove the source rules a further attachment ``ifname`` added in its container (its table's
    routes go with its interface). Nothing to do when the namespace or the interface is gone."""
    try:
        ns_fd = _open_netns(netns_path)
    except NetnsNotFound:
        return
    try:
        with netns(ns_fd):
            container = RTNL()
    finally:
        os.close(ns_fd)
    with container, _doing(f"removing the source rules of {ifname} in {netns_path}"):
        link = container.link(ifname)
        if link is None:
            return
        table = secondary_table(link.index)
        for family in (socket.AF_INET, socket.AF_INET6):
            for src, src_len, rule_table, priority in container.rules(family):
                if rule_table == table:
                    container.delete_rule(src, src_len, rule_table, priority)


def check_free(netns_path: str, ifname: str) -> None:
    """Raise NetnsNotFound or InterfaceExists before any state is created: ADD checks this first
    so that a request it must refuse reserves nothing."""
    with netns(netns_path), RTNL() as container, _doing(f"looking up {ifname} in {netns_path}"):
        if container.link(ifname) is not None:
            raise InterfaceExists(f"the container {netns_path} already has an interface named {ifname}")


def teardown(host_if: str) -> bool:
    """Delete the host end (the peer and the host routes go with it); False when it was already gone."""
    with RTNL() as host:
        return _delete_link(host, host_if)


def check(netns_path: str, ifname: str, host_if: str, addresses: list[Address]) -> list[str]:
    """The problems of one attachment, one sentence each; empty when it is healthy."""
    problems: list[str] = []
    with RTNL() as host:
        found = host.link(host_if)
        if found is None:
            problems.append(f"the host interface {host_if} is missing")
        else:
            routed = _routes(host, found.index)
            problems += [
                f"the host route to {a.ip} via {host_if} is missing"
                for a in addresses
                if (str(a.ip), a.max_prefixlen) not in routed
            ]
    try:
        ns_fd = _open_netns(netns_path)
    except NetnsNotFound as e:
        return [*problems, str(e)]
    try:
        with netns(ns_fd):
            container = RTNL()
    finally:
        os.close(ns_fd)
    with container:
        peer = container.link(ifname)
        if peer is None:
            return [*problems, f"the container interface {ifname} is missing"]
        have = set(container.addresses(peer.index))
        problems += [
            f"the address {a.ip} is missing on {ifname}" for a in addresses if (str(a.ip), a.max_prefixlen) not in have
        ]
        gateways = _default_gateways(container, peer.index)
        rules = {(src, table) for family in (socket.AF_INET, socket.AF_INET6)
                 for src, _, table, _ in container.rules(family)}
        neighbours = {(ip, mac) for ip, mac, state in container.neighbours(peer.index) if state & NUD_PERMANENT}
        for version, gateway in GATEWAY.items():
            if not any(a.version == version for a in addresses):
                continue
            if (gateway, HOST_MAC) not in neighbours:
                problems.append(f"the permanent neighbour entry for the gateway {gateway} on {ifname} is missing")
            tables = {table for table, gw in gateways if gw == gateway}
            if not tables:
                problems.append(f"the IPv{version} default route via {gateway} on {ifname} is missing")
            for table in tables - {RT_TABLE_MAIN}:  # a further attachment's own table
                problems += [f"the rule sending traffic from {a.ip} to table {table} is missing"
                             for a in addresses if a.version == version and (str(a.ip), table) not in rules]
    return problems


def list_host_ifs(prefix: str = HOST_IF_PREFIX) -> list[str]:
    """The names of the links in the current namespace that start with ``prefix`` (the host ends)."""
    with RTNL() as host:
        return sorted(link.name for link in host.links() if link.name.startswith(prefix))


def _open_netns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFound(f"the network namespace {path} does not exist") from None


def _setns(fd: int, what: str | int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise WiringError(f"cannot enter the network namespace {what}: {os.strerror(code)}")


@contextmanager
def _doing(step: str) -> Iterator[None]:
    """Turn a kernel refusal during ``step`` into a one-line WiringError."""
    try:
        yield
    except NetlinkError as e:
        raise WiringError(f"{step}: {os.strerror(e.code)}") from e
    except OSError as e:
        raise WiringError(f"{step}: {e.strerror or e}") from e


def _sysctl(key: str, value: str) -> None:
    # /proc/sys/net resolves against the calling thread's namespace.
    with open(f"/proc/sys/net/{key}", "w") as f:
        f.write(value)


def _host_sysctls(host_if: str, families: set[int]) -> None:
    # Set before the peer comes up (carrier), so that the link-local address is never tentative.
    settings = {
        f"ipv4/conf/{host_if}/proxy_arp": "1",
        f"ipv4/neigh/{host_if}/proxy_delay": "0",
        f"ipv4/conf/{host_if}/forwarding": "1",
    }
    wanted = {"ipv4/ip_forward"}
    if 6 in families:
        settings |= {
            f"ipv6/conf/{host_if}/{key}": value
            for key, value in (("disable_ipv6", "0"), ("accept_dad", "0"), ("proxy_ndp", "1"), ("forwarding", "1"))
        }
        wanted.add("ipv6/conf/all/forwarding")
    for key, value in settings.items():
        _sysctl(key, value)
    for key in wanted:
        # Written only when off: turning ip_forward on rewrites every interface's forwarding flag.
        with open(f"/proc/sys/net/{key}") as f:
            if f.read().strip() != "1":
                _sysctl(key, "1")


def _remove_leftover(host: RTNL, host_if: str) -> None:
    """A veth with this name is what an earlier, interrupted ADD of this attachment left; anything else is not ours."""
    try:
        link = host.link(host_if)
    except NetlinkError as e:
        raise WiringError(f"looking up {host_if}: {os.strerror(e.code)}") from e
    if link is None:
        return
    if link.kind != "veth":
        raise InterfaceExists(f"the host interface name {host_if} is taken by a link that is not a veth")
    _delete_link(host, host_if)


def _delete_link(host: RTNL, name: str) -> bool:
    try:
        return host.delete_link(name)
    except NetlinkError as e:
        raise WiringError(f"deleting {name}: {os.strerror(e.code)}") from e


def _add_host_route(host: RTNL, index: int, a: Address) -> None:
    scope = RT_SCOPE_LINK if a.version == 4 else 0
    try:
        host.add_route(str(a.ip), a.max_prefixlen, oif=index, scope=scope, protocol=ROUTE_PROTOCOL)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
        # Tolerated when it is already ours (the agent may have been quicker); otherwise name the holder.
        route = host.route_to(str(a.ip))
        if route.oif != index:
            holder = next((link.name for link in host.links() if link.index == route.oif), f"index {route.oif}")
            raise WiringError(f"{a.ip} is already routed to {holder}: run DEL for that attachment") from e


def _routes(host: RTNL, index: int) -> set[tuple[str, int]]:
    return {
        (r.dst, r.dst_len)
        for family in (socket.AF_INET, socket.AF_INET6)
        for r in host.routes(family)
        if r.oif == index and r.table == RT_TABLE_MAIN
    }


def _default_gateways(container: RTNL, index: int) -> set[tuple[int, str]]:
    """(table, gateway) of the default routes through the link ``index``, in any table."""
    return {
        (r.table, r.gateway)
        for family in (socket.AF_INET, socket.AF_INET6)
        for r in container.routes(family)
        if r.dst_len == 0 and r.oif == index and (r.table == RT_TABLE_MAIN or r.table >= SECONDARY_TABLE_BASE)
    }
