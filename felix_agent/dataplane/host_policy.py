"""The host endpoint manager: the host's own traffic, by its HostEndpoints' policies, behind failsafe rules.

Owns, in the shared ``inet tortie`` table (through the nftables driver), while this node has a host
endpoint: the base chains ``host-input`` and ``host-output`` (filter + 10: after the policy manager's
workload chains, so a workload's own policy has already spoken), ``host-forward-in`` and
``host-forward-out`` (filter + 20 and + 30: applyOnForward, the forwarded traffic's ingress and then
egress side, as the policy manager's two forward chains), ``host-prerouting`` (dstnat - 10: preDNAT,
ingress, before any DNAT) and ``host-raw-prerouting`` / ``host-raw-output`` (raw: doNotTrack, where
an Allow is ``notrack accept``); and per host endpoint its chains ``hin-``/``hout-`` (local traffic),
``hfin-``/``hfout-`` (forwarded), ``hpre-`` and ``hrawin-``/``hrawout-``. The policy and profile chains
they jump to, and the IP sets, are the policy manager's (one owner for each policy's chain).

Order inside each base chain, Calico's: loopback passes; failsafe ports pass before any policy (so
no policy can remove them), and so does the overlay between nodes (VXLAN, IPIP, WireGuard from and
to the other nodes' underlay addresses, as Felix allows them); workload interfaces (``tor*``) are
not host endpoints: traffic from a workload to the host passes (defaultEndpointToHostAction Accept;
Drop dropped it earlier) or, with Return, meets the "*" host endpoint's ingress policy; then a named
host endpoint's interface; then, for "*", every other interface. Without any host endpoint the
manager declares nothing: the host is not protected, as in Calico. Must not render policy rules
(``felix_agent.dataplane.policy`` does).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from felix_agent.calc.model import DesiredState, FailsafePort, HostEndpoint, HostProtection, Policy
from felix_agent.dataplane.nft_ruleset import Chain, Hook, Rule, Ruleset
from felix_agent.dataplane.nftables import NftTable
from felix_agent.dataplane.policy import UNTRACKED, WORKLOADS
from felix_agent.dataplane.policy_lists import EGRESS, INGRESS, render_policy_list, short_hash

log = logging.getLogger(__name__)

OWNER = "host"
LOOPBACK = '"lo"'
_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}


def host_chain(kind: str, key: str) -> str:
    return f"{kind}-{short_hash('hep/' + key)}"


def _failsafe(ports: tuple[FailsafePort, ...], inbound: bool) -> list[Rule]:
    """Inbound: the host's port, from ``net``; outbound: the remote port, to ``net``."""
    rules = []
    direction = "in" if inbound else "out"
    for p in ports:
        match = [f"meta l4proto {_PROTOCOLS.get(p.protocol, str(p.protocol))}", f"th dport {p.port}"]
        if p.net:
            ip = "ip6" if ":" in p.net else "ip"
            match.insert(0, f"{ip} {'saddr' if inbound else 'daddr'} {p.net}")
        rules.append(Rule(" ".join([*match, "accept"]), f"failsafe {direction} {p.protocol}:{p.port}"))
    return rules


def overlay_rules(state: DesiredState) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
    """Inbound and outbound accepts for the overlay between nodes (VXLAN, IPIP, WireGuard), from
    and to the other nodes' underlay addresses only: as Felix does, before any host endpoint policy,
    so that protecting a host never cuts its pods off."""
    peers: dict[str, set[str]] = {"vxlan": {p.underlay_ip for p in state.vxlan_peers},
                                  "ipip": {r.gateway for r in state.routes if r.kind == "ipip" and r.gateway},
                                  "wireguard": {p.endpoint.rpartition(":")[0].strip("[]")
                                                for p in state.wireguard.peers} if state.wireguard.enabled else set()}
    matches = {"vxlan": "udp dport 4789", "ipip": "meta l4proto 4",
               "wireguard": f"udp dport {state.wireguard.listen_port}"}
    ins: list[Rule] = []
    outs: list[Rule] = []
    for kind in ("vxlan", "ipip", "wireguard"):
        for ip, addresses in (("ip", sorted(a for a in peers[kind] if ":" not in a)),
                              ("ip6", sorted(a for a in peers[kind] if ":" in a))):
            if addresses:
                nodes = addresses[0] if len(addresses) == 1 else "{ " + ", ".join(addresses) + " }"
                ins.append(Rule(f"{ip} saddr {nodes} {matches[kind]} accept", f"{kind} from another node"))
                outs.append(Rule(f"{ip} daddr {nodes} {matches[kind]} accept", f"{kind} to another node"))
    return tuple(ins), tuple(outs)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', "") + '"'


class _Render:
    """One rendering of the host part of the table."""

    def __init__(self, heps: frozenset[HostEndpoint], host: HostProtection, known: Mapping[str, Policy],
                 overlay: tuple[tuple[Rule, ...], tuple[Rule, ...]] = ((), ())) -> None:
        ordered = sorted(heps, key=lambda h: h.key)
        named: dict[str, HostEndpoint] = {}
        for hep in ordered:
            if hep.interface != "*" and hep.interface not in named:
                named[hep.interface] = hep
            elif hep.interface != "*":
                log.warning("host endpoint %s: interface %s already has host endpoint %s; skipped",
                            hep.key, hep.interface, named[hep.interface].key)
        wild = [h for h in ordered if h.interface == "*"]
        if len(wild) > 1:
            log.warning("host endpoints %s all say interfaceName '*': only %s applies",
                        ", ".join(h.key for h in wild), wild[0].key)
        self.named = named
        self.wild = wild[0] if wild else None
        self.host = host
        self.known = known
        self.overlay = overlay
        self.chains: list[Chain] = []

    def ruleset(self) -> Ruleset:
        if not self.named and self.wild is None:
            return Ruleset()
        heps = [*self.named.values(), *([self.wild] if self.wild else [])]
        fs_in, fs_out = _failsafe(self.host.failsafe_inbound, True), _failsafe(self.host.failsafe_outbound, False)
        untracked = Rule("ct state untracked accept", "allowed by an untracked (doNotTrack) policy")
        # local traffic: every host endpoint has both chains (no policy → deny)
        for hep in heps:
            self._chain("hin", hep, INGRESS, hep.ingress_policies, hep.profiles)
            self._chain("hout", hep, EGRESS, hep.egress_policies, hep.profiles)
        from_workload = Rule(f"iifname {WORKLOADS} accept", "workload to host: its egress policy allowed it")
        if self.host.endpoint_to_host_action == "Return" and self.wild is not None:
            from_workload = Rule(f"iifname {WORKLOADS} goto {host_chain('hin', self.wild.key)}",
                                 "workload to host: defaultEndpointToHostAction Return, the '*' host endpoint decides")
        self._base("host-input", Hook("input", priority="filter + 10"), "iifname",
                   [Rule(f"iifname {LOOPBACK} accept"), untracked, *fs_in, *self.overlay[0], from_workload], "hin",
                   set(heps))
        self._base("host-output", Hook("output", priority="filter + 10"), "oifname",
                   [Rule(f"oifname {LOOPBACK} accept"), untracked, *fs_out, *self.overlay[1],
                    Rule(f"oifname {WORKLOADS} accept", "host to workload: the workload's ingress decides")],
                   "hout", set(heps))
        # forwarded traffic: only endpoints with applyOnForward policies in that direction have a chain
        fwd_in = {h for h in heps if h.forward_ingress_policies}
        fwd_out = {h for h in heps if h.forward_egress_policies}
        for hep in fwd_in:
            self._chain("hfin", hep, INGRESS, hep.forward_ingress_policies, ())
        for hep in fwd_out:
            self._chain("hfout", hep, EGRESS, hep.forward_egress_policies, ())
        if fwd_in:
            self._base("host-forward-in", Hook("forward", priority="filter + 20"), "iifname",
                       [untracked, Rule(f"iifname {WORKLOADS} accept", "from a workload: not a host endpoint")],
                       "hfin", fwd_in)
        if fwd_out:
            self._base("host-forward-out", Hook("forward", priority="filter + 30"), "oifname",
                       [untracked, Rule(f"oifname {WORKLOADS} accept", "to a workload: not a host endpoint")],
                       "hfout", fwd_out)
        # preDNAT (ingress) and doNotTrack: what no rule decides goes on to the other policies
        pre = {h for h in heps if h.pre_dnat_policies}
        for hep in pre:
            self._chain("hpre", hep, INGRESS, hep.pre_dnat_policies, (), default_deny=False)
        if pre:
            self._base("host-prerouting", Hook("prerouting", priority="dstnat - 10"), "iifname",
                       [Rule(f"iifname {LOOPBACK} accept"), *fs_in, Rule(f"iifname {WORKLOADS} accept")], "hpre", pre)
        raw_in = {h for h in heps if h.untracked_ingress_policies}
        raw_out = {h for h in heps if h.untracked_egress_policies}
        for hep in raw_in:
            self._chain("hrawin", hep, INGRESS + UNTRACKED, hep.untracked_ingress_policies, (), default_deny=False,
                        raw=True)
        for hep in raw_out:
            self._chain("hrawout", hep, EGRESS + UNTRACKED, hep.untracked_egress_policies, (), default_deny=False,
                        raw=True)
        if raw_in:
            self._base("host-raw-prerouting", Hook("prerouting", priority="raw"), "iifname",
                       [Rule(f"iifname {LOOPBACK} accept"), *fs_in, Rule(f"iifname {WORKLOADS} accept")],
                       "hrawin", raw_in)
        if raw_out:
            self._base("host-raw-output", Hook("output", priority="raw"), "oifname",
                       [Rule(f"oifname {LOOPBACK} accept"), *fs_out, Rule(f"oifname {WORKLOADS} accept")],
                       "hrawout", raw_out)
        return Ruleset(chains=tuple(self.chains))

    def _chain(self, kind: str, hep: HostEndpoint, direction: str, policies: tuple[str, ...],
               profiles: tuple[str, ...], *, default_deny: bool = True, raw: bool = False) -> None:
        end = "drop" if default_deny else None
        self.chains.append(render_policy_list(host_chain(kind, hep.key), direction, policies, profiles, self.known,
                                              conntrack=not raw, default_deny=default_deny, end=end))

    def _base(self, name: str, hook: Hook, match: str, head: list[Rule], kind: str, heps: set[HostEndpoint]) -> None:
        """A base chain: ``head``, then each named interface to its endpoint's chain, then "*"."""
        rules = list(head)
        for interface, hep in self.named.items():
            if hep in heps:
                rules.append(Rule(f"{match} {_quoted(interface)} goto {host_chain(kind, hep.key)}",
                                  f"host endpoint {hep.key}"))
            elif self.wild is not None:
                rules.append(Rule(f"{match} {_quoted(interface)} accept", f"host endpoint {hep.key}: no policy here"))
        if self.wild is not None and self.wild in heps:
            rules.append(Rule(f"goto {host_chain(kind, self.wild.key)}",
                              f"host endpoint {self.wild.key} (all interfaces)"))
        self.chains.append(Chain(name, tuple(rules), hook))


Overlay = tuple[tuple[Rule, ...], tuple[Rule, ...]]


def render(state: DesiredState, overlay: Overlay | None = None) -> Ruleset:
    """The host endpoint part of the table for ``state`` (pure: no kernel I/O); ``overlay``: the
    state's :func:`overlay_rules`, when the caller has them."""
    if not state.host_endpoints:
        return Ruleset()
    return _Render(state.host_endpoints, state.host, {p.id: p for p in state.policies},
                   overlay if overlay is not None else overlay_rules(state)).ruleset()


class HostPolicyManager:
    """``on_update`` records the host endpoints and protection settings; ``apply`` writes the difference."""

    def __init__(self, table: NftTable) -> None:
        self._table = table
        self._seen: tuple[object, ...] | None = None
        self._overlay: tuple[tuple[object, ...], Overlay] | None = None
        self._dirty = False
        table.add_owner(OWNER)

    def on_update(self, state: DesiredState) -> None:
        """Declare the host part to the driver (no kernel I/O). Declared here, not in ``apply``: the
        policy manager, applied first, then writes the policy chains and the host chains that jump
        to them in one transaction, never a host chain whose policy chain is gone or not yet there."""
        if not state.host_endpoints:
            seen: tuple[object, ...] = (state.host_endpoints,)
        else:
            inputs = (state.vxlan_peers, state.routes, state.wireguard)
            if self._overlay is None or any(a is not b for a, b in zip(self._overlay[0], inputs, strict=True)):
                self._overlay = (inputs, overlay_rules(state))  # the routes can be thousands: only when they moved
            seen = (state.host_endpoints, state.host, frozenset(p.id for p in state.policies), self._overlay[1])
        if seen != self._seen:
            self._seen, self._dirty = seen, True
            self._table.declare(OWNER, render(state, self._overlay[1] if self._overlay and state.host_endpoints
                                              else None))

    def apply(self, *, resync: bool = False) -> str:
        """Write what the policy manager's apply did not already write (the driver diffs: usually
        nothing); its resync read-back repairs this part too (one table, one read)."""
        if self._seen is None or not (self._dirty or resync):
            return ""
        self._dirty = False
        return self._table.apply()
