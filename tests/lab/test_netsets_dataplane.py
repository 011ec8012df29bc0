"""A GlobalNetworkSet through the calculation graph into a real kernel: a policy allowing egress only to
the set lets a pod reach an address inside it and not one outside, and a change of ``nets`` flips the
verdict by set-element updates alone (every rule keeps its kernel handle).

Reuses the lab of ``test_policy_dataplane`` (a host namespace, three pods, an outside namespace behind
the host's uplink); the states are computed by ``felix_agent.calc.graph`` from decoded documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import pytest

from datastore.model import Resource
from felix_agent.calc.graph import Calculator
from felix_agent.calc.snapshot import Snapshot, Update
from felix_agent.dataplane.masq import MasqManager
from felix_agent.dataplane.nftables import NftTable
from felix_agent.dataplane.policy import PolicyManager
from tests.lab.test_policy_dataplane import NODE_V4, OUTSIDE_V4, PODS, POOLS, Lab, built_lab, sh
from tests.unit.test_calc_graph import gnp, res

pytestmark = pytest.mark.lab
NODE = "lab"


def pod(lab: Lab, name: str) -> Resource:
    v4, v6 = PODS[name]
    spec = {"node": NODE, "interfaceName": lab.iface(name), "containerID": name, "network": "net",
            "ipNetworks": [f"{v4}/32", f"{v6}/128"]}
    return res("WorkloadEndpoint", name, spec, "t", {"app": name, "tortie.dev/network": "net"})


def ext(nets: list[str]) -> Resource:
    return res("GlobalNetworkSet", "ext", {"nets": nets}, labels={"role": "ext"})


def rule_handles(lab: Lab) -> dict[str, list[int]]:
    """Every rule's kernel handle, by chain: a rebuilt chain gets new ones."""
    listing = json.loads(sh("ip", "netns", "exec", lab.ns("host"), "nft", "-j", "list", "table", "inet", "tortie"))
    handles: dict[str, list[int]] = {}
    for item in listing["nftables"]:
        if "rule" in item:
            handles.setdefault(item["rule"]["chain"], []).append(item["rule"]["handle"])
    return handles


@pytest.fixture
def lab() -> Iterator[Lab]:
    with built_lab() as made:
        yield made


def test_egress_only_to_a_global_network_set_and_a_change_of_nets_is_set_elements_only(lab: Lab) -> None:
    table = NftTable(netns=lab.ns("host"))
    policy, masq = PolicyManager(table), MasqManager(table)
    calc = Calculator(NODE)
    only_ext = gnp("only-ext", selector="app == 'c1'", types=["Egress"],
                   egress=[{"action": "Allow", "destination": {"selector": "role == 'ext'"}}])
    snap = Snapshot.of([pod(lab, p) for p in PODS] + [only_ext, ext([f"{OUTSIDE_V4}/32", "198.51.100.0/24"])])

    def apply() -> str:
        state = replace(calc.compute(snap), nat_pools=POOLS, all_pools=POOLS)
        policy.on_update(state)
        masq.on_update(state)
        written = policy.apply()
        masq.apply()
        return written

    apply()
    c2 = PODS["c2"][0]
    assert lab.seen_as("c1", OUTSIDE_V4) == NODE_V4  # inside the set (NAT-outgoing to the outside)
    assert lab.seen_as("c1", c2) is None and not lab.ping("c1", c2)  # outside it: dropped
    assert lab.seen_as("c3", c2) == PODS["c3"][0]  # c3 is not selected by the policy
    handles = rule_handles(lab)

    key = next(iter(snap.tables["GlobalNetworkSet"]))
    snap.apply(Update("GlobalNetworkSet", key, ext([f"{c2}/32", "198.51.100.0/24"])))
    written = apply()
    lines = [line for line in written.splitlines() if line != "add table inet tortie"]
    assert lines and all(line.startswith(("add element ", "delete element ")) for line in lines), written
    assert any(OUTSIDE_V4 in line for line in lines if line.startswith("delete element "))
    assert any(c2 in line for line in lines if line.startswith("add element "))
    assert rule_handles(lab) == handles  # no chain was rewritten
    assert lab.seen_as("c1", c2) == PODS["c1"][0] and lab.ping("c1", c2)
    assert lab.seen_as("c1", OUTSIDE_V4) is None
