"""The speaker's desired configuration: what ``bgp.config`` derives from the datastore and
``bgp.speaker`` renders for ExaBGP and runs. Plain frozen values, compared to detect changes."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

from bgp.filters import Filter

DEFAULT_ASN = 64512
DEFAULT_PORT = 179

# Session types as `netctl node status` names them (calicoctl's words).
MESH = "node-to-node mesh"
REFLECTOR = "route reflector"  # the peer reflects for us (we are its client)
CLIENT = "rr client"  # we reflect for the peer
EXTERNAL = "global"  # an explicit BGPPeer (calicoctl says "global" or "node specific")
NODE_SPECIFIC = "node specific"


@dataclass(frozen=True)
class PeerOptions:
    """A ``BGPPeer``'s per-session options (Calico's names in the comments); the defaults are what
    a mesh session uses."""

    local_asn: int | None = None  # localASNumber: the AS we claim on this session (else the node's)
    keep_original_next_hop: bool = False  # keepOriginalNextHop
    restart_time: int | None = None  # maxRestartTime, seconds (else the speaker's graceful_restart)
    use_node_ip: bool = True  # sourceAddress: UseNodeIP (else None: the kernel picks the source)
    allowed_local_as: int = 0  # numAllowedLocalASNumbers: our AS this often in a received path is no loop
    ttl_security: int = 0  # ttlSecurity: hops to the peer (GTSM); 0: off
    password_file: str | None = None  # password.file.path: the TCP-MD5 key, read by the speaker
    filters: tuple[Filter, ...] = ()  # filters, in order


@dataclass(frozen=True)
class Peer:
    address: str  # the peer's IP (IPv4 or IPv6)
    asn: int
    kind: str  # MESH | REFLECTOR | CLIENT | EXTERNAL | NODE_SPECIFIC
    name: str = ""  # the peer node's name, or the BGPPeer resource's name
    password: str | None = None  # TCP-MD5
    port: int = DEFAULT_PORT
    passive: bool = False  # wait for the peer to connect (the higher address of a mesh pair)
    options: PeerOptions = PeerOptions()



@dataclass(frozen=True)
class SpeakerConfig:
    node: str
    router_id: str  # this node's IPv4 address
    local_address: str
    asn: int
    listen_port: int = DEFAULT_PORT
    cluster_id: str | None = None  # set when this node is a route reflector
    peers: tuple[Peer, ...] = ()
    graceful_restart: int = 120  # seconds peers keep our routes while we restart (0: off)
    hold_time: int = 9  # short by default so a dead node's routes go quickly (Calico: BIRD's 240 s)


@dataclass(frozen=True)
class Export:
    """A prefix this node announces, with itself as next hop."""

    prefix: str  # a confirmed block, a /32 (/128) of an address held in a borrowed block, a service CIDR
    next_hop: str
    communities: tuple[str, ...] = ()  # "aa:nn" and "aa:nn:mm" (large), from prefixAdvertisements


@dataclass(frozen=True)
class SessionStatus:
    peer: str
    kind: str
    state: str  # BGP's names: Idle, Connect, Active, OpenSent, OpenConfirm, Established
    since: str  # ISO time of the last state change
    info: str = ""
    filters: tuple[str, ...] = ()  # the BGPFilter names applied, in order
    received: int = 0  # prefixes the peer announces to us now
    accepted: int = 0  # of those, the ones the import filters let through
    sent: int = 0  # prefixes we announce to it now


@functools.lru_cache(maxsize=1 << 15)
def network(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``prefix`` parsed, host bits dropped. Cached: a prefix of a large table is named several
    times between ExaBGP's JSON and the kernel, and ``ipaddress`` parses at ~25 us a time."""
    return ipaddress.ip_network(prefix, strict=False)


@functools.lru_cache(maxsize=1 << 15)
def canonical(prefix: str) -> str:
    """``prefix`` in its canonical text form (as ``network`` parses it), cached likewise. An IPv4
    prefix that is canonical already (what ExaBGP writes) is recognised without ``ipaddress``:
    a table of 10,000 new prefixes cost ~0.25 s of parsing otherwise."""
    parsed = ipv4_prefix(prefix)
    if parsed is not None and parsed[0] & ~(0xFFFFFFFF << (32 - parsed[1])) == 0:
        return prefix
    return str(network(prefix))


@functools.lru_cache(maxsize=1 << 15)
def ipv4_prefix(prefix: str) -> tuple[int, int] | None:
    """A canonical-looking IPv4 prefix ``a.b.c.d/n`` (no leading zeros) as (address, length), or
    None for anything else (IPv6, odd spellings: those go through ``ipaddress``). Cached: each
    prefix of a large table is asked about by ``canonical``, the underlay check and the pools."""
    if _IPV4_PREFIX.fullmatch(prefix) is None:
        return None
    text, _, length = prefix.partition("/")
    return int.from_bytes(socket.inet_aton(text)), int(length)


def ipv4_within(parsed: tuple[int, int], net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Whether the prefix ``ipv4_prefix`` gave is inside ``net``."""
    value, length = parsed
    bits = net.prefixlen
    return net.version == 4 and length >= bits and value >> (32 - bits) == int(net.network_address) >> (32 - bits)


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_PREFIX = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}/(?:3[0-2]|[12]?[0-9])", re.ASCII)


@functools.lru_cache(maxsize=1 << 10)
def address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address (next hops: a few, named by every route)."""
    return ipaddress.ip_address(text)
