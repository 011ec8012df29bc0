"""The calculation graph kept between snapshots: after any sequence of changes it answers exactly what
a fresh computation answers, and what a change did not touch is handed on as the same object."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from datastore import keys
from datastore.model import Resource
from felix_agent.calc.graph import Calculator, compute
from felix_agent.calc.snapshot import BLOCK, Snapshot, Update
from ipam.block import Block
from tests.unit.test_calc_graph import NODE, gnp, np, profile, res, wep

NAMESPACES = ("prod", "dev", "scratch")
APPS = ("web", "db", "client")
SELECTORS = ("app == 'web'", "app in {'db', 'client'}", "all()", "has(tier)", "tier != 'a'",
             "!has(app) || app starts with 'c'", "pcns.env == 'prod'")


def key_of(r: Resource) -> tuple[str, str]:
    before = Snapshot.of([r])
    kind = r.kind.KIND
    return kind, next(iter(before.tables[kind]))


def endpoint(i: int, ns: str, app: str, tier: str | None, node: str, port: int | None) -> Resource:
    labels = {"app": app} | ({"tier": tier} if tier else {})
    ports = [{"name": "http", "port": port, "protocol": "TCP"}] if port else []
    return wep(ns, f"pod-{i}", [f"10.244.{i // 200}.{i % 200 + 1}/32", f"fd00::{i + 1}/128"], node=node,
               ports=ports, **labels)


def policy(i: int, ns: str | None, sel: str, src: str, order: int, named: bool, nssel: str | None) -> Resource:
    source: dict[str, Any] = {"selector": src}
    if nssel:
        source["namespaceSelector"] = nssel
    spec: dict[str, Any] = {
        "order": order, "selector": sel, "types": ["Ingress", "Egress"] if i % 2 else ["Ingress"],
        "ingress": [{"action": "Allow", "protocol": "TCP", "source": source,
                     "destination": {"ports": ["http" if named else 80]}},
                    {"action": "Deny", "source": {"notSelector": src}}],
    }
    if i % 2:
        spec["egress"] = [{"action": "Pass", "destination": {"selector": src}}]
    return np(ns, f"pol-{i}", **spec) if ns else gnp(f"gpol-{i}", **spec)


def host_endpoint(i: int, app: str, node: str, interface: str, profiles: list[str]) -> Resource:
    spec = {"node": node, "interfaceName": interface, "expectedIPs": [f"198.18.0.{10 + i}"], "profiles": profiles,
            "ports": [{"name": "http", "port": 8080}] if i % 2 else []}
    return res("HostEndpoint", f"hep-{i}", spec, labels={"app": app})


def host_policy(i: int, sel: str, flavour: str, egress: bool) -> Resource:
    spec: dict[str, Any] = {"order": i, "selector": sel,
                            "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [8080]}},
                                        {"action": "Deny", "source": {"selector": "app == 'db'"}}]}
    if flavour != "preDNAT" and egress:
        spec["egress"] = [{"action": "Allow", "destination": {"selector": sel}}]
        spec["types"] = ["Ingress", "Egress"]
    if flavour != "local":
        spec["applyOnForward"] = True
    if flavour in ("preDNAT", "doNotTrack"):
        spec[flavour] = True
    return gnp(f"hpol-{i}", **spec)


host_endpoints = st.builds(host_endpoint, st.integers(0, 3), st.sampled_from(APPS), st.sampled_from([NODE, "node-b"]),
                           st.sampled_from(["eth0", "*"]),
                           st.sampled_from([[], ["projectcalico-default-allow"], ["kns.prod"]]))
host_policies = st.builds(host_policy, st.integers(0, 3), st.sampled_from(SELECTORS),
                          st.sampled_from(["local", "applyOnForward", "preDNAT", "doNotTrack"]), st.booleans())
endpoints = st.builds(endpoint, st.integers(0, 7), st.sampled_from(NAMESPACES), st.sampled_from(APPS),
                      st.sampled_from([None, "a", "b"]), st.sampled_from([NODE, "node-b"]),
                      st.sampled_from([None, 80, 8080]))
policies = st.builds(policy, st.integers(0, 5), st.sampled_from([None, *NAMESPACES]), st.sampled_from(SELECTORS),
                     st.sampled_from(SELECTORS), st.integers(0, 3), st.booleans(),
                     st.sampled_from([None, "env == 'prod'", "all()", "global()"]))
NETS = ("198.51.100.0/28", "198.51.100.0/24", "10.244.0.0/30", "10.244.0.6", "2001:db8::/64", "fd00::3")


def network_set(i: int, ns: str | None, app: str, tier: str | None, nets: list[str]) -> Resource:
    """A GlobalNetworkSet (``ns`` None) or NetworkSet labelled as endpoints are, so the same selectors
    reach both; its nets overlap each other and the endpoints' addresses."""
    labels = {"app": app} | ({"tier": tier} if tier else {})
    return res("NetworkSet" if ns else "GlobalNetworkSet", f"set-{i}", {"nets": nets}, ns, labels)


netsets = st.builds(network_set, st.integers(0, 3), st.sampled_from([None, *NAMESPACES]), st.sampled_from(APPS),
                    st.sampled_from([None, "a", "b"]), st.lists(st.sampled_from(NETS), max_size=3))
profiles = st.builds(lambda ns, env: profile(f"kns.{ns}", labelsToApply={"env": env}),
                     st.sampled_from(NAMESPACES), st.sampled_from(["prod", "dev"]))
change = st.tuples(st.sampled_from(["put", "put", "put", "delete"]),
                   st.one_of(endpoints, policies, profiles, netsets))
host_change = st.tuples(st.sampled_from(["put", "put", "put", "delete"]),
                        st.one_of(endpoints, policies, profiles, netsets, host_endpoints, host_policies))


@settings(max_examples=150, deadline=None)
@given(st.lists(change, min_size=1, max_size=25))
def test_incremental_results_equal_a_fresh_computation(changes: list[tuple[str, Resource]]) -> None:
    snap = Snapshot.of([profile("kns.prod", labelsToApply={"env": "prod"})])
    calc = Calculator(NODE)
    for op, resource in changes:
        kind, key = key_of(resource)
        snap.apply(Update(kind, key, resource if op == "put" else None))
        assert calc.compute(snap) == compute(snap, NODE)


@settings(max_examples=150, deadline=None)
@given(st.lists(host_change, min_size=1, max_size=25))
def test_incremental_results_with_host_endpoints_equal_a_fresh_computation(
        changes: list[tuple[str, Resource]]) -> None:
    snap = Snapshot.of([profile("kns.prod", labelsToApply={"env": "prod"})])
    calc = Calculator(NODE)
    for op, resource in changes:
        kind, key = key_of(resource)
        snap.apply(Update(kind, key, resource if op == "put" else None))
        assert calc.compute(snap) == compute(snap, NODE)


def world() -> Snapshot:
    resources = [profile("kns.prod", labelsToApply={"env": "prod"})]
    resources += [endpoint(i, NAMESPACES[i % 3], APPS[i % 3], "ab"[i % 2], NODE if i % 4 else "node-b", 80)
                  for i in range(40)]
    resources += [policy(i, NAMESPACES[i % 3] if i % 4 else None, SELECTORS[i % 3], SELECTORS[(i + 3) % 7],
                         i, bool(i % 2), None) for i in range(12)]
    return Snapshot.of(resources)


def test_a_label_change_touches_only_the_sets_the_endpoint_enters_or_leaves() -> None:
    snap = world()
    calc = Calculator(NODE)
    before = calc.compute(snap)
    assert calc.compute(snap) == before  # nothing changed: the same outputs
    pod = endpoint(5, "scratch", "scratch-app", "a", NODE, 80)  # app 'db' → a label no policy selects on
    kind, key = key_of(pod)
    snap.apply(Update(kind, key, pod))
    after = calc.compute(snap)
    assert after == compute(snap, NODE)
    assert after.routes is before.routes  # no address moved
    changed = before.ipsets ^ after.ipsets
    address = "10.244.0.6"
    assert changed
    for set_id in {s.id for s in changed}:  # every changed set gained or lost the pod's address
        v4 = [s.members for s in changed if s.id == set_id and s.version == 4]
        assert len(v4) == 2 and address in v4[0] ^ v4[1]
    unchanged = before.ipsets & after.ipsets
    old_objects = {id(s) for s in before.ipsets}
    assert all(id(s) in old_objects for s in unchanged)  # not rebuilt


def test_a_label_change_that_moves_no_policy_keeps_the_endpoints_and_policies() -> None:
    snap = world()
    calc = Calculator(NODE)
    before = calc.compute(snap)
    pod = endpoint(1, "dev", "db", "b", NODE, 80)  # pod 1 was tier 'a'; no policy selects on tier
    kind, key = key_of(pod)
    snap.apply(Update(kind, key, pod))
    after = calc.compute(snap)
    assert after == compute(snap, NODE)
    assert after.endpoints is before.endpoints
    assert after.policies is before.policies


def test_a_profile_change_recomputes_namespace_labels() -> None:
    snap = world()
    calc = Calculator(NODE)
    calc.compute(snap)
    ns_profile = profile("kns.dev", labelsToApply={"env": "prod"})
    kind, key = key_of(ns_profile)
    snap.apply(Update(kind, key, ns_profile))
    assert calc.compute(snap) == compute(snap, NODE)


@settings(max_examples=100, deadline=None)
@given(st.lists(host_change, min_size=1, max_size=25))
def test_the_policy_renderer_kept_between_states_renders_what_a_fresh_one_does(
        changes: list[tuple[str, Resource]]) -> None:
    """The renderer reuses each endpoint's share of the table while the endpoint object is the same;
    whatever the changes, its table equals one rendered from scratch."""
    from felix_agent.dataplane.policy import _Renderer, render

    snap = world()
    calc = Calculator(NODE)
    renderer = _Renderer()
    assert renderer.render(calc.compute(snap)) == render(compute(snap, NODE))
    for op, resource in changes:
        kind, key = key_of(resource)
        snap.apply(Update(kind, key, resource if op == "put" else None))
        assert renderer.render(calc.compute(snap)) == render(compute(snap, NODE))


@settings(max_examples=100, deadline=None)
@given(st.lists(change, min_size=1, max_size=25))
def test_the_chain_delta_the_renderer_hands_on_turns_the_last_chains_into_the_new_ones(
        changes: list[tuple[str, Resource]]) -> None:
    """Ruleset.delta lets the nftables driver diff only the chains it names: whatever the changes,
    the last chains with the delta applied are exactly the new chains."""
    from felix_agent.dataplane.policy import _Renderer

    snap = world()
    calc = Calculator(NODE)
    renderer = _Renderer()
    last = renderer.render(calc.compute(snap)).chains
    for op, resource in changes:
        kind, key = key_of(resource)
        snap.apply(Update(kind, key, resource if op == "put" else None))
        ruleset = renderer.render(calc.compute(snap))
        if ruleset.chains is not last and ruleset.delta is not None and ruleset.delta.base is last:
            patched = {c.name: c for c in last}
            for name in ruleset.delta.removed:
                del patched[name]
            patched.update((c.name, c) for c in ruleset.delta.upserted)
            assert patched == {c.name: c for c in ruleset.chains}
        last = ruleset.chains


# ---- routes: the local endpoints' host routes are kept endpoint by endpoint, the blocks' as a whole ----
def routed_endpoint(i: int, veth: int, address: int, node: str, v6: bool) -> Resource:
    """An endpoint whose veth and addresses other endpoints may share (a pod being replaced keeps
    both while its old endpoint is still there), on this node or another."""
    ips = [f"10.244.0.{address}/32"] + ([f"fd00:244::{address}/128"] if v6 else [])
    spec = {"node": node, "interfaceName": f"tor{veth:011x}", "containerID": f"c{i}", "network": "tnet",
            "ipNetworks": ips}
    return res("WorkloadEndpoint", f"pod-{i}", spec, "prod")


def routing_node(name: str, subnet: int, vtep: bool) -> Resource:
    spec: dict[str, Any] = {"bgp": {"ipv4Address": f"10.0.{subnet}.{1 + len(name)}/24"}}
    if vtep:
        spec |= {"ipv4VXLANTunnelAddr": f"10.244.{len(name)}.1",
                 "vxlanTunnelMACAddr": f"66:00:00:00:00:{len(name):02x}"}
    return res("Node", name, spec)


def routing_pool(cidr: str, modes: tuple[str, str], disabled: bool) -> Resource:
    vxlan, ipip = modes
    if ":" in cidr:
        ipip = "Never"  # IPIP carries IPv4 only
    name = "pool-" + cidr.replace("/", "-").replace(":", "x")
    return res("IPPool", name, {"cidr": cidr, "vxlanMode": vxlan, "ipipMode": ipip, "disabled": disabled})


def routing_block(cidr: str, owner: str | None, borrowed: dict[int, str]) -> Block:
    b = Block.empty(ipaddress.ip_network(cidr), owner)
    for ordinal, holder in borrowed.items():
        b = b.assign_address(b.address(ordinal), f"h.{ordinal}", {"node": holder})
    return b


ROUTING_NODES = (NODE, "node-b", "node-cc")
routed_endpoints = st.builds(routed_endpoint, st.integers(0, 2), st.integers(0, 1), st.integers(1, 2),
                             st.sampled_from(ROUTING_NODES), st.booleans())
routing_nodes = st.builds(routing_node, st.sampled_from(ROUTING_NODES), st.integers(0, 1), st.booleans())
routing_pools = st.builds(routing_pool, st.sampled_from(["10.244.0.0/16", "10.244.0.0/24", "fd00:244::/48"]),
                          st.sampled_from([("Never", "Never"), ("Always", "Never"), ("CrossSubnet", "Never"),
                                           ("Never", "Always"), ("Never", "CrossSubnet")]), st.booleans())
routing_blocks = st.builds(routing_block, st.sampled_from(["10.244.0.0/26", "10.244.0.64/26", "fd00:244::/122"]),
                           st.sampled_from([*ROUTING_NODES, None]),
                           st.dictionaries(st.integers(1, 6), st.sampled_from(ROUTING_NODES), max_size=2))
routing_change = st.tuples(st.sampled_from(["put", "put", "put", "delete"]),
                           st.one_of(routed_endpoints, routed_endpoints, routing_nodes, routing_pools, routing_blocks))


def routing_key_of(value: Resource | Block) -> tuple[str, str]:
    if isinstance(value, Block):
        return BLOCK, keys.block_key(value.cidr)
    return key_of(value)


@settings(max_examples=150, deadline=None)
@given(st.lists(routing_change, min_size=1, max_size=30), st.booleans())
def test_incremental_routes_equal_a_fresh_computation(changes: list[tuple[str, Resource | Block]],
                                                      bgp: bool) -> None:
    """Endpoints that come, go, move between nodes and share a veth or an address with another,
    among changes of the blocks, pools and nodes: the routes are always those computed from nothing,
    and a change that moves no route hands on the same routes object."""
    snap = Snapshot.of()
    calc = Calculator(NODE, bgp_owns_remote=bgp)
    last = calc.compute(snap)
    for op, value in changes:
        kind, key = routing_key_of(value)
        snap.apply(Update(kind, key, value if op == "put" else None))
        state = calc.compute(snap)
        assert state == compute(snap, NODE, bgp_owns_remote=bgp)
        if state.routes == last.routes:
            assert state.routes is last.routes
        last = state


def test_a_route_two_endpoints_share_stays_until_both_are_gone() -> None:
    """A pod replaced under the same veth and address: the old endpoint's removal keeps the route
    the new one needs; the route goes with the last of them."""
    snap = Snapshot.of()
    calc = Calculator(NODE)
    old, new = routed_endpoint(0, 0, 1, NODE, False), routed_endpoint(1, 0, 1, NODE, False)
    for resource in (old, new):
        snap.apply(Update(*key_of(resource), resource))
    shared = calc.compute(snap).routes
    assert {r.dst for r in shared} == {"10.244.0.1/32"}
    snap.apply(Update(*key_of(old), None))
    assert calc.compute(snap).routes is shared
    snap.apply(Update(*key_of(new), None))
    assert calc.compute(snap).routes == frozenset()


def test_an_assignment_in_the_nodes_own_block_leaves_the_routes_as_they_were() -> None:
    """Every pod's ADD assigns an address of its node's block: the routes stay the very object
    handed out before; an address borrowed by another node moves them."""
    block = routing_block("10.244.0.0/26", NODE, {})
    snap = Snapshot.of([routing_node(NODE, 0, True), routing_node("node-b", 0, True),
                        routing_pool("10.244.0.0/16", ("Always", "Never"), False)], [block])
    calc = Calculator(NODE)
    before = calc.compute(snap)
    assigned = block.assign_address(block.address(5), "h.5", {"node": NODE})
    snap.apply(Update(BLOCK, keys.block_key(block.cidr), assigned))
    after = calc.compute(snap)
    assert after == compute(snap, NODE)
    assert after.routes is before.routes
    borrowed = assigned.assign_address(block.address(6), "h.6", {"node": "node-b"})
    snap.apply(Update(BLOCK, keys.block_key(block.cidr), borrowed))
    moved = calc.compute(snap)
    assert moved == compute(snap, NODE)
    assert {r.dst for r in moved.routes - after.routes} == {"10.244.0.6/32"}
