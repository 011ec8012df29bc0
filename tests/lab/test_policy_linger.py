"""Lingering policy chains against a real kernel (``felix_agent.dataplane.linger``): a profile's chains
and selector set outlive its node's last pod for the linger, reachable from nothing (no rule jumps to
them, the set is empty), serve the profile's next pod unchanged, and are gone once the linger is
over; what is allowed and dropped is what it was without the linger.

Reuses the lab of ``test_policy_dataplane`` (a host namespace, three pods, an outside namespace). The
states are what the calculation sends: the profile ``pro/web`` and its selector set only while a
local pod uses it. The manager's clock is a fake one, moved by the test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from felix_agent.calc.model import DesiredState, Endpoint, IPSet, Policy, RuleMatch
from felix_agent.dataplane.nftables import NftTable
from felix_agent.dataplane.policy import PolicyManager, set_name
from felix_agent.dataplane.policy_lists import policy_chain
from tests.lab.test_policy_dataplane import PODS, PROFILE, Lab, built_lab, sh

pytestmark = pytest.mark.lab

WEB = Policy("pro/web", ingress=(RuleMatch("Allow", src_sets=("web",)),), egress=(RuleMatch("Allow"),))
WEB_CHAINS = {policy_chain(WEB.id, "in"), policy_chain(WEB.id, "out")}
WEB_SETS = {set_name("web", 4), set_name("web", 6)}
LINGER = 30.0


@pytest.fixture
def lab() -> Iterator[Lab]:
    with built_lab() as made:
        yield made


class Node:
    """The policy manager with a linger, on the lab's host namespace, fed the calculation's states."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.now = 0.0
        self.manager = PolicyManager(NftTable(netns=lab.ns("host")), linger=LINGER, clock=lambda: self.now)

    def endpoint(self, pod: str, profile: str) -> Endpoint:
        v4, v6 = PODS[pod]
        return Endpoint(f"t/{pod}", self.lab.iface(pod), (f"{v4}/32", f"{v6}/128"), profiles=(profile,))

    def apply(self, web: tuple[str, ...], web_members: tuple[str, ...] = ("c2",)) -> str:
        """c1 (when in ``web``) under ``pro/web``, which allows ingress from the ``web`` set; the others
        under the allow-all ``pro/net``. The ``web`` set holds ``web_members`` while a pod uses it."""
        endpoints = [self.endpoint(p, WEB.id if p in web else PROFILE.id) for p in ("c1", "c2", "c3")
                     if p in web or p != "c1"]
        used = any(e.profiles == (WEB.id,) for e in endpoints)
        ipsets = [IPSet("web", 4, members=frozenset(f"{PODS[p][0]}/32" for p in web_members)),
                  IPSet("web", 6, members=frozenset(f"{PODS[p][1]}/128" for p in web_members))] if used else []
        state = DesiredState(node="lab", endpoints=frozenset(endpoints),
                             policies=frozenset([PROFILE, WEB] if used else [PROFILE]), ipsets=frozenset(ipsets))
        self.manager.on_update(state)
        return self.manager.apply()

    def reachable(self) -> set[str]:
        """The chains a packet can get to: from the base chains, through jumps, gotos and verdict maps."""
        listing = json.loads(sh("ip", "netns", "exec", self.lab.ns("host"), "nft", "-j", "list", "table", "inet",
                                "tortie"))["nftables"]
        maps = {item["map"]["name"]: [verdict for _, verdict in item["map"].get("elem", [])]
                for item in listing if "map" in item}
        edges: dict[str, set[str]] = {}
        for item in listing:
            if "rule" in item:
                text = json.dumps(item["rule"]["expr"])
                targets = edges.setdefault(item["rule"]["chain"], set())
                targets |= set(re.findall(r'"target": "([^"]+)"', text))
                for name in re.findall(r'"@([^"]+)"', text):
                    targets |= {v.get("goto", v.get("jump", {})).get("target", "") for v in maps.get(name, [])}
        seen = {item["chain"]["name"] for item in listing if "chain" in item and "hook" in item["chain"]}
        todo = list(seen)
        while todo:
            for target in edges.get(todo.pop(), ()):
                if target and target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    def table(self) -> tuple[set[str], dict[str, list[object]], str]:
        """The table's chains, its sets with their elements, and every rule's text."""
        listing = json.loads(sh("ip", "netns", "exec", self.lab.ns("host"), "nft", "-j", "list", "table", "inet",
                                "tortie"))["nftables"]
        chains = {item["chain"]["name"] for item in listing if "chain" in item}
        sets = {item["set"]["name"]: item["set"].get("elem", []) for item in listing if "set" in item}
        rules = sh("ip", "netns", "exec", self.lab.ns("host"), "nft", "list", "table", "inet", "tortie")
        return chains, sets, rules


def made_or_deleted(script: str, names: set[str]) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(("add chain", "delete chain", "add set",
                                                                     "delete set")) and line.split()[4] in names]


def test_a_profiles_chains_linger_unreferenced_then_go(lab: Lab) -> None:
    node = Node(lab)
    node.apply(web=("c1",))
    assert lab.reaches("c2", "c1") and not lab.reaches("c3", "c1")

    node.now += 1
    left = node.apply(web=())  # c1, the profile's last pod on the node, is deleted
    chains, sets, rules = node.table()
    assert chains >= WEB_CHAINS and sets.keys() >= WEB_SETS  # lingering ...
    assert all(not sets[name] for name in WEB_SETS)  # ... the selector sets emptied ...
    assert not WEB_CHAINS & node.reachable()  # ... and unreachable (only c1's lingering list chains jump there)
    assert made_or_deleted(left, WEB_CHAINS | WEB_SETS) == []
    assert lab.reaches("c2", "c3") and lab.reaches("c3", "c2")

    node.now += 10
    back = node.apply(web=("c1",), web_members=("c3",))  # the profile's next pod, within the linger
    assert made_or_deleted(back, WEB_CHAINS | WEB_SETS) == []  # elements, a list chain and map elements only
    assert lab.reaches("c3", "c1") and not lab.reaches("c2", "c1")  # the set was refilled in the same transaction

    node.now += 1
    node.apply(web=())
    node.now += LINGER - 0.5
    assert node.apply(web=()) == ""
    node.now += 0.5
    gone = node.apply(web=())  # nothing changed but the time
    assert sorted(made_or_deleted(gone, WEB_CHAINS | WEB_SETS)) == sorted(
        [f"delete chain inet tortie {name}" for name in WEB_CHAINS] + [f"delete set inet tortie {name}"
                                                                        for name in WEB_SETS])
    chains, sets, rules = node.table()
    assert not WEB_CHAINS & chains and not WEB_SETS & sets.keys()
    assert lab.reaches("c2", "c3") and lab.reaches("c3", "c2")


def test_list_chains_never_outlive_the_policy_chains_they_jump_to(lab: Lab) -> None:
    """Two lists jump to ``pro/web``: c1's (the profile alone) and c2's (a policy, then the profile).
    c1 leaves first, c2 later: c1's list chain goes after its own linger while the profile's chains stay
    (c2's lingering list still jumps to them); then c2's list, the policy and the profile go together.
    The kernel refuses to delete a chain a rule still jumps to: no transaction needed the fallback of
    recreating the table."""
    node = Node(lab)
    allow = Policy("np/t/allow", ingress=(RuleMatch("Allow"),))
    allow_chain = policy_chain(allow.id, "in")

    def apply(*present: str) -> str:
        eps = [node.endpoint("c3", PROFILE.id)]
        if "c1" in present:
            eps.append(node.endpoint("c1", WEB.id))
        if "c2" in present:
            v4, v6 = PODS["c2"]
            eps.append(Endpoint("t/c2", lab.iface("c2"), (f"{v4}/32", f"{v6}/128"), (allow.id,), (), (WEB.id,)))
        used = [p for p in (WEB, allow) if any(p.id in e.profiles + e.ingress_policies for e in eps)]
        node.manager.on_update(DesiredState(node="lab", endpoints=frozenset(eps),
                                            policies=frozenset([PROFILE, *used])))
        return node.manager.apply()

    apply("c1", "c2")
    lists = {name: lab.dispatch(pod, "ingress") for name, pod in (("c1", "c1"), ("c2", "c2"))}
    assert lab.reaches("c3", "c2") and not lab.reaches("c3", "c1")  # c1 takes only the (empty) web set's members
    written = []
    node.now += 1
    written.append(apply("c2"))
    node.now += 9
    written.append(apply())
    node.now += LINGER - 9 + 0.5  # c1's list chain is due, c2's and the policy chains are not
    written.append(apply())
    chains, _, _ = node.table()
    assert lists["c1"] not in chains and lists["c2"] in chains
    assert chains >= WEB_CHAINS and allow_chain in chains
    node.now += 9
    written.append(apply())
    chains, sets, _ = node.table()
    assert not ({lists["c2"], allow_chain} | WEB_CHAINS) & chains and not WEB_SETS & sets.keys()
    assert not any("delete table" in script for script in written)
    assert not lab.reaches("c3", "c2") and not lab.reaches("c2", "c3")  # c2 is gone: its interface is dropped


def test_the_agent_removes_lingering_chains_on_its_own_once_the_linger_is_over() -> None:
    """A real agent with ``--policy-linger 1``: a pod's list chains and its profile's chains and sets
    outlive its DEL, unreachable, serve the next pod of the profile as they are (its dispatch elements
    go to the same chain), then go without anything else happening (the linger's timer wakes the
    loop)."""
    from netlab.wait import wait_for
    from tests.lab.tortie_support import TortieLab, host_ifname

    with TortieLab.create(nodes=1, prefix="tpl") as tl:
        tl.start_agent(extra_args=["--policy-linger", "1"])

        def table() -> tuple[set[str], dict[str, str]]:
            listing = json.loads(tl.exec(1, "nft", "-j", "list", "table", "inet", "tortie").stdout)["nftables"]
            chains = {item["chain"]["name"] for item in listing if "chain" in item}
            sets = {item["set"]["name"] for item in listing if "set" in item}
            to_wl = next(item["map"] for item in listing if "map" in item and item["map"]["name"] == "to-wl")
            targets = {key: verdict["goto"]["target"] for key, verdict in to_wl.get("elem", [])}
            return chains | sets, targets

        first = tl.add_pod("web-1")
        objects, targets = table()
        target = targets[host_ifname(first.container_id)]
        pod_objects = {name for name in objects if name.startswith(("to-", "from-", "pro-", "s-"))
                       and name != "forward-to-wl"}
        assert target in pod_objects and any(name.startswith("pro-") for name in pod_objects)
        tl.lab.delete_pod(first)
        objects, targets = table()
        assert pod_objects <= objects and target not in targets.values()  # lingering, unreachable
        second = tl.add_pod("web-2")
        assert table()[1][host_ifname(second.container_id)] == target  # the same list chain again
        tl.lab.delete_pod(second)
        wait_for(lambda: not pod_objects & table()[0], 15, "the lingering chains and sets to go", interval=0.2)
        tl.assert_clean()
