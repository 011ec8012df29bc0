"""The kernel routes the route manager wants, by destination, kept from the calculation's routes
change by change.

Owns turning a desired :class:`~felix_agent.calc.model.Route` into its
:class:`~kernel.rtnl.KernelRoute` (the forms are listed in ``felix_agent.dataplane.routes``), the
choice among several routes for one destination, and the bookkeeping that makes an update cost what
changed: only the routes that came or went since the last update are converted (a new pod must not
cost a pass over the 5,000 routes of the others), and an unchanged route keeps its KernelRoute
object, by which the manager's incremental apply finds the destinations that changed. A change of
the VXLAN peers, whose VTEPs are in the kernel form of their routes, converts every one again. It
must not touch the kernel nor decide what is stale there: that is the route manager's.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping

from cni_plugins.naming import ROUTE_PROTOCOL
from felix_agent.calc.model import Route, VXLANPeer
from felix_agent.dataplane.ipip import IPIP_DEVICE
from felix_agent.dataplane.vxlan import VXLAN_DEVICE, vtep_link_local
from kernel.rtnl import KernelRoute

log = logging.getLogger(__name__)

Change = tuple[str, KernelRoute | None, KernelRoute | None]  # a destination, its wanted route before and after


def kernel_route(route: Route, peers: Mapping[str, VXLANPeer]) -> KernelRoute:
    """The kernel route for one desired route; ValueError when it cannot be made."""
    dst = str(ipaddress.ip_network(route.dst, strict=False))
    version = ipaddress.ip_network(dst).version
    gateway = str(ipaddress.ip_address(route.gateway)) if route.gateway else None
    if route.kind == "local":
        if not route.device:
            raise ValueError(f"local route {dst} has no device")
        return KernelRoute(dst, device=route.device, scope="link" if version == 4 else "universe", proto=ROUTE_PROTOCOL)
    if route.kind == "blackhole":
        return KernelRoute(dst, type="blackhole", proto=ROUTE_PROTOCOL)
    if route.kind == "vxlan":
        device = route.device or VXLAN_DEVICE
        peer = peers.get(route.node or "")
        if version == 6 and (gateway is None or ipaddress.ip_address(gateway).version == 4):
            if peer is None:
                raise ValueError(f"VXLAN route {dst}: no VTEP known for node {route.node!r}")
            return KernelRoute(dst, gateway=vtep_link_local(peer.vtep_mac), device=device, proto=ROUTE_PROTOCOL)
        gateway = gateway or (peer.vtep_ip if peer else None)
        if gateway is None:
            raise ValueError(f"VXLAN route {dst}: no gateway and no VTEP known for node {route.node!r}")
        onlink = not ipaddress.ip_address(gateway).is_link_local
        return KernelRoute(dst, gateway=gateway, device=device, onlink=onlink, proto=ROUTE_PROTOCOL)
    if route.kind == "ipip":
        if version != 4 or gateway is None:
            raise ValueError(f"IPIP route {dst}: IPIP carries IPv4 only, via the node's IPv4 address")
        return KernelRoute(dst, gateway=gateway, device=route.device or IPIP_DEVICE, onlink=True, proto=ROUTE_PROTOCOL)
    if route.kind == "direct":
        if gateway is None:
            raise ValueError(f"direct route {dst} has no gateway")
        return KernelRoute(dst, gateway=gateway, device=route.device, proto=ROUTE_PROTOCOL)
    raise ValueError(f"route {dst}: unknown kind {route.kind!r}")


def _precedence(route: Route) -> tuple[str, str, str, str]:
    """Of several routes for one destination, the first in this order is programmed."""
    return route.dst, route.kind, route.gateway or "", route.device or ""


class DesiredRoutes:
    """The kernel routes wanted (:attr:`by_dst`), as of the last :meth:`update`."""

    def __init__(self) -> None:
        self.by_dst: dict[str, KernelRoute] = {}
        self._routes: frozenset[Route] = frozenset()  # the last update's
        self._made: dict[Route, KernelRoute] = {}  # kernel_route() of each, while the peers stand
        self._asking: dict[str, dict[Route, KernelRoute]] = {}  # the routes made for each destination
        self._made_for: frozenset[VXLANPeer] | None = None
        self._peers: dict[str, VXLANPeer] = {}
        self._rejected: set[Route] = set()  # routes that cannot be made (warned about once)

    def update(self, routes: frozenset[Route], peers: frozenset[VXLANPeer], node: str = "") -> list[Change]:
        """The state now asks for ``routes`` with these VXLAN ``peers``: :attr:`by_dst` is brought up to
        date in place; returned, each destination whose wanted route may have moved (``node``: for logs)."""
        affected: set[str] = set()
        if peers != self._made_for:
            self._made_for, self._peers = peers, {p.node: p for p in peers}
            self._made, self._asking = {}, {}
            affected.update(self.by_dst)
            added: Iterable[Route] = routes
        elif routes is self._routes:
            return []
        else:
            for route in self._routes - routes:
                k = self._made.pop(route, None)
                if k is not None:
                    asking = self._asking[k.dst]
                    del asking[route]
                    if not asking:
                        del self._asking[k.dst]
                    affected.add(k.dst)
            added = routes - self._routes
        self._routes = routes
        for route in added:
            try:
                k = kernel_route(route, self._peers)
            except ValueError as e:
                if route not in self._rejected:
                    log.warning("%s: %s", node, e)
                self._rejected.add(route)
                continue
            self._made[route] = k
            self._asking.setdefault(k.dst, {})[route] = k
            affected.add(k.dst)
        if self._rejected:
            self._rejected &= routes
        changes: list[Change] = []
        for dst in affected:
            old = self.by_dst.pop(dst, None)
            candidates = self._asking.get(dst)
            new = None
            if candidates:
                new = candidates[min(candidates, key=_precedence)]
                self.by_dst[dst] = new
                if len(candidates) > 1:
                    log.warning("%s: %d routes for %s, keeping %s", node, len(candidates), dst, new)
            changes.append((dst, old, new))
        return changes
