"""What the calculation graph hands the dataplane managers: plain, immutable, comparable values.

A manager diffs the last value it applied against the new one and writes only the difference, so
every type here is frozen and hashable, and ids are stable across restarts (derived from names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PortRange = tuple[int, int]  # inclusive; a single port is (p, p)


@dataclass(frozen=True)
class RuleMatch:
    """One rule, its selectors already resolved to IP-set ids (the sets live in ``DesiredState.ipsets``)."""

    action: str  # "Allow" | "Deny" | "Log" | "Pass"
    ip_version: int | None = None  # 4, 6, or None for both
    protocol: int | None = None  # IANA number
    not_protocol: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    not_icmp_type: int | None = None
    not_icmp_code: int | None = None
    src_nets: tuple[str, ...] = ()  # CIDRs; the rule matches if the address is in any
    src_not_nets: tuple[str, ...] = ()
    dst_nets: tuple[str, ...] = ()
    dst_not_nets: tuple[str, ...] = ()
    src_sets: tuple[str, ...] = ()  # IP-set ids; the address must be in every listed set
    src_not_sets: tuple[str, ...] = ()  # ... and in none of these
    dst_sets: tuple[str, ...] = ()
    dst_not_sets: tuple[str, ...] = ()
    src_ports: tuple[PortRange, ...] = ()
    src_not_ports: tuple[PortRange, ...] = ()
    dst_ports: tuple[PortRange, ...] = ()
    dst_not_ports: tuple[PortRange, ...] = ()
    # named ports resolve to sets of "address,protocol:port" members (id in the set table)
    src_named_port_sets: tuple[str, ...] = ()
    dst_named_port_sets: tuple[str, ...] = ()
    comment: str = ""


@dataclass(frozen=True)
class Policy:
    """A policy's (or a profile's) rules per direction; ``id`` is stable: ``np/<ns>/<name>``,
    ``gnp/<name>``, ``pro/<name>``."""

    id: str
    ingress: tuple[RuleMatch, ...] = ()
    egress: tuple[RuleMatch, ...] = ()


@dataclass(frozen=True)
class IPSet:
    """``kind`` is "net" (members are addresses/CIDRs) or "named-port" (members "addr,proto:port")."""

    id: str
    version: int  # 4 or 6: one set per family
    kind: str = "net"
    members: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Endpoint:
    """A local workload endpoint and what applies to it, in evaluation order.

    For a direction, when ``*_policies`` is non-empty, traffic not allowed by them is dropped
    (Calico's default deny once any policy selects the endpoint); profiles apply after policies
    (or alone, when no policy selects the endpoint in that direction)."""

    key: str  # "<namespace>/<name>"
    interface: str  # host-side veth, "tor…"
    addresses: tuple[str, ...]  # "10.244.1.5/32", "fd00:…/128"
    ingress_policies: tuple[str, ...] = ()
    egress_policies: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    """A route this node must have. ``kind``:
    - "local": a local workload address (/32, /128) on its veth (``device``);
    - "blackhole": a block this node owns (so unused addresses of it are not routed elsewhere);
    - "vxlan": a remote block (or borrowed /32) via the remote node's VTEP address on ``vxlan.tortie``;
    - "ipip": a remote block via ``tunl0``, onlink, gateway = the remote node's underlay address;
    - "direct": a remote block via the remote node's underlay address (same subnet, no encapsulation).
    """

    dst: str
    kind: str
    gateway: str | None = None
    device: str | None = None
    node: str | None = None


@dataclass(frozen=True)
class VXLANPeer:
    node: str
    underlay_ip: str  # where to send the encapsulated packets
    vtep_ip: str  # the remote vxlan.tortie's address (an address of the remote node's first block)
    vtep_mac: str


@dataclass(frozen=True)
class WireGuardPeer:
    """A remote node that published a WireGuard key: where its tunnel listens and what it carries."""

    node: str
    public_key: str  # base64
    endpoint: str  # "underlay-ip:port"
    allowed_ips: tuple[str, ...]  # its blocks and borrowed addresses, sorted


@dataclass(frozen=True)
class WireGuard:
    """This node's WireGuard settings (FelixConfiguration, merged) and peers. Never the private key:
    the state is compared and logged; the manager holds the key."""

    enabled: bool = False
    interface: str = "wg.tortie"
    listen_port: int = 51820
    mtu: int = 0  # 0: the underlay's MTU - 60
    rule_priority: int = 99
    table: int = 1
    fwmark: int = 0x100000
    keepalive: int = 0
    peers: frozenset[WireGuardPeer] = frozenset()
    # Addresses inside a peer's allowed IPs that must not enter the tunnel: this node's own pods on
    # addresses borrowed from a peer's block, and pods of nodes without a key (Calico's throw routes).
    throw: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostEndpoint:
    """A host endpoint of this node (``interface`` a name, or "*": every non-workload interface) and
    the policies that apply to it, in evaluation order, by kind of traffic:

    - ``ingress_policies`` / ``egress_policies``: traffic to and from the host's own processes
      (every policy selecting it but preDNAT and doNotTrack ones); default deny once any applies,
      then the profiles, then drop: a host endpoint with neither denies (failsafe aside);
    - ``forward_*``: the applyOnForward ones, for traffic the host forwards; none → allowed;
    - ``pre_dnat_policies``: ingress, before DNAT; ``untracked_*``: doNotTrack, before conntrack.
      For both, traffic no rule decides goes on to the other policies."""

    key: str  # the HostEndpoint's name
    interface: str
    ingress_policies: tuple[str, ...] = ()
    egress_policies: tuple[str, ...] = ()
    forward_ingress_policies: tuple[str, ...] = ()
    forward_egress_policies: tuple[str, ...] = ()
    pre_dnat_policies: tuple[str, ...] = ()
    untracked_ingress_policies: tuple[str, ...] = ()
    untracked_egress_policies: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()

    def policy_refs(self) -> frozenset[tuple[str, str]]:
        """(policy or profile id, "in"|"out"|"in-nt"|"out-nt"): the policy chains this endpoint's chains
        jump to ("-nt": the untracked form, for doNotTrack policies)."""
        ins = (*self.ingress_policies, *self.forward_ingress_policies, *self.pre_dnat_policies, *self.profiles)
        outs = (*self.egress_policies, *self.forward_egress_policies, *self.profiles)
        return frozenset([*((p, "in") for p in ins), *((p, "out") for p in outs),
                          *((p, "in-nt") for p in self.untracked_ingress_policies),
                          *((p, "out-nt") for p in self.untracked_egress_policies)])


@dataclass(frozen=True)
class FailsafePort:
    protocol: int  # IANA number
    port: int
    net: str = ""  # the peer's network; "" for anywhere


@dataclass(frozen=True)
class HostProtection:
    """The FelixConfiguration settings for the host's own traffic (merged default and node.<name>)."""

    failsafe_inbound: tuple[FailsafePort, ...] = ()
    failsafe_outbound: tuple[FailsafePort, ...] = ()
    endpoint_to_host_action: str = "Accept"  # Drop | Accept | Return


@dataclass(frozen=True)
class DesiredState:
    """Everything this node's dataplane must hold, as computed from one consistent datastore view."""

    node: str
    endpoints: frozenset[Endpoint] = frozenset()
    policies: frozenset[Policy] = frozenset()
    ipsets: frozenset[IPSet] = frozenset()
    routes: frozenset[Route] = frozenset()
    vxlan_peers: frozenset[VXLANPeer] = frozenset()
    local_vtep: VXLANPeer | None = None  # this node's own VTEP (None when no pool uses VXLAN)
    ipip_enabled: bool = False
    nat_pools: frozenset[str] = frozenset()  # CIDRs of pools with natOutgoing
    all_pools: frozenset[str] = frozenset()  # CIDRs of every pool (NAT-outgoing exempts them)
    mtu: int | None = None  # for the CNI plugin's MTU file
    vxlan_mtu: int = 0  # FelixConfiguration vxlanMTU for vxlan.tortie; 0: the underlay's MTU - 50
    ipip_mtu: int = 0  # FelixConfiguration ipipMTU for tunl0; 0: the underlay's MTU - 20
    extra: tuple[tuple[str, str], ...] = field(default=())
    wireguard: WireGuard = WireGuard()
    host_endpoints: frozenset[HostEndpoint] = frozenset()
    host: HostProtection = HostProtection()
