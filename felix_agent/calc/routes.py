"""Routes and VXLAN tunnel peers from IPAM blocks, pools and nodes (Calico's L3RouteResolver and
VXLANResolver), and the local endpoints' host routes.

Two parts, kept apart because they change at different rates: :func:`routing` derives the routes
of blocks, borrowed addresses and tunnels from the pools, nodes and blocks (a handful of changes a
day, each recomputed whole), and :class:`LocalRoutes` keeps the /32 and /128 of every local
endpoint on its veth, updated endpoint by endpoint (a new pod must not cost a pass over the 5,000
routes of the others).

For every block: a blackhole when this node owns it; otherwise a route to the owner, by the
encapsulation of the pool containing the block. For every allocation whose ``node`` attribute
names another node than the block's owner (a borrowed address): a host route to that node, which
beats the owner's block route (and, on the owner, its blackhole). Everything is derived from the
current state, so a node that disappears takes its routes and its tunnel peer with it.

Encapsulation toward a remote node, per pool: ``vxlanMode`` Always, or CrossSubnet with the node
in another subnet → ``vxlan``; else ``ipipMode`` likewise → ``ipip``; else ``direct``. IPv6
blocks cross VXLAN over the same IPv4-underlay device, through the remote VTEP's EUI-64 link-local
address (derived from its MAC), since a Node has no IPv6 VTEP address.

One owner per route: when this node runs BGP (``bgp_owns_remote``), the remote blocks outside
VXLAN come from the peers (route protocol 81, through ``tunl0`` where the pool says IPIP, installed
by ``bgp.learned``), so the ``direct`` and ``ipip`` routes are not computed for the agent to program.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from datastore import keys
from datastore.model import Resource
from datastore.resources import IPPoolSpec, Node
from felix_agent.calc.model import Route, VXLANPeer
from felix_agent.calc.snapshot import Snapshot
from ipam.block import Block

VXLAN_DEVICE = "vxlan.tortie"
IPIP_DEVICE = "tunl0"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Host:
    """What routing needs of a Node resource."""

    name: str
    ipv4: ipaddress.IPv4Interface | None
    ipv6: ipaddress.IPv6Interface | None
    vtep_ip: str | None
    vtep_mac: str | None

    @classmethod
    def of(cls, node: Resource) -> Host:
        spec = node.spec
        bgp = spec.bgp
        v4 = _interface(bgp.ipv4_address if bgp else None)
        v6 = _interface(bgp.ipv6_address if bgp else None)
        return cls(node.name, v4 if isinstance(v4, ipaddress.IPv4Interface) else None,
                   v6 if isinstance(v6, ipaddress.IPv6Interface) else None,
                   spec.ipv4_vxlan_tunnel_addr or None, spec.vxlan_tunnel_mac_addr or None)

    def vtep(self) -> VXLANPeer | None:
        """This host as a VXLAN peer, when it has everything a peer needs."""
        if self.vtep_ip and self.vtep_mac and self.ipv4:
            vtep_ip = str(ipaddress.ip_interface(self.vtep_ip).ip)
            return VXLANPeer(self.name, str(self.ipv4.ip), vtep_ip, self.vtep_mac.lower())
        return None


def _interface(value: str | None) -> Interface | None:
    return ipaddress.ip_interface(value) if value else None


def link_local(mac: str) -> str:
    """The EUI-64 IPv6 link-local address the kernel gives an interface with this MAC."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    eui = octets[:3] + [0xFF, 0xFE] + octets[3:]
    return str(ipaddress.IPv6Address(bytes([0xFE, 0x80] + [0] * 6 + eui)))


@dataclass(frozen=True)
class Routing:
    routes: frozenset[Route]
    vxlan_peers: frozenset[VXLANPeer]
    local_vtep: VXLANPeer | None
    ipip_enabled: bool


class _Pools:
    def __init__(self, pools: Iterable[Resource]) -> None:
        # most specific first, so a block in nested pools takes the innermost pool's modes
        self.pools = sorted(((ipaddress.ip_network(p.spec.cidr), p.spec) for p in pools),
                            key=lambda item: -item[0].prefixlen)

    @classmethod
    def of(cls, pools: Iterable[Resource]) -> _Pools:
        """The same, parsed again only when the pools are not the very objects of the last call
        (a snapshot shares its values and never mutates them): every claim anywhere in a BGP
        mesh asks every agent (``adds_no_route``), a pool changes once in a while."""
        held = tuple(pools)
        last = _last_pools  # one read: another thread may replace it meanwhile
        if last is not None and len(last[0]) == len(held) and all(a is b for a, b in zip(last[0], held, strict=True)):
            return last[1]
        parsed = cls(held)
        _remember_pools((held, parsed))
        return parsed

    def containing(self, cidr: Network) -> tuple[Network, IPPoolSpec | None]:
        """The innermost pool holding ``cidr`` (its network and spec), or (cidr, None)."""
        for net, spec in self.pools:
            if net.version == cidr.version and cidr.subnet_of(net):  # type: ignore[arg-type]
                return net, spec
        return cidr, None


_last_pools: tuple[tuple[Resource, ...], _Pools] | None = None


def _remember_pools(entry: tuple[tuple[Resource, ...], _Pools]) -> None:
    global _last_pools
    _last_pools = entry


BGP_OWNED_KINDS = frozenset({"direct", "ipip"})  # remote routes BGP installs when it runs


def routing(snapshot: Snapshot, node: str, *, bgp_owns_remote: bool = False) -> Routing:
    """Routes for ``node`` from the blocks, pools and nodes (not its endpoints': :class:`LocalRoutes`);
    ``bgp_owns_remote``: this node runs BGP, which installs the remote routes outside VXLAN."""
    hosts = {h.name: h for h in map(Host.of, snapshot.nodes.values())}
    me = hosts.get(node)
    pools = _Pools.of(snapshot.ippools.values())
    routes: set[Route] = set()

    used: set[Network] = set()  # pools that hold blocks
    for block in snapshot.blocks.values():
        pool_net, pool = pools.containing(block.cidr)
        used.add(pool_net)
        owner = block.node
        if owner == node:
            routes.add(Route(str(block.cidr), "blackhole", node=node))
        elif owner is not None:
            _add(routes, _remote(block.cidr, hosts.get(owner), pool, me))
        for ordinal, allocation in block.allocations.items():
            holder = allocation.attrs.get("node")
            if not holder or holder in (owner, node):
                continue  # not borrowed, or ours (its endpoint's local route covers it)
            address = block.address(ordinal)
            _add(routes, _remote(ipaddress.ip_network(address), hosts.get(holder), pool, me))

    # A disabled pool allocates nothing new, but its blocks' addresses still need their tunnel.
    active = [spec for net, spec in pools.pools if not spec.disabled or net in used]
    vxlan = any(spec.vxlan_mode != "Never" for spec in active)
    local_vtep = me.vtep() if vxlan and me is not None else None
    peers = frozenset(p for h in hosts.values() if h.name != node and (p := h.vtep()) is not None) \
        if vxlan else frozenset()
    if bgp_owns_remote:
        routes = {r for r in routes if r.kind not in BGP_OWNED_KINDS}
    return Routing(frozenset(routes), peers, local_vtep, any(spec.ipip_mode != "Never" for spec in active))


def local_routes(node: str, device: str, destinations: Iterable[str]) -> frozenset[Route]:
    """The host routes of one local endpoint: each of its addresses (``a.b.c.d/32``, ``…/128``) on its veth."""
    return frozenset(Route(dst, "local", device=device, node=node) for dst in destinations)


class LocalRoutes:
    """The local endpoints' host routes, endpoint by endpoint, and all of them as one frozenset.

    Counted, not just collected: two endpoints may ask for the very same route (one address on one
    veth, while a pod is being replaced), and the route stays while either does."""

    def __init__(self) -> None:
        self._values: frozenset[Route] = frozenset()
        self._by_key: dict[str, frozenset[Route]] = {}
        self._count: Counter[Route] = Counter()
        # Routes that entered (True) or left (False) since :attr:`values` was last made: it is made
        # once per computation, not once per endpoint (a start-up's 5,000 would copy it 5,000 times).
        self._pending: dict[Route, bool] = {}

    @property
    def values(self) -> frozenset[Route]:
        if self._pending:
            gone = [route for route, present in self._pending.items() if not present]
            came = [route for route, present in self._pending.items() if present]
            self._values, self._pending = self._values.difference(gone).union(came), {}
        return self._values

    def set(self, key: str, routes: frozenset[Route]) -> bool:
        """Endpoint ``key`` now asks for ``routes`` (empty: it went or is not local); whether
        :attr:`values` moved."""
        old = self._by_key.pop(key, frozenset())
        if routes:
            self._by_key[key] = routes
        if old == routes:
            return False
        moved = False
        for route in old - routes:
            self._count[route] -= 1
            if not self._count[route]:
                del self._count[route]
                self._pending[route], moved = False, True
        for route in routes - old:
            self._count[route] += 1
            if self._count[route] == 1:
                self._pending[route], moved = True, True
        return moved


def block_routing_key(block: Block) -> tuple[object, ...]:
    """What :func:`routing` reads of a block: its CIDR, its owner and its borrowed addresses with
    their holders. Two versions of a block with the same key give the same routes (an assignment or
    release of the owner's own addresses, the usual ADD and DEL, leaves it as it was)."""
    borrowed = frozenset((ordinal, holder) for ordinal, allocation in block.allocations.items()
                         if (holder := allocation.attrs.get("node")) and holder != block.node)
    return block.cidr, block.node, borrowed


def adds_no_route(key: tuple[object, ...] | None, snapshot: Snapshot, node: str, *,
                  bgp_owns_remote: bool = False) -> bool:
    """Whether a block whose :func:`block_routing_key` is ``key`` (None: no block) adds nothing to
    :func:`routing` for ``node`` in ``snapshot``: no route (a remote owner's block whose route BGP
    installs, or whose owner is unknown) and no pool that starts or stops counting as in use (only
    a disabled pool's use matters). Conservative: a block this node owns, or with borrowed
    addresses, adds something. A block that changes from one such key to another leaves the routing
    as it was: the agent skips the dataplane pass for it (``felix_agent.calc.moves``)."""
    if key is None:
        return True
    cidr, owner, borrowed = key
    if borrowed or owner == node or not isinstance(cidr, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return False
    _, pool = _Pools.of(snapshot.ippools.values()).containing(cidr)
    if pool is not None and pool.disabled:
        return False
    if owner is None:
        return True
    # By key, not by a walk of every Node: asked for every claim in the cluster, on every agent.
    remote_node = snapshot.nodes.get(keys.resource_key(Node.PLURAL, str(owner)))
    my_node = snapshot.nodes.get(keys.resource_key(Node.PLURAL, node))
    remote = Host.of(remote_node) if remote_node is not None and remote_node.name == owner else None
    me = Host.of(my_node) if my_node is not None and my_node.name == node else None
    route = _remote(cidr, remote, pool, me)
    return route is None or (bgp_owns_remote and route.kind in BGP_OWNED_KINDS)


def _add(routes: set[Route], route: Route | None) -> None:
    if route is not None:
        routes.add(route)


def _encapsulates(mode: str, same_subnet: bool) -> bool:
    return mode == "Always" or (mode == "CrossSubnet" and not same_subnet)


def _same_subnet(me: Host | None, remote: Host, version: int) -> bool:
    """Whether ``dst``'s family can go natively: both nodes on one subnet of THAT family. An IPv6
    block between nodes without an IPv6 underlay cannot, whatever their IPv4 addresses say."""
    if me is None:
        return False
    mine: Interface | None = me.ipv6 if version == 6 else me.ipv4
    theirs: Interface | None = remote.ipv6 if version == 6 else remote.ipv4
    return mine is not None and theirs is not None and theirs.ip in mine.network


def _remote(dst: Network, remote: Host | None, pool: IPPoolSpec | None, me: Host | None) -> Route | None:
    """The route to ``dst`` held by ``remote``; None when the node (or what the mode needs of it) is missing."""
    if remote is None:
        return None
    same = _same_subnet(me, remote, dst.version)
    if pool is not None and _encapsulates(pool.vxlan_mode, same):
        peer = remote.vtep()
        if peer is None:
            return None
        gateway = peer.vtep_ip if dst.version == 4 else link_local(peer.vtep_mac)
        return Route(str(dst), "vxlan", gateway, VXLAN_DEVICE, remote.name)
    underlay: Interface | None = remote.ipv4 if dst.version == 4 else remote.ipv6
    if underlay is None:
        return None
    if dst.version == 4 and pool is not None and _encapsulates(pool.ipip_mode, same):
        return Route(str(dst), "ipip", str(underlay.ip), IPIP_DEVICE, remote.name)
    return Route(str(dst), "direct", str(underlay.ip), None, remote.name)
