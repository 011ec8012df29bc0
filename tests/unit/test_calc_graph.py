"""The calculation graph's policy side: which policies and profiles apply to which local endpoint
in which order, what the IP sets hold, and that label changes move members, not rules.

Snapshots are built by hand from documents decoded exactly as the datastore decodes them."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from typing import Any

import pytest

from datastore import codec
from datastore.model import Resource
from felix_agent.calc.graph import compute
from felix_agent.calc.model import DesiredState, Endpoint, IPSet, Policy, RuleMatch
from felix_agent.calc.snapshot import Snapshot

NODE = "node-a"


def res(kind: str, name: str, spec: dict[str, Any], ns: str | None = None,
        labels: dict[str, str] | None = None) -> Resource:
    meta: dict[str, Any] = {"name": name}
    if ns:
        meta["namespace"] = ns
    if labels:
        meta["labels"] = labels
    return codec.decode({"apiVersion": "tortie.dev/v1", "kind": kind, "metadata": meta, "spec": spec})


def wep(ns: str, name: str, ips: list[str], node: str = NODE, network: str = "tnet",
        ports: list[dict[str, Any]] | None = None, **labels: str) -> Resource:
    iface = "tor" + hashlib.sha1(f"{ns}/{name}".encode()).hexdigest()[:11]
    spec = {"node": node, "interfaceName": iface, "containerID": name, "network": network,
            "ipNetworks": ips, "profiles": [f"kns.{ns}"], "ports": ports or []}
    all_labels = {"tortie.dev/namespace": ns, "tortie.dev/network": network, **labels}
    return res("WorkloadEndpoint", name, spec, ns, all_labels)


def np(ns: str, name: str, **spec: Any) -> Resource:
    return res("NetworkPolicy", name, spec, ns)


def gnp(name: str, **spec: Any) -> Resource:
    return res("GlobalNetworkPolicy", name, spec)


def profile(name: str, **spec: Any) -> Resource:
    return res("Profile", name, spec)


def base() -> list[Resource]:
    """Two namespaces (dev has labels, scratch none), endpoints on three nodes."""
    return [
        profile("kns.prod", labelsToApply={"env": "prod"}),
        profile("kns.dev", labelsToApply={"env": "dev", "team": "blue"}),
        wep("prod", "web-1", ["10.244.0.2/32", "fd00:244::2/128"], app="web",
            ports=[{"name": "http", "port": 80, "protocol": "TCP"}]),
        wep("prod", "db-1", ["10.244.0.3/32"], app="db"),
        wep("dev", "web-2", ["10.244.0.4/32"], app="web"),
        wep("prod", "web-3", ["10.244.1.2/32"], node="node-b", app="web",
            ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                   {"name": "dns", "port": 53, "protocol": "UDP"}]),
        wep("prod", "client-1", ["10.244.2.2/32"], node="node-c", app="client"),
        wep("dev", "client-2", ["10.244.2.3/32"], node="node-c", app="client"),
        wep("scratch", "client-3", ["10.244.2.4/32"], node="node-c", app="client"),
    ]


def state(*extra: Resource, drop: tuple[str, ...] = ()) -> DesiredState:
    resources = [r for r in base() if r.name not in drop] + list(extra)
    return compute(Snapshot.of(resources), NODE)


def endpoint(ds: DesiredState, key: str) -> Endpoint:
    return next(e for e in ds.endpoints if e.key == key)


def policy(ds: DesiredState, pid: str) -> Policy:
    return next(p for p in ds.policies if p.id == pid)


def members(ds: DesiredState, set_id: str, version: int = 4) -> set[str]:
    return set(next(s for s in ds.ipsets if s.id == set_id and s.version == version).members)


def ingress_source(ds: DesiredState, pid: str, i: int = 0) -> str:
    (set_id,) = policy(ds, pid).ingress[i].src_sets
    return set_id


ALLOW_FROM_CLIENTS = {"types": ["Ingress"], "ingress": [{"action": "Allow", "source": {"selector": "app == 'client'"}}]}


# ---- which policies apply ---------------------------------------------------------------------


def test_local_endpoints_only_with_their_addresses_and_interfaces() -> None:
    ds = state()
    assert {e.key for e in ds.endpoints} == {"prod/web-1", "prod/db-1", "dev/web-2"}
    web = endpoint(ds, "prod/web-1")
    assert web.addresses == ("10.244.0.2/32", "fd00:244::2/128")
    assert web.interface.startswith("tor") and len(web.interface) == 14


def test_network_policy_applies_in_its_namespace_only_and_in_order() -> None:
    ds = state(np("prod", "late", selector="app == 'web'", **ALLOW_FROM_CLIENTS),
               np("prod", "early", order=10, selector="app == 'web'", **ALLOW_FROM_CLIENTS),
               np("prod", "mid", order=100, selector="all()", **ALLOW_FROM_CLIENTS),
               np("dev", "dev-only", order=1, selector="app == 'db'", **ALLOW_FROM_CLIENTS))
    assert endpoint(ds, "prod/web-1").ingress_policies == ("np/prod/early", "np/prod/mid", "np/prod/late")
    assert endpoint(ds, "prod/db-1").ingress_policies == ("np/prod/mid",)
    # same labels, other namespace: prod's policies do not reach it
    assert endpoint(ds, "dev/web-2").ingress_policies == ()
    # a policy that selects no local endpoint is not output at all
    assert "np/dev/dev-only" not in {p.id for p in ds.policies}


def test_ties_in_order_are_broken_by_name_and_gnp_mix_in_by_order() -> None:
    ds = state(np("prod", "b", order=5, selector="app == 'web'", **ALLOW_FROM_CLIENTS),
               np("prod", "a", order=5, selector="app == 'web'", **ALLOW_FROM_CLIENTS),
               gnp("global-first", order=1, selector="app == 'web'", **ALLOW_FROM_CLIENTS),
               gnp("global-last", order=50, selector="app == 'web'", **ALLOW_FROM_CLIENTS))
    assert endpoint(ds, "prod/web-1").ingress_policies == (
        "gnp/global-first", "np/prod/a", "np/prod/b", "gnp/global-last")
    assert endpoint(ds, "dev/web-2").ingress_policies == ("gnp/global-first", "gnp/global-last")


def test_types_decide_the_direction() -> None:
    egress_only = {"types": ["Egress"], "egress": [{"action": "Deny"}]}
    both = {"types": ["Ingress", "Egress"], "ingress": [{"action": "Allow"}]}
    ds = state(np("prod", "out", order=1, selector="app == 'web'", **egress_only),
               np("prod", "both", order=2, selector="app == 'web'", **both))
    web = endpoint(ds, "prod/web-1")
    assert web.ingress_policies == ("np/prod/both",)
    assert web.egress_policies == ("np/prod/out", "np/prod/both")
    # a type without rules still selects (default deny in that direction)
    assert policy(ds, "np/prod/both").egress == ()


def test_default_deny_selected_endpoint_gets_policy_unselected_only_profiles() -> None:
    ds = state(np("prod", "web-in", selector="app == 'web'", **ALLOW_FROM_CLIENTS))
    web, db = endpoint(ds, "prod/web-1"), endpoint(ds, "prod/db-1")
    assert web.ingress_policies == ("np/prod/web-in",) and web.egress_policies == ()
    assert db.ingress_policies == () and db.egress_policies == ()
    assert web.profiles == db.profiles == ("pro/net.tnet",)


def test_gnp_namespace_selector_matches_namespace_labels() -> None:
    ds = state(gnp("dev-web", selector="app == 'web'", namespaceSelector="env == 'dev'", **ALLOW_FROM_CLIENTS),
               gnp("everywhere", selector="app == 'web'", **ALLOW_FROM_CLIENTS))
    assert endpoint(ds, "prod/web-1").ingress_policies == ("gnp/everywhere",)
    assert endpoint(ds, "dev/web-2").ingress_policies == ("gnp/dev-web", "gnp/everywhere")


def test_endpoint_labels_include_pcns_namespace_labels() -> None:
    ds = state(gnp("by-pcns", selector="pcns.team == 'blue'", **ALLOW_FROM_CLIENTS))
    assert endpoint(ds, "dev/web-2").ingress_policies == ("gnp/by-pcns",)
    assert endpoint(ds, "prod/web-1").ingress_policies == ()


def _allow_from_namespace(name: str) -> dict[str, Any]:
    source = {"namespaceSelector": f"kubernetes.io/metadata.name == '{name}'"}
    return {"types": ["Ingress"], "ingress": [{"action": "Allow", "source": source}]}


def test_every_namespace_is_labelled_with_its_name_even_without_a_profile() -> None:
    """As the Kubernetes API server labels every namespace: scratch and lone have no kns profile."""
    lone = wep("lone", "solo", ["10.244.0.9/32"], app="web")
    ds = state(lone,
               np("prod", "from-scratch", selector="app == 'web'", **_allow_from_namespace("scratch")),
               np("prod", "from-dev", selector="app == 'db'", **_allow_from_namespace("dev")),
               gnp("lone-by-name", selector="pcns.kubernetes.io/metadata.name == 'lone'", **ALLOW_FROM_CLIENTS))
    assert members(ds, ingress_source(ds, "np/prod/from-scratch")) == {"10.244.2.4"}
    assert members(ds, ingress_source(ds, "np/prod/from-dev")) == {"10.244.0.4", "10.244.2.3"}
    assert endpoint(ds, "lone/solo").ingress_policies == ("gnp/lone-by-name",)
    assert endpoint(ds, "dev/web-2").ingress_policies == ()


def test_a_profile_cannot_rename_its_namespace() -> None:
    renamed = profile("kns.dev", labelsToApply={"env": "dev", "kubernetes.io/metadata.name": "prod"})
    ds = compute(Snapshot.of([r for r in base() if r.name != "kns.dev"] + [
        renamed, np("prod", "from-prod", selector="app == 'web'", **_allow_from_namespace("prod"))]), NODE)
    assert members(ds, ingress_source(ds, "np/prod/from-prod")) == {"10.244.0.2", "10.244.0.3", "10.244.1.2",
                                                                      "10.244.2.2"}


# ---- IP sets ------------------------------------------------------------------------------------


def test_network_policy_rule_selector_is_scoped_to_its_namespace_across_nodes() -> None:
    ds = state(np("prod", "web-in", selector="app == 'web'", **ALLOW_FROM_CLIENTS))
    set_id = ingress_source(ds, "np/prod/web-in")
    assert set_id.startswith("s:") and len(set_id) == 18
    assert members(ds, set_id) == {"10.244.2.2"}  # prod's client on node-c, not dev's or scratch's
    assert members(ds, set_id, 6) == set()


def test_gnp_rule_selector_spans_namespaces_and_sets_exist_per_family() -> None:
    ds = state(gnp("web-in", selector="app == 'web'", **ALLOW_FROM_CLIENTS),
               gnp("to-web", selector="app == 'db'", types=["Egress"],
                   egress=[{"action": "Allow", "destination": {"selector": "app == 'web'"}}]))
    assert members(ds, ingress_source(ds, "gnp/web-in")) == {"10.244.2.2", "10.244.2.3", "10.244.2.4"}
    (dst,) = policy(ds, "gnp/to-web").egress[0].dst_sets
    assert members(ds, dst) == {"10.244.0.2", "10.244.0.4", "10.244.1.2"}
    assert members(ds, dst, 6) == {"fd00:244::2"}


def test_equal_selectors_share_one_set_and_scope_separates_them() -> None:
    rule = {"types": ["Ingress"], "ingress": [{"action": "Allow", "source": {"selector": "app in {'b', 'a'}"}}]}
    same = {"types": ["Ingress"], "ingress": [{"action": "Allow", "source": {"selector": 'app in {"a","b"}'}}]}
    ds = state(gnp("one", selector="all()", **rule), gnp("two", selector="all()", **same),
               np("prod", "three", selector="all()", **rule))
    assert ingress_source(ds, "gnp/one") == ingress_source(ds, "gnp/two")
    assert ingress_source(ds, "np/prod/three") != ingress_source(ds, "gnp/one")


def test_label_change_moves_members_without_changing_rules() -> None:
    before = state(np("prod", "web-in", selector="app == 'web'", **ALLOW_FROM_CLIENTS))
    relabelled = wep("prod", "db-1", ["10.244.0.3/32"], app="client")
    after = state(np("prod", "web-in", selector="app == 'web'", **ALLOW_FROM_CLIENTS), relabelled, drop=("db-1",))
    set_id = ingress_source(before, "np/prod/web-in")
    assert policy(before, "np/prod/web-in") == policy(after, "np/prod/web-in")
    assert members(before, set_id) == {"10.244.2.2"}
    assert members(after, set_id) == {"10.244.2.2", "10.244.0.3"}


def test_rule_namespace_selector_and_namespaces_without_profile() -> None:
    def allow_from(ns_selector: str, selector: str = "") -> dict[str, Any]:
        source = {"namespaceSelector": ns_selector} | ({"selector": selector} if selector else {})
        return {"types": ["Ingress"], "ingress": [{"action": "Allow", "source": source}]}

    ds = state(np("prod", "from-dev", order=1, selector="app == 'web'", **allow_from("env == 'dev'")),
               np("prod", "from-any-ns", order=2, selector="app == 'web'", **allow_from("all()", "app == 'client'")),
               np("prod", "from-labelled", order=3, selector="app == 'web'", **allow_from("has(env)")),
               np("prod", "from-global", order=4, selector="app == 'web'", **allow_from("global()")))
    assert members(ds, ingress_source(ds, "np/prod/from-dev")) == {"10.244.0.4", "10.244.2.3"}
    # scratch has no kns profile: no labels, but all() still matches it
    assert members(ds, ingress_source(ds, "np/prod/from-any-ns")) == {"10.244.2.2", "10.244.2.3", "10.244.2.4"}
    assert "10.244.2.4" not in members(ds, ingress_source(ds, "np/prod/from-labelled"))
    assert members(ds, ingress_source(ds, "np/prod/from-global")) == set()  # global(): no workloads


def test_not_selector_is_unscoped_and_lone_not_selector_keeps_namespace_scope() -> None:
    ds = state(np("prod", "not-db", selector="app == 'web'", types=["Ingress"],
                  ingress=[{"action": "Allow", "source": {"notSelector": "app == 'db'"}}]),
               gnp("g-not-db", selector="app == 'web'", types=["Ingress"],
                   ingress=[{"action": "Allow", "source": {"notSelector": "app == 'db'"}}]))
    rule = policy(ds, "np/prod/not-db").ingress[0]
    (scope_set,), (not_set,) = rule.src_sets, rule.src_not_sets
    assert members(ds, scope_set) == {"10.244.0.2", "10.244.0.3", "10.244.1.2", "10.244.2.2"}  # prod's
    assert members(ds, not_set) == {"10.244.0.3"}
    g = policy(ds, "gnp/g-not-db").ingress[0]
    assert g.src_sets == () and g.src_not_sets == (not_set,)


def test_named_ports_resolve_through_endpoint_ports() -> None:
    ds = state(gnp("to-http", selector="app == 'db'", types=["Egress"], egress=[
        {"action": "Allow", "protocol": "TCP", "destination": {"selector": "app == 'web'", "ports": ["http", 443]}},
        {"action": "Allow", "destination": {"ports": ["dns", "http"]}},
    ]))
    first, second = policy(ds, "gnp/to-http").egress
    assert first.dst_ports == ((443, 443),)
    (named,) = first.dst_named_port_sets
    assert named.startswith("n:")
    assert members(ds, named) == {"10.244.0.2,tcp:80", "10.244.1.2,tcp:8080"}
    assert members(ds, named, 6) == {"fd00:244::2,tcp:80"}
    assert next(s for s in ds.ipsets if s.id == named).kind == "named-port"
    # no protocol on the rule: each port keeps its own; no selector: every endpoint's ports
    (any_proto,) = second.dst_named_port_sets
    assert members(ds, any_proto) == {"10.244.0.2,tcp:80", "10.244.1.2,tcp:8080", "10.244.1.2,udp:53"}
    assert second.dst_sets == ()


def test_actions_and_matches_pass_through() -> None:
    rules = [
        {"action": "Log"},
        {"action": "Pass", "source": {"nets": ["192.0.2.0/24"], "notNets": ["192.0.2.128/25"]}},
        {"action": "Deny", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}},
        {"action": "Allow", "protocol": "UDP", "notProtocol": None, "source": {"ports": ["1000:2000"]},
         "destination": {"ports": [53], "notPorts": [5353], "nets": ["10.0.0.0/8"]}},
        {"action": "Allow", "ipVersion": 6, "notProtocol": "TCP"},
        {"action": "Allow", "protocol": 1, "notICMP": {"type": 3}},
    ]
    ds = state(gnp("all-kinds", selector="app == 'db'", types=["Ingress"], ingress=rules))
    got = policy(ds, "gnp/all-kinds").ingress
    assert [r.action for r in got] == ["Log", "Pass", "Deny", "Allow", "Allow", "Allow"]
    assert got[1].src_nets == ("192.0.2.0/24",) and got[1].src_not_nets == ("192.0.2.128/25",)
    assert (got[2].protocol, got[2].icmp_type, got[2].icmp_code) == (1, 8, 0)
    assert got[3] == RuleMatch("Allow", protocol=17, src_ports=((1000, 2000),), dst_ports=((53, 53),),
                               dst_not_ports=((5353, 5353),), dst_nets=("10.0.0.0/8",),
                               comment="gnp/all-kinds ingress 3")
    assert (got[4].ip_version, got[4].not_protocol) == (6, 6)
    assert (got[5].protocol, got[5].not_icmp_type, got[5].not_icmp_code) == (1, 3, None)


# ---- profiles ------------------------------------------------------------------------------------


def test_network_profile_allows_ingress_from_the_network_and_any_egress() -> None:
    other_net = wep("prod", "elsewhere", ["10.250.0.2/32"], node="node-b", network="other", app="x")
    ds = state(other_net)
    net = policy(ds, "pro/net.tnet")
    (rule,) = net.ingress
    assert rule.action == "Allow" and net.egress == (RuleMatch("Allow", comment="pro/net.tnet egress 0"),)
    assert "10.250.0.2" not in members(ds, rule.src_sets[0])
    assert members(ds, rule.src_sets[0]) >= {"10.244.0.2", "10.244.1.2", "10.244.2.4"}
    assert "pro/net.other" not in {p.id for p in ds.policies}  # no local endpoint on that network


def test_namespace_profile_with_rules_comes_before_the_network_profile() -> None:
    ruled = profile("kns.prod", labelsToApply={"env": "prod"}, ingress=[{"action": "Deny"}])
    ds = compute(Snapshot.of([ruled, *[r for r in base() if r.name != "kns.prod"]]), NODE)
    assert endpoint(ds, "prod/web-1").profiles == ("pro/kns.prod", "pro/net.tnet")
    assert endpoint(ds, "dev/web-2").profiles == ("pro/net.tnet",)  # kns.dev has labels only
    assert policy(ds, "pro/kns.prod").ingress[0].action == "Deny"


def test_stored_network_profile_replaces_the_synthesised_one() -> None:
    closed = profile("net.tnet", labelsToApply={"closed": "yes"})
    ds = state(closed, gnp("by-net-label", selector="closed == 'yes'", **ALLOW_FROM_CLIENTS))
    assert endpoint(ds, "prod/web-1").profiles == ()  # no rules: closed by default
    assert endpoint(ds, "prod/web-1").ingress_policies == ("gnp/by-net-label",)  # its labels apply
    custom = profile("net.tnet", ingress=[{"action": "Allow"}])
    ds = state(custom)
    assert endpoint(ds, "prod/web-1").profiles == ("pro/net.tnet",)
    assert policy(ds, "pro/net.tnet").ingress == (RuleMatch("Allow", comment="pro/net.tnet ingress 0"),)


def test_compute_is_deterministic_and_outputs_only_referenced_sets() -> None:
    extra = gnp("web-in", selector="app == 'web'", **ALLOW_FROM_CLIENTS)
    remote_only = gnp("remote", selector="app == 'client'", types=["Ingress"],
                      ingress=[{"action": "Allow", "source": {"selector": "app == 'nobody'"}}])
    a, b = state(extra, remote_only), state(remote_only, extra)
    assert a == b
    referenced = {s for p in a.policies for r in (*p.ingress, *p.egress)
                  for s in (*r.src_sets, *r.dst_sets, *r.src_not_sets, *r.dst_not_sets,
                            *r.src_named_port_sets, *r.dst_named_port_sets)}
    assert {s.id for s in a.ipsets} == referenced
    assert all(isinstance(s, IPSet) for s in a.ipsets)


def test_the_calculation_graph_imports_neither_netlink_nor_etcd() -> None:
    probe = ("import sys, felix_agent.calc.graph; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyroute2', 'grpc', 'pyetcd') "
             "or m == 'datastore.etcd'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- speed ---------------------------------------------------------------------------------------


def scale_snapshot(n_endpoints: int, n_policies: int, seed: int = 7) -> Snapshot:
    rng = random.Random(seed)
    namespaces = [f"ns{i}" for i in range(20)]
    resources: list[Resource] = [profile(f"kns.{ns}", labelsToApply={"tier": rng.choice("abc")})
                                 for ns in namespaces]
    for i in range(n_endpoints):
        ns = rng.choice(namespaces)
        resources.append(wep(ns, f"pod-{i}", [f"10.{i // 65536 + 10}.{i // 256 % 256}.{i % 256}/32"],
                             node=f"node-{i % 10}", app=f"app{rng.randrange(50)}",
                             role=rng.choice(["fe", "be", "db"]), version=str(rng.randrange(3)),
                             ports=[{"name": "http", "port": 8080}]))
    for i in range(n_policies):
        ns = rng.choice(namespaces)
        rules = [{"action": "Allow", "protocol": "TCP",
                  "source": {"selector": f"app == 'app{rng.randrange(50)}' && role != 'db'"},
                  "destination": {"ports": [80, "http"]}},
                 {"action": "Allow", "source": {"namespaceSelector": f"tier == '{rng.choice('abc')}'",
                                                "selector": f"role in {{'fe', 'be'}} && version == '{i % 3}'"}},
                 {"action": "Deny", "destination": {"nets": ["192.0.2.0/24"]}}]
        # mostly one app per policy, and every 50th a broad one (a namespace- or cluster-wide default)
        selector = "all()" if i % 50 == 0 else f"app == 'app{rng.randrange(50)}'"
        spec = {"order": rng.randrange(1000), "selector": selector,
                "types": ["Ingress", "Egress"], "ingress": rules[:2], "egress": rules[2:]}
        resources.append(np(ns, f"pol-{i}", **spec) if i % 4 else gnp(f"gpol-{i}", **spec))
    return Snapshot.of(resources)


@pytest.mark.parametrize(("endpoints", "policies"), [(1000, 200), (5000, 500)])
def test_compute_time(endpoints: int, policies: int) -> None:
    snap = scale_snapshot(endpoints, policies)
    compute(snap, "node-0")  # warm the parse caches, as a running agent has them
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        ds = compute(snap, "node-0")
        runs.append(time.perf_counter() - start)
    print(f"\ncompute(): {endpoints} endpoints ({len(ds.endpoints)} local), {policies} policies, "
          f"{len(ds.policies)} active, {len(ds.ipsets)} IP sets: best {min(runs) * 1000:.1f} ms, "
          f"worst {max(runs) * 1000:.1f} ms")
    assert len(ds.endpoints) == endpoints // 10
