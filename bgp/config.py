"""What one node's BGP speaker should do, derived from the datastore: its sessions and its routes.

Pure functions of the agent's view of the datastore (a ``felix_agent.calc.snapshot.Snapshot``, or
anything with the same tables): no I/O, no ExaBGP. :func:`speaker_config` follows Calico's
``confd`` (``bgp_processor.go``, ``client.go``):

- AS number: the node's ``spec.bgp.asNumber``, else the ``default`` BGPConfiguration's, else 64512.
- Full mesh among the nodes with an IPv4 address while ``nodeToNodeMeshEnabled`` is not false;
  route reflectors (nodes with ``routeReflectorClusterID``) are never in the mesh.
- A ``BGPPeer`` applies to the node it names, to the nodes its ``nodeSelector`` selects, or to
  every node when it has neither. It peers with ``peerIP`` or with every node ``peerSelector``
  selects (except the node itself). Peerings between nodes are symmetric: a node on the remote
  side of a BGPPeer gets the reverse session (Calico's "reverse peerings").
- Session kinds: on a reflector, an iBGP peer is a CLIENT unless it is a reflector of the same
  cluster (then REFLECTOR: a fellow reflector, not a client, so client routes are not bounced
  between the two); on another node, an iBGP session to a reflector is REFLECTOR; anything else
  is EXTERNAL (a BGPPeer for every node, calicoctl's "global") or NODE_SPECIFIC.
- One session per peer address; the first source wins: mesh, BGPPeers for every node, BGPPeers
  for some nodes, reverse peerings (each in name order).
- Between two nodes the one with the higher address is passive, so only one side connects.
- A BGPPeer's per-session options (``localASNumber``, ``maxRestartTime``, ``filters``, ...) go
  with the sessions it makes (``PeerOptions``); mesh sessions and reverse peerings have none but
  the password. ``filters`` naming no existing BGPFilter are skipped (``netctl`` refuses them).

:func:`exports` adds what ``BGPConfiguration`` asks every node to announce: the service CIDRs
(``serviceClusterIPs``, ``serviceExternalIPs``, ``serviceLoadBalancerIPs``), and the communities
of ``prefixAdvertisements`` on the routes inside each CIDR.

IPv6 sessions are not made yet: ``SpeakerConfig`` has a single (IPv4) local address.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from bgp.filters import Filter, compile_filter
from bgp.model import (
    CLIENT,
    DEFAULT_ASN,
    DEFAULT_PORT,
    EXTERNAL,
    MESH,
    NODE_SPECIFIC,
    REFLECTOR,
    Export,
    Peer,
    PeerOptions,
    SpeakerConfig,
    network,
)
from datastore import keys, selector
from datastore.bgp import DEFAULT_CONFIGURATION, BGPConfiguration, BGPConfigurationSpec, BGPPeer, BGPPeerSpec
from datastore.bgp_filter import BGPFilter
from datastore.model import Resource
from ipam.block import Block

log = logging.getLogger(__name__)

NO_OPTIONS = PeerOptions()  # mesh sessions

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address


class AffinityLike(Protocol):
    @property
    def state(self) -> str: ...


class Source(Protocol):
    """What is read: a ``Snapshot``'s typed views, and its raw tables for the BGP kinds
    (held under ``BGPConfiguration.KIND`` and ``BGPPeer.KIND``)."""

    @property
    def nodes(self) -> Mapping[str, Resource]: ...

    @property
    def ippools(self) -> Mapping[str, Resource]: ...

    @property
    def blocks(self) -> Mapping[str, Block]: ...

    @property
    def affinities(self) -> Mapping[str, AffinityLike]: ...

    @property
    def tables(self) -> Mapping[str, Mapping[str, Any]]: ...


@dataclass(frozen=True)
class BGPNode:
    """A node as BGP sees it; ``asn`` is already resolved (own, else global)."""

    name: str
    labels: Mapping[str, str]
    ipv4: IPv4 | None
    ipv6: IPv6 | None
    asn: int
    cluster_id: str | None

    @property
    def is_reflector(self) -> bool:
        return self.cluster_id is not None


@dataclass(frozen=True)
class GlobalSettings:
    asn: int = DEFAULT_ASN
    mesh: bool = True
    port: int = DEFAULT_PORT
    services: tuple[str, ...] = ()  # service CIDRs every node announces
    communities: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (cidr, community values), in order


def global_settings(source: Source) -> GlobalSettings:
    for r in source.tables.get(BGPConfiguration.KIND, {}).values():
        if r.name == DEFAULT_CONFIGURATION:
            spec: BGPConfigurationSpec = r.spec
            return GlobalSettings(spec.asn or DEFAULT_ASN, spec.node_to_node_mesh_enabled, spec.listen_port,
                                  tuple(spec.service_cidrs()),
                                  tuple((cidr, tuple(values)) for cidr, values in spec.advertised_communities()))
    return GlobalSettings()


def _filters(source: Source) -> dict[str, Filter]:
    return {r.name: compile_filter(r.name, r.spec) for r in source.tables.get(BGPFilter.KIND, {}).values()}


def peer_options(resource: Resource, filters: Mapping[str, Filter]) -> PeerOptions:
    """The session options a BGPPeer gives the sessions it makes."""
    spec: BGPPeerSpec = resource.spec
    missing = [name for name in spec.filters if name not in filters]
    if missing:
        log.warning("BGPPeer %s: filter(s) %s do not exist; skipped", resource.name, ", ".join(missing))
    return PeerOptions(
        local_asn=spec.local_asn, keep_original_next_hop=spec.keep_original_next_hop,
        restart_time=spec.restart_seconds, use_node_ip=spec.source_address != "None",
        allowed_local_as=spec.num_allowed_local_as_numbers or 0, ttl_security=spec.ttl_security or 0,
        password_file=spec.password_path, filters=tuple(filters[n] for n in spec.filters if n in filters))


def bgp_nodes(source: Source, default_asn: int = DEFAULT_ASN, only: str | None = None) -> dict[str, BGPNode]:
    """Every node, or the one named ``only`` (exports need just their own: they run on every
    agent for every block change, and parsing each node's addresses was most of their cost)."""
    nodes: dict[str, BGPNode] = {}
    for r in source.nodes.values():
        if only is not None and r.name != only:
            continue
        bgp = r.spec.bgp
        ipv4 = ipv6 = None
        asn, cluster_id = default_asn, None
        if bgp is not None:
            ipv4 = ipaddress.IPv4Interface(bgp.ipv4_address).ip if bgp.ipv4_address else None
            ipv6 = ipaddress.IPv6Interface(bgp.ipv6_address).ip if bgp.ipv6_address else None
            asn = bgp.as_number or default_asn
            cluster_id = bgp.route_reflector_cluster_id
        nodes[r.name] = BGPNode(r.name, dict(r.metadata.labels), ipv4, ipv6, asn, cluster_id)
    return nodes


def _peers(source: Source) -> list[Resource]:
    """BGPPeers in the order Calico emits them: for every node first, then per node; by name."""
    peers = source.tables.get(BGPPeer.KIND, {}).values()
    return sorted(peers, key=lambda r: (not r.spec.is_global, r.name))


def _local_side(spec: BGPPeerSpec, nodes: Mapping[str, BGPNode]) -> list[BGPNode]:
    """The nodes a BGPPeer applies to (``node``, ``nodeSelector``, or all)."""
    if spec.node:
        return [nodes[spec.node]] if spec.node in nodes else []
    return _selected(spec.node_selector or "all()", nodes)


def _selected(text: str, nodes: Mapping[str, BGPNode]) -> list[BGPNode]:
    sel = selector.parse(text)
    return [n for _, n in sorted(nodes.items()) if sel.matches(n.labels)]


def _node_at(address: ipaddress.IPv4Address | ipaddress.IPv6Address, asn: int | None,
             nodes: Mapping[str, BGPNode]) -> BGPNode | None:
    """The node that a ``peerIP`` + ``asNumber`` designates, if it is one of ours."""
    return next((n for _, n in sorted(nodes.items()) if address in (n.ipv4, n.ipv6) and n.asn == asn), None)


def _kind(me: BGPNode, other: BGPNode | None, asn: int, origin: str) -> str:
    if asn != me.asn:
        return origin  # eBGP: no reflection either way
    if me.is_reflector:
        return REFLECTOR if other is not None and other.cluster_id == me.cluster_id else CLIENT
    if other is not None and other.is_reflector:
        return REFLECTOR
    return origin


class _Sessions:
    """Peers by address; the first one added for an address wins."""

    def __init__(self, me: BGPNode, settings: GlobalSettings) -> None:
        assert me.ipv4 is not None
        self.me, self.address, self.settings = me, me.ipv4, settings
        self.peers: dict[str, Peer] = {}

    def add_node(self, other: BGPNode, origin: str, options: PeerOptions = NO_OPTIONS) -> None:
        if other.name == self.me.name or other.ipv4 is None or other.ipv4 == self.address:
            return
        self._add(Peer(str(other.ipv4), other.asn, _kind(self.me, other, other.asn, origin), other.name,
                       None, self.settings.port, passive=self.address > other.ipv4, options=options))

    def add_address(self, resource: Resource, origin: str, nodes: Mapping[str, BGPNode],
                    options: PeerOptions) -> None:
        spec: BGPPeerSpec = resource.spec
        target = spec.address()
        assert target is not None and spec.asn is not None
        address, port = target
        if address.version == 6:
            log.debug("BGPPeer %s: IPv6 peer %s skipped (no IPv6 sessions yet)", resource.name, address)
            return
        if address == self.address:
            return
        node = _node_at(address, spec.asn, nodes)
        if node is not None and port in (None, self.settings.port):
            # A BGPPeer naming one of our nodes by address: a session between two nodes.
            self.add_node(node, origin, options)
            return
        self._add(Peer(str(address), spec.asn, _kind(self.me, None, spec.asn, origin), resource.name,
                       None, port or DEFAULT_PORT, options=options))

    def _add(self, peer: Peer) -> None:
        self.peers.setdefault(peer.address, peer)

    def sorted(self) -> tuple[Peer, ...]:
        return tuple(sorted(self.peers.values(), key=lambda p: (ipaddress.ip_address(p.address), p.port)))


def speaker_config(source: Source, node: str) -> SpeakerConfig | None:
    """The speaker configuration of ``node``; None when it has no IPv4 address (no speaker)."""
    settings = global_settings(source)
    nodes = bgp_nodes(source, settings.asn)
    me = nodes.get(node)
    if me is None or me.ipv4 is None:
        return None
    sessions = _Sessions(me, settings)

    if settings.mesh and not me.is_reflector:
        for _, other in sorted(nodes.items()):
            if not other.is_reflector:
                sessions.add_node(other, MESH)

    peers = _peers(source)
    filters = _filters(source)
    for r in peers:  # forward peerings: the BGPPeers that apply to this node
        spec: BGPPeerSpec = r.spec
        if me not in _local_side(spec, nodes):
            continue
        origin = EXTERNAL if spec.is_global else NODE_SPECIFIC
        options = peer_options(r, filters)
        if spec.peer_selector:
            for other in _selected(spec.peer_selector, nodes):
                sessions.add_node(other, origin, options)
        else:
            sessions.add_address(r, origin, nodes, options)

    for r in peers:  # reverse peerings: BGPPeers whose remote side is this node
        spec = r.spec
        if spec.peer_selector:
            remote = me in _selected(spec.peer_selector, nodes)
        else:
            address, port = spec.address() or (None, None)
            remote = _node_at(address, spec.asn, nodes) == me if address is not None else False
            remote = remote and port in (None, settings.port)
        if remote:
            for other in _local_side(spec, nodes):
                sessions.add_node(other, NODE_SPECIFIC, PeerOptions(password_file=spec.password_path))

    return SpeakerConfig(node=me.name, router_id=str(me.ipv4), local_address=str(me.ipv4), asn=me.asn,
                         listen_port=settings.port, cluster_id=me.cluster_id, peers=sessions.sorted())


# ---- routes ----------------------------------------------------------------------------------------


def _silent_pools(source: Source) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The pools whose addresses must not be announced (``disableBGPExport``)."""
    return [r.spec.network() for r in source.ippools.values() if r.spec.disable_bgp_export]


def exports(source: Source, node: str) -> frozenset[Export]:
    """What ``node`` announces: each block affine to it (with a confirmed affinity), and a host
    route for each address it holds in another node's block (or in a block no node owns).

    The next hop is the node's IPv4 address, or its IPv6 address for IPv6 prefixes; IPv6 prefixes
    are left out when the node has no IPv6 address. Pools with ``disableBGPExport`` are left out.
    """
    me = bgp_nodes(source, only=node).get(node)
    if me is None or me.ipv4 is None:
        return frozenset()
    hops: dict[int, str | None] = {4: str(me.ipv4), 6: str(me.ipv6) if me.ipv6 else None}
    silent = _silent_pools(source)
    out: set[Export] = set()
    skipped = 0
    for block in source.blocks.values():
        if any(block.cidr.version == p.version and block.cidr.subnet_of(p) for p in silent):  # type: ignore[arg-type]
            continue
        prefixes: Iterable[str]
        if block.node == node:
            affinity = source.affinities.get(keys.affinity_key(node, block.cidr))
            prefixes = [str(block.cidr)] if affinity is None or affinity.state == "confirmed" else []
        else:
            prefixes = [f"{block.address(o)}/{block.cidr.max_prefixlen}"
                        for o, a in sorted(block.allocations.items()) if a.attrs.get("node") == node]
        hop = hops[block.cidr.version]
        for prefix in prefixes:
            if hop is None:
                skipped += 1
            else:
                out.add(Export(prefix, hop))
    settings = global_settings(source)
    for cidr in settings.services:
        hop = hops[network(cidr).version]
        if hop is None:
            skipped += 1
        else:
            out.add(Export(cidr, hop))
    if skipped:
        log.debug("node %s has no IPv6 address: %d IPv6 prefix(es) not announced", node, skipped)
    if settings.communities:
        return frozenset(_with_communities(e, settings.communities) for e in out)
    return frozenset(out)


def _with_communities(export: Export, advertised: Iterable[tuple[str, tuple[str, ...]]]) -> Export:
    prefix = network(export.prefix)
    values: list[str] = []
    for cidr, communities in advertised:
        net = network(cidr)
        if net.version == prefix.version and prefix.subnet_of(net):  # type: ignore[arg-type]
            values += [c for c in communities if c not in values]
    return Export(export.prefix, export.next_hop, tuple(values)) if values else export
