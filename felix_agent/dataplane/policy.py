"""The policy manager: local endpoints' policies and profiles, rendered into the ``inet tortie`` table.

Owns, in the shared table (through the nftables driver): the base chains ``forward`` (workload
egress, priority filter), ``forward-to-wl`` (workload ingress, filter + 10) and ``input``
(workload → host runs the endpoint's egress); the verdict maps ``from-wl`` / ``to-wl`` keyed by
interface name, each element a ``goto`` to the chain of the endpoint's policy list, ``to-<h>``
(ingress) / ``from-<h>`` (egress), one per distinct list and shared by the endpoints that have it
(``felix_agent.dataplane.policy_lists``); per policy or profile and direction ``pol-<h>-in|out`` /
``pro-<h>-in|out``; the IP sets ``s-<id>-v4|v6`` and named-port sets ``np-<id>-v4|v6``. A new
endpoint is two map elements, and a chain only when its list is new; a label change is set
elements only. Chains and sets no endpoint uses any more stay a while (``linger``, the agent's
``--policy-linger``; ``felix_agent.dataplane.linger``), so that the next pod of a list or profile is
elements only too.

Why two forward chains: ``accept`` ends a packet's walk through one base chain only, so a policy's
Allow can be a plain ``accept`` and the destination's ingress still runs in the later chain.
Only traffic on ``tor*`` interfaces is looked at; everything else on the host passes untouched.
It also renders the policy chains host endpoints use (their endpoint chains are
``felix_agent.dataplane.host_policy``'s) and the ``input-wl-to-host`` chain of
defaultEndpointToHostAction.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from felix_agent.calc.model import DesiredState, Endpoint, HostEndpoint, IPSet, Policy, RuleMatch
from felix_agent.dataplane.endpoint_chains import EndpointChains, EndpointPart
from felix_agent.dataplane.linger import Alarm, ChainLinger, Linger
from felix_agent.dataplane.nft_ruleset import (
    Chain,
    ChainDelta,
    Hook,
    Rule,
    Ruleset,
    Set,
    address_elements,
)
from felix_agent.dataplane.nftables import NftTable
from felix_agent.dataplane.policy_lists import INGRESS, PASS_MARK, policy_chain, short_hash

log = logging.getLogger(__name__)

OWNER = "policy"
READ_TRIES = 3  # background read-backs of a resync overtaken by a write before one blocks the loop
UNTRACKED = "-nt"  # suffix of a direction whose policy chains are the untracked (doNotTrack) form
WORKLOADS = '"tor*"'
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp", 136: "udplite"}
PORT_PROTOCOLS = "{ tcp, udp, sctp, udplite }"  # ports mean nothing to other protocols
NAMED_NETS_ABOVE = 16  # longer net lists go to a named set instead of an anonymous one
NDP_TYPES = "{ 130, 131, 132, 133, 135, 136 }"  # MLD and neighbour discovery, as Felix allows them to the host
FAMILY_PIECES = ("ip ", "ip6 ", "icmp ", "icmpv6 ")  # matches that already pin the address family


@dataclass(frozen=True)
class _Family:
    ip: str  # the payload expression: "ip" / "ip6"
    icmp: str
    nfproto: str
    addr_type: str


FAMILIES = {
    4: _Family("ip", "icmp", "ipv4", "ipv4_addr"),
    6: _Family("ip6", "icmpv6", "ipv6", "ipv6_addr"),
}


def set_name(set_id: str, version: int, named_port: bool = False) -> str:
    # nft's grammar takes letters, digits, '_', '.' and '-' in a set name (a ':' breaks the parser).
    safe = set_id.replace(":", "_")
    safe = safe if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", safe) else short_hash(set_id)
    return f"{'np' if named_port else 's'}-{safe}-v{version}"


def _choice(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _ports(ports: Iterable[tuple[int, int]]) -> str:
    return _choice([str(a) if a == b else f"{a}-{b}" for a, b in sorted(ports)])


def _protocol(number: int) -> str:
    return PROTOCOLS.get(number, str(number))


def _verdict(action: str, log_prefix: str, allow: str = "accept") -> str:
    if action == "Allow":
        return allow
    if action == "Deny":
        return "drop"
    if action == "Log":
        return f'log prefix "{log_prefix[:120]}: "'
    if action == "Pass":
        return f"meta mark set meta mark | {PASS_MARK:#010x} return"
    raise ValueError(f"unknown rule action {action!r}")


def rule_families(rule: RuleMatch) -> list[int]:
    """The IP versions a rule can match: an address list of one family restricts it to that family."""
    versions = {4, 6} if rule.ip_version is None else {rule.ip_version}
    if rule.protocol == 1:
        versions &= {4}
    elif rule.protocol == 58:
        versions &= {6}
    for nets in (rule.src_nets, rule.dst_nets):
        if nets:
            versions &= {ipaddress.ip_network(n, strict=False).version for n in nets}
    return sorted(versions)


def render_rule(rule: RuleMatch, log_prefix: str = "tortie", allow: str = "accept") -> tuple[list[Rule], list[Set]]:
    """One Calico rule as nft rules (one per family where addresses differ, one per named-port
    alternative) and the named sets they use (selector sets empty: their members come from the IP sets).
    ``allow`` is what Allow does (an untracked policy's Allow also says ``notrack``)."""
    verdict = _verdict(rule.action, log_prefix, allow)
    sets: list[Set] = []
    bodies: dict[int, list[list[str]]] = {}
    for version in rule_families(rule):
        fam = FAMILIES[version]
        match: list[str] = []
        if rule.protocol is not None:
            match.append(f"meta l4proto {_protocol(rule.protocol)}")
        if rule.not_protocol is not None:
            match.append(f"meta l4proto != {_protocol(rule.not_protocol)}")
        for side, nets, not_nets, in_sets, not_sets in (
            ("saddr", rule.src_nets, rule.src_not_nets, rule.src_sets, rule.src_not_sets),
            ("daddr", rule.dst_nets, rule.dst_not_nets, rule.dst_sets, rule.dst_not_sets),
        ):
            for op, listed in (("", nets), ("!= ", not_nets)):
                mine = address_elements(listed, version)
                if len(mine) > NAMED_NETS_ABOVE:
                    name = f"n-{short_hash(' '.join(mine))}-v{version}"
                    sets.append(Set(name, fam.addr_type, ("interval",), frozenset(mine)))
                    match.append(f"{fam.ip} {side} {op}@{name}")
                elif mine:
                    match.append(f"{fam.ip} {side} {op}{_choice(mine)}")
            for op, ids in (("", in_sets), ("!= ", not_sets)):
                for set_id in ids:
                    sets.append(Set(set_name(set_id, version), fam.addr_type, ("interval",)))
                    match.append(f"{fam.ip} {side} {op}@{sets[-1].name}")
        if rule.protocol is None and (rule.src_ports or rule.src_not_ports or rule.dst_ports or rule.dst_not_ports):
            match.append(f"meta l4proto {PORT_PROTOCOLS}")
        alternatives: list[list[str]] = []
        for side, ports, not_ports, named_ports in (
            ("sport", rule.src_ports, rule.src_not_ports, rule.src_named_port_sets),
            ("dport", rule.dst_ports, rule.dst_not_ports, rule.dst_named_port_sets),
        ):
            if not_ports:
                match.append(f"th {side} != {_ports(not_ports)}")
            options = [f"th {side} {_ports(ports)}"] if ports else []
            for set_id in named_ports:  # a named port is an alternative to the numeric ports, not an extra condition
                np = Set(set_name(set_id, version, True), f"{fam.addr_type} . inet_proto . inet_service")
                sets.append(np)
                options.append(f"{fam.ip} {side[0]}addr . meta l4proto . th {side} @{np.name}")
            alternatives.append(options or [""])
        icmp = fam.icmp
        if rule.icmp_type is not None:
            match.append(f"{icmp} type {rule.icmp_type}")
            if rule.icmp_code is not None:
                match.append(f"{icmp} code {rule.icmp_code}")
        if rule.not_icmp_type is not None:
            if rule.not_icmp_code is None:
                match.append(f"{icmp} type != {rule.not_icmp_type}")
            else:
                match.append(f"{icmp} type . {icmp} code != {{ {rule.not_icmp_type} . {rule.not_icmp_code} }}")
        bodies[version] = [
            [p for p in (*match, src, dst, verdict) if p] for src in alternatives[0] for dst in alternatives[1]
        ]
    if len(bodies) == 2 and bodies[4] == bodies[6]:
        bodies = {0: bodies[4]}  # nothing family-specific: one rule serves both families
    rules: list[Rule] = []
    for version, texts in bodies.items():
        for pieces in texts:
            if version and not any(p.startswith(FAMILY_PIECES) for p in pieces):
                pieces = [f"meta nfproto {FAMILIES[version].nfproto}", *pieces]
            rules.append(Rule(" ".join(pieces), rule.comment))
    return rules, sets


def render_policy(policy: Policy, direction: str) -> tuple[Chain, list[Set]]:
    """A policy's (or profile's) chain for one direction; it ends by returning to the endpoint chain.
    ``direction`` "in-nt" / "out-nt" is the untracked (doNotTrack) form: its Allow is ``notrack accept``."""
    rules: list[Rule] = []
    sets: list[Set] = []
    prefix = re.sub(r"[^A-Za-z0-9/._: -]", "_", f"tortie {policy.id} {direction}")
    allow = "notrack accept" if direction.endswith(UNTRACKED) else "accept"
    for rule in policy.ingress if direction.startswith(INGRESS) else policy.egress:
        more_rules, more_sets = render_rule(rule, prefix, allow)
        rules += more_rules
        sets += more_sets
    return Chain(policy_chain(policy.id, direction), tuple(rules)), sets


def render_ipset(ipset: IPSet) -> Set:
    fam = FAMILIES[ipset.version]
    if ipset.kind != "named-port" and ipset.version == 4 and all("/" not in m and ":" not in m
                                                                 for m in ipset.members):
        # IPv4 hosts only (nearly every selector set): the calculation graph writes them as nft prints
        # them and distinct hosts never overlap, so the members are the elements; no parsing per member.
        return Set(set_name(ipset.id, ipset.version), fam.addr_type, ("interval",), ipset.members)
    if ipset.kind == "named-port":
        members = frozenset(filter(None, (_named_port(m, ipset.version) for m in ipset.members)))
        return Set(set_name(ipset.id, ipset.version, True), f"{fam.addr_type} . inet_proto . inet_service", (), members)
    return Set(
        set_name(ipset.id, ipset.version),
        fam.addr_type,
        ("interval",),
        frozenset(address_elements(ipset.members, ipset.version)),
    )


def _named_port(member: str, version: int) -> str | None:
    """``10.0.0.5,tcp:8080`` → ``10.0.0.5 . tcp . 8080`` (None for a member of the other family)."""
    address, _, rest = member.partition(",")
    protocol, _, port = rest.partition(":")
    ip = ipaddress.ip_interface(address).ip
    if ip.version != version:
        return None
    name = protocol.lower()
    return f"{ip} . {_protocol(int(name)) if name.isdigit() else name} . {int(port)}"


BASE_CHAINS = (
    Chain(
        "forward",
        (
            Rule(f"iifname {WORKLOADS} iifname vmap @from-wl", "from a workload: its egress policy"),
            Rule(f"iifname {WORKLOADS} drop", "unknown workload interface"),
        ),
        Hook("forward"),
    ),
    Chain(
        "forward-to-wl",
        (
            Rule(f"oifname {WORKLOADS} oifname vmap @to-wl", "to a workload: its ingress policy"),
            Rule(f"oifname {WORKLOADS} drop", "unknown workload interface"),
        ),
        Hook("forward", priority="filter + 10"),
    ),
    Chain(
        "input",
        (
            Rule(f"iifname {WORKLOADS} icmpv6 type {NDP_TYPES} accept", "neighbour discovery to the host"),
            Rule(f"iifname {WORKLOADS} iifname vmap @from-wl", "workload to host: its egress policy"),
            Rule(f"iifname {WORKLOADS} drop", "unknown workload interface"),
        ),
        Hook("input"),
    ),
)


WL_TO_HOST = "input-wl-to-host"


@functools.cache  # three actions; a render miss (a new pod) then hands on the very chain of last time
def endpoint_to_host_chain(action: str) -> Chain:
    """defaultEndpointToHostAction, after the workload's egress policy allowed a packet to the host: in
    a base chain of its own, since the egress chain's ``accept`` ends only its base chain. Accept and
    Return add nothing here: the host endpoint manager's input chain, later on the hook, lets
    workload traffic through (Accept) or hands it to the "*" host endpoint's policy (Return)."""
    rules: tuple[Rule, ...] = ()
    if action == "Drop":
        rules = (Rule(f"iifname {WORKLOADS} icmpv6 type {NDP_TYPES} accept", "neighbour discovery to the host"),
                 Rule(f"iifname {WORKLOADS} drop", "defaultEndpointToHostAction Drop"))
    return Chain(WL_TO_HOST, rules, Hook("input", priority="filter + 5"))


def host_policy_refs(host_endpoints: frozenset[HostEndpoint],
                     known: Mapping[str, Policy]) -> frozenset[tuple[str, str]]:
    """The policy chains (id, direction) the host endpoints' chains jump to."""
    return frozenset(ref for hep in host_endpoints for ref in hep.policy_refs() if ref[0] in known)


class _Renderer:
    """``render`` with memory: unchanged endpoints, policies and IP sets reuse the objects rendered
    last time; when only IP sets changed (a label change) the chains and maps are handed on as the
    very tuples of last time, so the driver skips them without looking inside; when a few endpoints
    changed (a new pod) the endpoint half is updated from them alone (``EndpointChains``) and the
    ruleset says which chains changed (``Ruleset.delta``), so the driver diffs only those."""

    def __init__(self, linger: Linger[Policy] | None = None, list_linger: ChainLinger | None = None) -> None:
        self._linger: Linger[Policy] = linger if linger is not None else Linger(0.0)
        self._list_linger = list_linger if list_linger is not None else ChainLinger(0.0)
        self._lingering: dict[str, Chain] = {}  # list chains kept in the last render
        self._endpoint_half = EndpointChains()
        self._part: EndpointPart | None = None
        self._policies: dict[tuple[Policy, str], tuple[Chain, list[Set]]] = {}
        # the policy chains as last rendered: for (wanted, policies), the chains by name and their sets
        self._policy_part: tuple[frozenset[tuple[str, str]], frozenset[Policy], dict[str, Chain],
                                 dict[str, Set]] | None = None
        self._ipsets: dict[IPSet, Set] = {}
        self._chains: tuple[frozenset[Endpoint], frozenset[Policy], tuple[Chain, ...], dict[str, Set],
                            ChainDelta | None, frozenset[HostEndpoint], str] | None = None
        self._sets: tuple[frozenset[IPSet], dict[str, Set], tuple[Set, ...]] | None = None

    def render(self, state: DesiredState) -> Ruleset:
        known = {p.id: p for p in state.policies}
        action = state.host.endpoint_to_host_action
        last = self._chains
        if (last is not None and self._part is not None and last[0] is state.endpoints and last[1] is state.policies
                and last[5] is state.host_endpoints and last[6] == action and not self._linger.expired()
                and not self._list_linger.expired()):
            chains, rule_sets, delta = last[2], last[3], last[4]
            part = self._part
        else:
            part = self._part = self._endpoint_half.update(state.endpoints, known)
            now = self._linger.clock()  # one reading for both lingers: see ChainLinger
            lingering, lingered = self._list_linger.keep(part.chains, now), self._lingering
            self._lingering = lingering
            wanted = part.wanted | host_policy_refs(state.host_endpoints, known)
            if kept := self._linger.keep(wanted, known, now):  # chains unused a moment ago stay a while
                wanted |= kept.keys()
                known = {**{pid: policy for (pid, _), policy in kept.items()}, **known}
            before = self._policy_part
            if before is not None and before[0] == wanted and before[1] is state.policies:
                policy_chains, rule_sets = before[2], before[3]
            else:
                policy_chains, rule_sets = self._policy_chains(wanted, known)
                self._policy_part = (wanted, state.policies, policy_chains, rule_sets)
            chains = (*BASE_CHAINS, endpoint_to_host_chain(action), *part.chains, *lingering.values(),
                      *policy_chains.values())
            delta = None
            # Only endpoint and policy chains moved (the workload-to-host chain did not): say which.
            if part.upserted is not None and last is not None and before is not None and last[6] == action:
                old = before[2]
                changed = tuple(c for name, c in policy_chains.items() if old.get(name) is not c)
                # a list chain that began to linger stays as it was; one whose linger ended goes
                expired = frozenset(lingered.keys() - lingering.keys() - frozenset(c.name for c in part.upserted))
                delta = ChainDelta(last[2], part.upserted + changed, (part.removed - lingering.keys()) | expired
                                   | (old.keys() - policy_chains.keys()))
            self._chains = (state.endpoints, state.policies, chains, rule_sets, delta, state.host_endpoints, action)
        if self._sets is None or self._sets[0] is not state.ipsets or self._sets[1] is not rule_sets:
            self._ipsets = {ipset: self._ipsets.get(ipset) or render_ipset(ipset) for ipset in state.ipsets}
            sets = dict(rule_sets)
            sets.update((s.name, s) for s in self._ipsets.values())
            self._sets = (state.ipsets, rule_sets, tuple(sets[name] for name in sorted(sets)))
        return Ruleset(chains, self._sets[2], part.maps, delta)

    def _policy_chains(self, wanted: frozenset[tuple[str, str]],
                       known: Mapping[str, Policy]) -> tuple[dict[str, Chain], dict[str, Set]]:
        chains: dict[str, Chain] = {}
        rule_sets: dict[str, Set] = {}
        policies: dict[tuple[Policy, str], tuple[Chain, list[Set]]] = {}
        for pid, direction in sorted(wanted):
            key = (known[pid], direction)
            policies[key] = self._policies.get(key) or render_policy(*key)
            chains[policies[key][0].name] = policies[key][0]
            for s in policies[key][1]:  # selector sets come empty from the rules: the IP sets fill them below
                if s.elements or s.name not in rule_sets:
                    rule_sets[s.name] = s
        self._policies = policies
        return chains, rule_sets


def render(state: DesiredState) -> Ruleset:
    """The policy part of the table for ``state`` (pure: no kernel I/O)."""
    return _Renderer().render(state)


class PolicyManager:
    """Felix's policy manager: ``on_update`` records, ``apply`` writes the difference in one transaction.

    ``on_programmed`` is called with the state's endpoints once an apply has put their chains and
    set memberships in the kernel: the loop releases the ADDs waiting for them then, not after the
    managers behind this one. With ``wake`` (the loop's kick), a resync reads the table back on a
    thread and the apply after the read repairs (``wake`` is called when the read is done); without
    it, the resync's apply reads back first and repairs itself."""

    def __init__(self, table: NftTable, *,
                 on_programmed: Callable[[frozenset[Endpoint]], None] | None = None,
                 wake: Callable[[], None] | None = None, linger: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._table = table
        self._on_programmed = on_programmed
        self._wake = wake
        self._read_tries = 0
        self._linger: Linger[Policy] = Linger(linger, clock)  # see felix_agent.dataplane.linger
        self._list_linger = ChainLinger(linger, clock)
        self._alarm = Alarm(wake, clock) if wake is not None and linger > 0 else None
        self._renderer = _Renderer(self._linger, self._list_linger)
        self._state: DesiredState | None = None
        self._seen: tuple[frozenset[Endpoint], frozenset[Policy], frozenset[IPSet], frozenset[HostEndpoint],
                          str] | None = None
        self._dirty = False
        table.add_owner(OWNER)

    def on_update(self, state: DesiredState) -> None:
        """Remember the state; no kernel I/O. Only endpoints, policies and IP sets concern this manager."""
        seen = (state.endpoints, state.policies, state.ipsets, state.host_endpoints, state.host.endpoint_to_host_action)
        if seen != self._seen:
            self._state, self._seen, self._dirty = state, seen, True

    def apply(self, *, resync: bool = False) -> str:
        """Reconcile the kernel with the last state; ``resync`` re-reads the table first (out-of-band
        changes). Returns the transaction written ("" for none). Nothing happens before the first update."""
        if self._state is None:
            return ""
        written = ""
        repair = False
        if self._linger.expired() or self._list_linger.expired():
            self._dirty = True  # a lingering chain's time is up: declare the table without it
        if resync and self._wake is not None:
            # Read back on a thread; the apply that follows its end (``wake`` asks the loop for one)
            # repairs. Meanwhile new pods' transactions go through on what the driver last wrote.
            self._read_tries = 0
            self._table.reload_async(self._wake)
        elif self._wake is not None and self._table.read_finished():
            repair = self._table.adopt_reload()
            if not repair and self._read_tries < READ_TRIES:  # overtaken by our own write: read again
                self._read_tries += 1
                self._table.reload_async(self._wake)
            elif not repair:  # churn never left the read a quiet moment: read while the loop waits
                self._table.reload()
                repair = True
        if self._dirty or repair or (resync and self._wake is None):
            self._table.declare(OWNER, self._renderer.render(self._state))
            if resync and self._wake is None:
                self._table.reload()
            written = self._table.apply()
            self._dirty = False
            if self._alarm is not None:
                self._alarm.at(min(self._linger.due(), self._list_linger.due()))
        if self._on_programmed is not None:
            self._on_programmed(self._state.endpoints)
        return written
