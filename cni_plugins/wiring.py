"""The veth/route wiring of one container, Calico's way.

Owns the kernel side of one attachment: the veth pair (host end ``tor…`` with the fixed MAC
``ee:ee:ee:ee:ee:ee`` and no address, container end ``CNI_IFNAME`` created directly in the
container's namespace), the host end's sysctls (proxy ARP / proxy NDP, forwarding), one host route
per address (route protocol 80), and inside the container the /32 and /128 addresses and the
default routes through 169.254.1.1 and the host end's link-local address.

"Host" means the namespace of the calling thread, so a lab can run all of this inside a namespace
of its own. Must not touch anything but the attachment's own links, routes and sysctls (plus
turning forwarding on in the host namespace), and keeps no state: the kernel is the record.
Imports pyroute2, so only code that does the kernel work imports this module.
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
from typing import Any

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_plugins.naming import HOST_IF_PREFIX

Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"  # the EUI-64 link-local address HOST_MAC gives the host end
ROUTE_PROTOCOL = 80  # Tortie's agent (CONTRACT, "Kernel objects")
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
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
        host = resources.enter_context(IPRoute())
        with netns(netns_path):
            container = resources.enter_context(IPRoute())  # the socket stays in the container's namespace
        ns_fd = _open_netns(netns_path)
        resources.callback(os.close, ns_fd)
        if container.link_lookup(ifname=ifname):
            raise InterfaceExists(f"the container {netns_path} already has an interface named {ifname}")
        _remove_leftover(host, host_if)

        with ExitStack() as undo:
            with _doing(f"creating the veth pair {host_if}/{ifname}"):
                try:
                    # The host end is created up; it has no carrier until the peer comes up, last.
                    host.link(
                        "add",
                        ifname=host_if,
                        kind="veth",
                        address=HOST_MAC,
                        mtu=mtu,
                        state="up",
                        peer={"ifname": ifname, "net_ns_fd": ns_fd, "mtu": mtu},
                    )
                except NetlinkError as e:
                    if e.code == errno.EEXIST:  # lost a race with another ADD of the same name
                        raise InterfaceExists(f"{host_if} or {ifname} in {netns_path} appeared meanwhile") from e
                    raise
            # Registered as soon as the veth is ours: every later step's failure removes it (and its peer).
            undo.callback(_delete_link, host, host_if)

            with _doing(f"configuring the host end {host_if}"):
                (link,) = host.link("get", ifname=host_if)
                host_index, host_mac = int(link["index"]), str(link.get("address"))
                _host_sysctls(host_if, families)

            with _doing(f"configuring {ifname} in {netns_path}"):
                (link,) = container.link("get", ifname=ifname)
                index, mac = int(link["index"]), str(link.get("address"))
                if 6 in families:
                    with netns(ns_fd):
                        _sysctl(f"ipv6/conf/{ifname}/accept_dad", "0")
                container.link("set", index=LOOPBACK_INDEX, state="up")
                container.link("set", index=index, state="up")
                for a in addresses:  # Calico's /32 and /128: everything is reached through the gateway
                    with _doing(f"adding the address {a.ip} to {ifname} in {netns_path}"):
                        flags = IFA_F_NODAD if a.version == 6 else 0
                        container.addr("add", index=index, address=str(a.ip), prefixlen=a.max_prefixlen, flags=flags)
                if 4 in families:
                    container.route("add", dst=GATEWAY_V4, dst_len=32, oif=index, scope=RT_SCOPE_LINK)
                    container.route("add", dst="0.0.0.0", dst_len=0, gateway=GATEWAY_V4, oif=index)
                if 6 in families:
                    container.route("add", family=socket.AF_INET6, dst="::", dst_len=0, gateway=GATEWAY_V6, oif=index)

            with _doing(f"adding the host routes via {host_if}"):
                for a in addresses:
                    _add_host_route(host, host_index, a)
            undo.pop_all()
        return Wired(host_if, host_mac, ifname, mac, index)


def check_free(netns_path: str, ifname: str) -> None:
    """Raise NetnsNotFound or InterfaceExists before any state is created: ADD checks this first
    so that a request it must refuse reserves nothing."""
    with netns(netns_path), IPRoute() as container:
        if container.link_lookup(ifname=ifname):
            raise InterfaceExists(f"the container {netns_path} already has an interface named {ifname}")


def teardown(host_if: str) -> bool:
    """Delete the host end (the peer and the host routes go with it); False when it was already gone."""
    with IPRoute() as host:
        return _delete_link(host, host_if)


def check(netns_path: str, ifname: str, host_if: str, addresses: list[Address]) -> list[str]:
    """The problems of one attachment, one sentence each; empty when it is healthy."""
    problems: list[str] = []
    with IPRoute() as host:
        found = host.link_lookup(ifname=host_if)
        if not found:
            problems.append(f"the host interface {host_if} is missing")
        else:
            routed = _routes(host, found[0])
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
            container = IPRoute()
    finally:
        os.close(ns_fd)
    with container:
        found = container.link_lookup(ifname=ifname)
        if not found:
            return [*problems, f"the container interface {ifname} is missing"]
        have = {(str(m.get("address")), int(m["prefixlen"])) for m in container.addr("dump", index=found[0])}
        problems += [
            f"the address {a.ip} is missing on {ifname}" for a in addresses if (str(a.ip), a.max_prefixlen) not in have
        ]
        gateways = _default_gateways(container, found[0])
        for version, gateway in ((4, GATEWAY_V4), (6, GATEWAY_V6)):
            if any(a.version == version for a in addresses) and gateway not in gateways:
                problems.append(f"the IPv{version} default route via {gateway} on {ifname} is missing")
    return problems


def list_host_ifs(prefix: str = HOST_IF_PREFIX) -> list[str]:
    """The names of the links in the current namespace that start with ``prefix`` (the host ends)."""
    with IPRoute() as host:
        names = (str(link.get("ifname")) for link in host.link("dump"))
        return sorted(name for name in names if name.startswith(prefix))


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


def _remove_leftover(host: Any, host_if: str) -> None:
    """A veth with this name is what an earlier, interrupted ADD of this attachment left; anything else is not ours."""
    try:
        (link,) = host.link("get", ifname=host_if)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return
        raise WiringError(f"looking up {host_if}: {os.strerror(e.code)}") from e
    if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "veth":
        raise InterfaceExists(f"the host interface name {host_if} is taken by a link that is not a veth")
    _delete_link(host, host_if)


def _delete_link(host: Any, name: str) -> bool:
    try:
        host.link("del", ifname=name)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise WiringError(f"deleting {name}: {os.strerror(e.code)}") from e
    return True


def _add_host_route(host: Any, index: int, a: Address) -> None:
    family, scope = (socket.AF_INET, RT_SCOPE_LINK) if a.version == 4 else (socket.AF_INET6, 0)
    try:
        host.route(
            "add", family=family, dst=str(a.ip), dst_len=a.max_prefixlen, oif=index, scope=scope, proto=ROUTE_PROTOCOL
        )
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
        # Tolerated when it is already ours (the agent may have been quicker); otherwise name the holder.
        (route,) = host.route("get", family=family, dst=str(a.ip))
        if route.get("oif") != index:
            (link,) = host.link("get", index=route.get("oif"))
            raise WiringError(f"{a.ip} is already routed to {link.get('ifname')}: run DEL for that attachment") from e


def _routes(host: Any, index: int) -> set[tuple[str, int]]:
    return {
        (str(r.get("dst")), int(r["dst_len"]))
        for family in (socket.AF_INET, socket.AF_INET6)
        for r in host.route("dump", family=family, table=RT_TABLE_MAIN)
        if r.get("oif") == index
    }


def _default_gateways(container: Any, index: int) -> set[str]:
    return {
        str(r.get("gateway"))
        for family in (socket.AF_INET, socket.AF_INET6)
        for r in container.route("dump", family=family, table=RT_TABLE_MAIN)
        if r["dst_len"] == 0 and r.get("oif") == index
    }
