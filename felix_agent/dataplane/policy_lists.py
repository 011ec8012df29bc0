"""The chain that runs one ordered list of policies and profiles, and the names of the chains it jumps to.

An endpoint's chain for one direction depends only on that direction, its policy list, its profile
list and which of those the agent has: so endpoints with the same lists share ONE chain,
``to-<hash>`` (ingress) / ``from-<hash>`` (egress), the hash of the lists. nf_tables validates every
rule reachable from a base chain on each commit that adds a verdict (a new pod's map element); at
5,000 endpoints one chain per endpoint made that 93-140 ms per new pod, one chain per distinct list
a few ms. Host endpoints' chains (``felix_agent.dataplane.host_policy``) have the same shape under
names of their own.

Owns those names (``list_chain``, ``policy_chain``), the Pass mark and the list chain's rules
(``render_policy_list``). Must not render a policy's own rules (``felix_agent.dataplane.policy``),
know which endpoints use a chain (``felix_agent.dataplane.endpoint_chains``) or touch the kernel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from felix_agent.calc.model import Endpoint, Policy
from felix_agent.dataplane.nft_ruleset import Chain, Rule

INGRESS, EGRESS = "in", "out"
PASS_MARK = 0x02000000  # set by a Pass rule: skip the remaining policies, go to the profiles
LIST_HASH = 16  # hex digits: 64 bits, so that no two of a node's lists meet on one name


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def policy_chain(policy_id: str, direction: str) -> str:
    kind = "pro" if policy_id.startswith("pro/") else "pol"
    return f"{kind}-{short_hash(policy_id)}-{direction}"


def list_chain(direction: str, policies: tuple[str, ...], profiles: tuple[str, ...]) -> str:
    """The shared chain's name. Which ids are known is left out: that is the same for every list at a
    time, and a policy that appears then rewrites the chain in place instead of moving every map
    element to a new one."""
    key = "\0".join((direction, *policies, "", *profiles))  # "" is no id: it separates the two lists
    return ("to-" if direction == INGRESS else "from-") + hashlib.sha1(key.encode()).hexdigest()[:LIST_HASH]


def endpoint_lists(endpoint: Endpoint) -> tuple[tuple[str, tuple[str, ...], tuple[str, ...]],
                                                tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """The (direction, policies, profiles) keys of an endpoint's ingress and egress chains."""
    return ((INGRESS, endpoint.ingress_policies, endpoint.profiles),
            (EGRESS, endpoint.egress_policies, endpoint.profiles))


def endpoint_chain(endpoint: Endpoint, direction: str) -> str:
    """The name of the (shared) chain an endpoint's traffic in ``direction`` runs through."""
    policies = endpoint.ingress_policies if direction == INGRESS else endpoint.egress_policies
    return list_chain(direction, policies, endpoint.profiles)


def render_list(direction: str, policies: tuple[str, ...], profiles: tuple[str, ...],
                known: Mapping[str, Policy]) -> Chain:
    """The shared chain of one (direction, policies, profiles)."""
    return render_policy_list(list_chain(direction, policies, profiles), direction, policies, profiles, known)


def render_endpoint(endpoint: Endpoint, direction: str, known: Mapping[str, Policy]) -> Chain:
    """Conntrack first; then the policies in order (a Pass skips the rest), default deny once any
    policy applies; then the profiles; then drop. A policy or profile we do not have fails closed."""
    policies = endpoint.ingress_policies if direction == INGRESS else endpoint.egress_policies
    return render_list(direction, policies, endpoint.profiles, known)


def render_policy_list(name: str, direction: str, policies: tuple[str, ...], profiles: tuple[str, ...],
                       known: Mapping[str, Policy], *, conntrack: bool = True, default_deny: bool = True,
                       end: str | None = "drop") -> Chain:
    """An endpoint chain: ``render_endpoint``'s shape, also for host endpoints, whose pre-DNAT and
    untracked chains have no default deny and no end (what no rule decides goes on), and whose
    untracked chains come before conntrack."""
    rules = [Rule("ct state established,related accept"), Rule("ct state invalid drop")] if conntrack else []
    not_passed = f"meta mark & {PASS_MARK:#010x} == 0 "
    if policies:
        rules.append(Rule(f"meta mark set meta mark & {~PASS_MARK & 0xFFFFFFFF:#010x}", "clear the pass mark"))
    for index, pid in enumerate(policies):
        guard = not_passed if index else ""
        target = f"jump {policy_chain(pid, direction)}" if pid in known else "drop"
        rules.append(Rule(guard + target, f"policy {pid}" + ("" if pid in known else " is missing")))
    if policies and default_deny:
        rules.append(Rule(not_passed + "drop", "default deny: no policy allowed the packet"))
    for pid in profiles:
        target = f"jump {policy_chain(pid, direction)}" if pid in known else "drop"
        rules.append(Rule(target, f"profile {pid}" + ("" if pid in known else " is missing")))
    if end is not None:
        rules.append(Rule(end, "no profile allowed the packet"))
    return Chain(name, tuple(rules))
