"""The kernel as ``bgp.learned`` sees it: its protocol-81 routes, the prefixes other protocols
route, the connected subnets (the underlay) and what every route through one next hop shares.

``read_kernel(driver)`` builds a ``KernelView`` from a route dump; ``LearnedRoutes`` keeps it up
to date with its own writes between read-backs. The questions asked per prefix of a large table
(``in_underlay``) are answered without ``ipaddress`` for IPv4. Split out of ``bgp.learned`` (one
concept: what is there, against that module's what should be there). Must not write to the kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from bgp.model import address, ipv4_prefix, network
from kernel.rtnl import KernelRoute

BGP_PROTOCOL = 81  # CONTRACT, "Kernel objects"
KERNEL_PROTOCOL = 2  # connected subnets


@dataclass
class Connected:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    device: str
    ifindex: int | None


Hop = tuple[str, int, "Connected | None"]  # a next hop's canonical text, IP version, connected subnet


@dataclass
class KernelView:
    """What the last read-back found, updated with our own writes in between."""

    ours: dict[str, KernelRoute] = field(default_factory=dict)
    foreign: set[str] = field(default_factory=set)  # prefixes with a route of another protocol
    connected: list[Connected] = field(default_factory=list)
    # the IPv4 connected subnets as (prefix length, network address >> host bits): one shift and
    # compare per subnet and prefix
    _v4: list[tuple[int, int]] = field(default_factory=list)

    def add_connected(self, subnet: Connected) -> None:
        self.connected.append(subnet)
        net = subnet.network
        if net.version == 4:
            self._v4.append((net.prefixlen, int(net.network_address) >> (32 - net.prefixlen)))

    def in_underlay(self, prefix: str) -> bool:
        """Whether ``prefix`` lies inside a connected subnet (a peer exporting it would cut the
        node off). Asked for every prefix of a large table."""
        parsed = ipv4_prefix(prefix)
        if parsed is not None:
            value, length = parsed
            for bits, top in self._v4:  # noqa: SIM110 (no generator per prefix: asked 10,000 times)
                if length >= bits and value >> (32 - bits) == top:
                    return True
            return False
        net = network(prefix)
        return any(net.version == c.network.version and net.subnet_of(c.network)  # type: ignore[arg-type]
                   for c in self.connected)

    def hop(self, next_hop: str) -> Hop | None:
        """What every route through ``next_hop`` shares (None: it is no address)."""
        try:
            nh = address(next_hop)
        except ValueError:
            return None
        return str(nh), nh.version, next((c for c in self.connected if nh in c.network), None)


def read_kernel(routes: Iterable[KernelRoute]) -> KernelView:
    """A ``KernelView`` of the main table's routes (a driver's ``routes()``)."""
    kernel = KernelView()
    for r in routes:
        if r.proto == BGP_PROTOCOL:
            kernel.ours[r.dst] = r
            continue
        kernel.foreign.add(r.dst)
        if r.proto == KERNEL_PROTOCOL and r.gateway is None and r.device and r.type == "unicast":
            net = ipaddress.ip_network(r.dst)
            if not net.is_link_local and net.prefixlen < net.max_prefixlen:
                kernel.add_connected(Connected(net, r.device, r.ifindex))
    return kernel


def same(desired: KernelRoute, actual: KernelRoute) -> bool:
    """Whether the kernel's route is the one desired (the kernel fills in what we left open)."""
    if desired.device is None:
        actual = KernelRoute(dst=actual.dst, type=actual.type, gateway=actual.gateway, onlink=actual.onlink,
                             scope=actual.scope, proto=actual.proto, metric=actual.metric)
    elif desired.ifindex is None:
        actual = KernelRoute(dst=actual.dst, type=actual.type, gateway=actual.gateway, device=actual.device,
                             onlink=actual.onlink, scope=actual.scope, proto=actual.proto, metric=actual.metric)
    return desired == actual
