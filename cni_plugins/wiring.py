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
Speaks rtnetlink through ``kernel.rtnl`` and enters namespaces through ``kernel.netns`` (standard
library only), so the in-process plugin does not pay for pyroute2's import and each request costs
one system call.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from cni_plugins.naming import HOST_IF_PREFIX, ROUTE_PROTOCOL
from cni_plugins.workers import Workers
from kernel import netns as namespaces
from kernel.netlink import KernelError
from kernel.rtnl import LOOPBACK_INDEX, RT_TABLE_MAIN, RTNL, RTPROT_BOOT, KernelRoute
from kernel.unlisting import delete_unlisted

Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"  # the EUI-64 link-local address HOST_MAC gives the host end
GATEWAY = {4: GATEWAY_V4, 6: GATEWAY_V6}
DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}
# A container's second and later attachments route their own addresses' traffic through a table
# of their own, chosen by the interface's index in the container: ``from <address> lookup <table>``.
SECONDARY_TABLE_BASE = 10000
RULE_PRIORITY = 100


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
def _inside(path: str | int) -> Iterator[None]:
    """``kernel.netns.netns`` with its refusals as this module's errors (NetnsNotFound, WiringError)."""
    try:
        with namespaces.netns(path):
            yield
    except namespaces.NetnsNotFound as e:
        raise NetnsNotFound(str(e)) from None
    except namespaces.NetnsError as e:
        raise WiringError(str(e)) from None


def setup(netns_path: str, ifname: str, host_if: str, mtu: int, addresses: list[Address]) -> Wired:
    """Create and configure the veth pair of one attachment; on any failure leave nothing behind."""
    with create(netns_path, ifname, host_if, mtu) as pair:
        return pair.configure(addresses)


@contextmanager
def create(netns_path: str, ifname: str, host_if: str, mtu: int) -> Iterator[Pair]:
    """The veth pair of one attachment, created but not configured: the part of the wiring that
    needs no address, which ADD runs while its addresses are being assigned. The pair is removed
    again when the block ends without :meth:`Pair.configure` having succeeded (an exception, or
    an IPAM failure meanwhile)."""
    with ExitStack() as resources:
        host = resources.enter_context(RTNL())
        with _inside(netns_path):
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
                except KernelError as e:
                    if e.code == errno.EEXIST:  # lost a race with another ADD of the same name
                        raise InterfaceExists(f"{host_if} or {ifname} in {netns_path} appeared meanwhile") from e
                    raise
            # Registered as soon as the veth is ours: every later step's failure removes it (and its peer).
            undo.callback(_delete_link, host, host_if)
            pair = Pair(netns_path, ifname, host_if, host, container, ns_fd)
            yield pair
            if pair.wired is not None:
                undo.pop_all()


class Pair:
    """A veth pair :func:`create` made; :meth:`configure` gives it its addresses and routes."""

    def __init__(self, netns_path: str, ifname: str, host_if: str, host: RTNL, container: RTNL, ns_fd: int) -> None:
        self.netns_path, self.ifname, self.host_if = netns_path, ifname, host_if
        self._host, self._container, self._ns_fd = host, container, ns_fd
        self.wired: Wired | None = None
        self._prepared: set[int] = set()  # the address families prepare() has done
        self._host_link: tuple[int, str] | None = None
        self._peer: tuple[int, str] | None = None

    def prepare(self, families: set[int]) -> None:
        """The part of :meth:`configure` that needs the address families but no address: the host
        end's sysctls, both ends up, the gateway's neighbour entries. ADD runs it while its
        addresses are being assigned (the assignment's etcd round trips are the longer wait)."""
        families = families - self._prepared
        if not families:
            return
        host, container, ns_fd = self._host, self._container, self._ns_fd
        netns_path, ifname, host_if = self.netns_path, self.ifname, self.host_if
        with _doing(f"configuring the host end {host_if}"):
            link = host.link(host_if)
            if link is None:
                raise WiringError(f"{host_if} vanished while it was being configured")
            self._host_link = (link.index, link.mac or "")
            _host_sysctls(host_if, families)

        with _doing(f"configuring {ifname} in {netns_path}"):
            peer = container.link(ifname)
            if peer is None:
                raise WiringError(f"{ifname} in {netns_path} vanished while it was being configured")
            self._peer = (peer.index, peer.mac or "")
            if 6 in families:
                with _inside(ns_fd):
                    _sysctl(f"ipv6/conf/{ifname}/accept_dad", "0")  # before any address: no DAD
            if not self._prepared:
                container.set_link(LOOPBACK_INDEX, up=True)
                container.set_link(peer.index, up=True)
            # The gateway's MAC is fixed: a permanent entry means the pod never needs an ARP or
            # NDP answer for it, so it works on a host with no route (proxy ARP needs one).
            for version in sorted(families):
                container.set_neighbour(peer.index, GATEWAY[version], HOST_MAC)
        self._prepared |= families

    def configure(self, addresses: list[Address]) -> Wired:
        """What :meth:`prepare` does (unless done) and the container end's addresses and routes,
        the host routes; a failure leaves the pair to be removed by :func:`create`."""
        families: set[int] = {a.version for a in addresses}
        self.prepare(families)
        assert self._host_link is not None and self._peer is not None
        container = self._container
        netns_path, ifname, host_if = self.netns_path, self.ifname, self.host_if
        (host_index, host_mac), (index, mac) = self._host_link, self._peer
        with _doing(f"configuring {ifname} in {netns_path}"):
            for a in addresses:  # Calico's /32 and /128: everything is reached through the gateway
                with _doing(f"adding the address {a.ip} to {ifname} in {netns_path}"):
                    container.add_address(index, _host_cidr(a))  # IPv6 without DAD
            taken = _families_with_default(container)
            for version in sorted(families):
                if version not in taken:  # the container's first attachment: Calico's routes
                    if version == 4:
                        container.add_route(KernelRoute(f"{GATEWAY_V4}/32", scope="link", ifindex=index))
                    container.add_route(KernelRoute(DEFAULT[version], gateway=GATEWAY[version], ifindex=index))
                    continue
                # A further attachment: the main table's default route stays the first's; what is
                # sent from this attachment's addresses leaves through it, by a table of its own.
                table = secondary_table(index)
                container.add_route(KernelRoute(DEFAULT[version], gateway=GATEWAY[version], ifindex=index,
                                                proto=RTPROT_BOOT, table=table, onlink=True))
                for a in addresses:
                    if a.version == version:
                        container.add_rule(str(a.ip), a.max_prefixlen, table, RULE_PRIORITY)

        with _doing(f"adding the host routes via {host_if}"):
            for a in addresses:
                _add_host_route(self._host, host_index, a)
        self.wired = Wired(host_if, host_mac, ifname, mac, index)
        return self.wired


def secondary_table(container_index: int) -> int:
    return SECONDARY_TABLE_BASE + container_index


def _families_with_default(container: RTNL) -> set[int]:
    """The address families for which the container already has a main-table default route."""
    return {r.version for r in container.routes(indexes={}) if r.dst.endswith("/0") and r.ifindex}


def forget_rules(netns_path: str, ifname: str) -> None:
    """Remove the source rules a further attachment ``ifname`` added in its container (its table's
    routes go with its interface). Nothing to do when the namespace or the interface is gone."""
    try:
        ns_fd = _open_netns(netns_path)
    except NetnsNotFound:
        return
    try:
        with _inside(ns_fd):
            container = RTNL()
    finally:
        os.close(ns_fd)
    with container, _doing(f"removing the source rules of {ifname} in {netns_path}"):
        # One dump of both families' rules first: a container without a further attachment (the
        # usual case) has none in a table of its own, and DEL's veth removal waits for this.
        further = [rule for rule in container.rules(socket.AF_UNSPEC) if rule[2] >= SECONDARY_TABLE_BASE]
        if not further:
            return
        link = container.link(ifname)
        if link is None:
            return
        table = secondary_table(link.index)
        for src, src_len, rule_table, priority in further:
            if rule_table == table:
                container.delete_rule(src, src_len, rule_table, priority)


def check_free(netns_path: str, ifname: str) -> None:
    """Raise NetnsNotFound or InterfaceExists before any state is created: ADD checks this first
    so that a request it must refuse reserves nothing."""
    with _inside(netns_path), RTNL() as container, _doing(f"looking up {ifname} in {netns_path}"):
        if container.link(ifname) is not None:
            raise InterfaceExists(f"the container {netns_path} already has an interface named {ifname}")


def teardown(host_if: str) -> bool:
    """Delete the host end (the peer and the host routes go with it); False when it was already
    gone. Returns once the kernel has unlisted the pair, while the kernel may still be freeing it
    (``kernel.unlisting``): an ADD of the same attachment can start at once."""
    try:
        return delete_unlisted(host_if, UNLISTING.submit)
    except KernelError as e:
        raise WiringError(f"deleting {host_if}: {os.strerror(e.code)}") from e


# The threads that sit in the kernel's deletion of a veth after teardown() has returned. Started by
# a thread in the node's namespace (a new thread inherits its creator's), though the request's socket,
# opened by the caller, decides where it is sent.
UNLISTING = Workers("unlisting")


def check(netns_path: str, ifname: str, host_if: str, addresses: list[Address]) -> list[str]:
    """The problems of one attachment, one sentence each; empty when it is healthy."""
    problems: list[str] = []
    with RTNL() as host:
        found = host.link(host_if)
        if found is None:
            problems.append(f"the host interface {host_if} is missing")
        else:
            routed = _routes(host, found.index)
            problems += [f"the host route to {a.ip} via {host_if} is missing"
                         for a in addresses if _host_cidr(a) not in routed]
    try:
        ns_fd = _open_netns(netns_path)
    except NetnsNotFound as e:
        return [*problems, str(e)]
    try:
        with _inside(ns_fd):
            container = RTNL()
    finally:
        os.close(ns_fd)
    with container:
        peer = container.link(ifname)
        if peer is None:
            return [*problems, f"the container interface {ifname} is missing"]
        have = container.addresses(peer.index)
        problems += [f"the address {a.ip} is missing on {ifname}" for a in addresses if _host_cidr(a) not in have]
        gateways = _default_gateways(container, peer.index)
        rules = {(src, table) for family in (socket.AF_INET, socket.AF_INET6)
                 for src, _, table, _ in container.rules(family)}
        neighbours = {(n.ip, n.mac) for n in container.neighbours(peer.index) if n.permanent}
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
        return namespaces.open_netns(path)
    except namespaces.NetnsNotFound as e:
        raise NetnsNotFound(str(e)) from None


def _host_cidr(a: Address) -> str:
    """The attachment's address as a host prefix (Calico's /32 and /128), as the kernel reads it back."""
    return f"{a.ip}/{a.max_prefixlen}"


@contextmanager
def _doing(step: str) -> Iterator[None]:
    """Turn a kernel refusal during ``step`` into a one-line WiringError."""
    try:
        yield
    except KernelError as e:
        raise WiringError(f"{step}: {os.strerror(e.code)}") from e
    except OSError as e:
        raise WiringError(f"{step}: {e.strerror or e}") from e


def _sysctl(key: str, value: str) -> None:
    # /proc/sys/net resolves against the calling thread's namespace. Unbuffered: a text file object
    # costs seven system calls (fstat, a tty check, two seeks) where three do, ~12 us of CPU against
    # ~6, and ADD writes up to nine of these.
    fd = os.open(f"/proc/sys/net/{key}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _sysctl_value(key: str) -> str:
    fd = os.open(f"/proc/sys/net/{key}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 64).decode().strip()
    finally:
        os.close(fd)


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
        if _sysctl_value(key) != "1":
            _sysctl(key, "1")


def _remove_leftover(host: RTNL, host_if: str) -> None:
    """A veth with this name is what an earlier, interrupted ADD of this attachment left; anything else is not ours."""
    try:
        link = host.link(host_if)
    except KernelError as e:
        raise WiringError(f"looking up {host_if}: {os.strerror(e.code)}") from e
    if link is None:
        return
    if link.kind != "veth":
        raise InterfaceExists(f"the host interface name {host_if} is taken by a link that is not a veth")
    _delete_link(host, host_if)


def _delete_link(host: RTNL, name: str) -> bool:
    try:
        return host.delete_link(name)
    except KernelError as e:
        raise WiringError(f"deleting {name}: {os.strerror(e.code)}") from e


def _add_host_route(host: RTNL, index: int, a: Address) -> None:
    scope = "link" if a.version == 4 else "universe"
    try:
        host.add_route(KernelRoute(_host_cidr(a), scope=scope, proto=ROUTE_PROTOCOL, ifindex=index))
    except KernelError as e:
        if e.code != errno.EEXIST:
            raise
        # Tolerated when it is already ours (the agent may have been quicker); otherwise name the holder.
        route = host.route_to(str(a.ip))
        if route.ifindex != index:
            holder = next((link.name for link in host.links() if link.index == route.ifindex),
                          f"index {route.ifindex}")
            raise WiringError(f"{a.ip} is already routed to {holder}: run DEL for that attachment") from e


def _routes(host: RTNL, index: int) -> set[str]:
    return {r.dst for r in host.routes(indexes={}) if r.ifindex == index}


def _default_gateways(container: RTNL, index: int) -> set[tuple[int, str]]:
    """(table, gateway) of the default routes through the link ``index``, in any table."""
    return {
        (r.table, r.gateway or "")
        for r in container.routes(indexes={}, table=None)
        if r.dst.endswith("/0") and r.ifindex == index and (r.table == RT_TABLE_MAIN or r.table >= SECONDARY_TABLE_BASE)
    }
