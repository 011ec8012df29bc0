"""GlobalNetworkSet and NetworkSet: the documents Calico users write are accepted (and bad ones
refused in one line), and a rule's selector puts the matching sets' nets in its IP set, within
Calico's scoping rules."""

from __future__ import annotations

from typing import Any

import pytest

from datastore import codec
from datastore.errors import ValidationError
from datastore.model import Resource
from datastore.resources import kind_named
from felix_agent.calc.graph import Calculator, compute
from felix_agent.calc.model import DesiredState
from felix_agent.calc.snapshot import Snapshot, Update
from tests.unit.test_calc_graph import NODE, gnp, np, profile, res, wep


def gns(name: str, nets: list[str], **labels: str) -> Resource:
    return res("GlobalNetworkSet", name, {"nets": nets}, labels=labels or None)


def netset(ns: str, name: str, nets: list[str], **labels: str) -> Resource:
    return res("NetworkSet", name, {"nets": nets}, ns, labels or None)


# ---- the documents ----------------------------------------------------------------------------


def test_a_calico_document_is_accepted_unchanged() -> None:
    doc: dict[str, Any] = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
           "metadata": {"name": "a-name-for-the-set", "labels": {"role": "external-database"}},
           "spec": {"nets": ["198.51.100.0/28", "203.0.113.0/24", "2001:db8::/64"]}}
    r = codec.decode(doc)
    assert r.kind.KIND == "GlobalNetworkSet" and r.spec.nets == doc["spec"]["nets"]
    ns_doc = {"apiVersion": "projectcalico.org/v3", "kind": "NetworkSet",
              "metadata": {"name": "external-db", "namespace": "prod", "labels": {"role": "db"}},
              "spec": {"nets": ["198.51.100.7"]}}
    r = codec.decode(ns_doc)
    assert r.namespace == "prod" and r.spec.nets == ["198.51.100.7/32"]


@pytest.mark.parametrize("name", ["globalnetworkset", "GlobalNetworkSets", "gns", "networkset", "netsets"])
def test_the_kinds_go_by_calicoctl_names(name: str) -> None:
    assert kind_named(name).KIND in ("GlobalNetworkSet", "NetworkSet")


def test_nets_are_canonical_host_bits_forgiven_duplicates_dropped() -> None:
    r = gns("s", ["10.0.0.1/24", "10.0.0.0/24", " 192.0.2.9 ", "2001:DB8::1/64"])
    assert r.spec.nets == ["10.0.0.0/24", "192.0.2.9/32", "2001:db8::/64"]


@pytest.mark.parametrize("nets, message", [
    (["10.0.0.0/33"], "spec.nets[0] '10.0.0.0/33' is not a CIDR or an IP address"),
    (["10.0.0.0/8", "example.com"], "spec.nets[1] 'example.com' is not a CIDR or an IP address"),
    ("10.0.0.0/8", "spec.nets must be a list"),
    ([{"cidr": "10.0.0.0/8"}], "spec.nets[0] must be a string"),
])
def test_bad_nets_are_refused_in_one_line_naming_the_entry(nets: Any, message: str) -> None:
    with pytest.raises(ValidationError) as e:
        gns("s", nets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_field_is_named() -> None:
    with pytest.raises(ValidationError, match="no field 'cidrs'"):
        res("GlobalNetworkSet", "s", {"cidrs": ["10.0.0.0/8"]})


# ---- the calculation ---------------------------------------------------------------------------


def members(ds: DesiredState, version: int = 4) -> dict[str, frozenset[str]]:
    return {s.id: s.members for s in ds.ipsets if s.version == version}


def egress_set(ds: DesiredState, pid: str) -> str:
    (policy,) = [p for p in ds.policies if p.id == pid]
    return policy.egress[0].dst_sets[0]


BASE = [profile("kns.prod", labelsToApply={"env": "prod"}), profile("kns.dev", labelsToApply={"env": "dev"}),
        wep("prod", "web-1", ["10.244.0.2/32"], app="web"), wep("dev", "web-2", ["10.244.0.4/32"], app="web")]
EGRESS_TO_DB = {"types": ["Egress"], "egress": [{"action": "Allow", "destination": {"selector": "role == 'db'"}}]}


def test_a_global_policy_rule_reaches_every_network_set_its_selector_matches() -> None:
    snap = Snapshot.of([*BASE, gnp("out", **EGRESS_TO_DB),
                        gns("db-global", ["198.51.100.0/28", "2001:db8::/64"], role="db"),
                        netset("dev", "db-dev", ["203.0.113.0/24"], role="db"),
                        gns("web", ["192.0.2.0/24"], role="web")])
    ds = compute(snap, NODE)
    set_id = egress_set(ds, "gnp/out")
    assert members(ds)[set_id] == {"198.51.100.0/28", "203.0.113.0/24"}
    assert members(ds, 6)[set_id] == {"2001:db8::/64"}


def test_a_network_policy_rule_reaches_only_its_own_namespaces_network_sets() -> None:
    snap = Snapshot.of([*BASE, np("prod", "out", **EGRESS_TO_DB), gns("db-global", ["198.51.100.0/28"], role="db"),
                        netset("prod", "db-prod", ["203.0.113.0/24"], role="db"),
                        netset("dev", "db-dev", ["192.0.2.0/24"], role="db")])
    ds = compute(snap, NODE)
    assert members(ds)[egress_set(ds, "np/prod/out")] == {"203.0.113.0/24"}


def test_a_namespace_selector_reaches_the_selected_namespaces_sets_and_global_the_global_ones() -> None:
    by_ns = {"types": ["Egress"], "egress": [{"action": "Allow", "destination": {
        "selector": "role == 'db'", "namespaceSelector": "env == 'dev'"}}]}
    glob = {"types": ["Egress"], "egress": [{"action": "Allow", "destination": {
        "selector": "role == 'db'", "namespaceSelector": "global()"}}]}
    sets = [gns("db-global", ["198.51.100.0/28"], role="db"), netset("prod", "db-prod", ["203.0.113.0/24"], role="db"),
            netset("dev", "db-dev", ["192.0.2.0/24"], role="db")]
    ds = compute(Snapshot.of([*BASE, np("prod", "by-ns", **by_ns), np("prod", "glob", **glob), *sets]), NODE)
    assert members(ds)[egress_set(ds, "np/prod/by-ns")] == {"192.0.2.0/24"}
    assert members(ds)[egress_set(ds, "np/prod/glob")] == {"198.51.100.0/28"}


def test_a_namespaced_set_carries_its_namespaces_labels() -> None:
    rule = {"types": ["Egress"], "egress": [{"action": "Allow", "destination": {"selector": "pcns.env == 'dev'"}}]}
    ds = compute(Snapshot.of([*BASE, gnp("out", **rule), netset("dev", "ext", ["192.0.2.0/24"])]), NODE)
    assert members(ds)[egress_set(ds, "gnp/out")] == {"10.244.0.4", "192.0.2.0/24"}


def test_a_network_set_is_never_an_endpoint_a_policy_applies_to() -> None:
    ds = compute(Snapshot.of([*BASE, gnp("all", selector="all()", **EGRESS_TO_DB),
                              gns("db", ["198.51.100.0/28"], role="db")]), NODE)
    assert {e.key for e in ds.endpoints} == {"prod/web-1", "dev/web-2"}


def test_overlapping_members_are_collapsed_for_the_interval_set() -> None:
    rule = {"types": ["Egress"], "egress": [{"action": "Allow", "destination": {"selector": "app == 'web'"}}]}
    ds = compute(Snapshot.of([*BASE, gnp("out", **rule), gns("wide", ["10.244.0.0/24"], app="web"),
                              gns("narrow", ["10.244.0.0/28", "192.0.2.1", "192.0.2.0"], app="web")]), NODE)
    assert members(ds)[egress_set(ds, "gnp/out")] == {"10.244.0.0/24", "192.0.2.0/31"}


def test_a_change_of_nets_moves_set_members_only() -> None:
    snap = Snapshot.of([*BASE, gnp("out", **EGRESS_TO_DB), gns("db", ["198.51.100.0/28"], role="db")])
    calc = Calculator(NODE)
    before = calc.compute(snap)
    changed = gns("db", ["198.51.100.16/28"], role="db")
    snap.apply(Update("GlobalNetworkSet", next(iter(snap.tables["GlobalNetworkSet"])), changed))
    after = calc.compute(snap)
    assert after == compute(snap, NODE)
    assert after.policies is before.policies and after.endpoints is before.endpoints
    assert members(after)[egress_set(after, "gnp/out")] == {"198.51.100.16/28"}


def test_the_calculator_names_the_set_that_put_an_address_in() -> None:
    snap = Snapshot.of([*BASE, gnp("out", **EGRESS_TO_DB), gns("db", ["198.51.100.0/28"], role="db"),
                        netset("prod", "db2", ["198.51.100.0/24"], role="db")])
    calc = Calculator(NODE)
    ds = calc.compute(snap)
    set_id = egress_set(ds, "gnp/out")
    assert calc.set_sources(set_id, "198.51.100.5") == sorted(
        k for kind in ("GlobalNetworkSet", "NetworkSet") for k in snap.tables[kind])
    assert calc.set_sources(set_id, "198.51.100.99") == list(snap.tables["NetworkSet"])
    assert calc.set_sources(set_id, "192.0.2.1") == []


def test_explain_names_the_network_set_that_decided_a_verdict() -> None:
    from netlab.matrix import Packet, evaluate

    snap = Snapshot.of([*BASE, gnp("out", selector="app == 'web'", **EGRESS_TO_DB),
                        gns("db-global", ["10.244.0.0/30", "198.51.100.0/28"], role="db")])
    calc = Calculator(NODE)
    ds = calc.compute(snap)
    ping = Packet("10.244.0.4", "10.244.0.2", 1, icmp_type=8, icmp_code=0)  # web-2 → web-1
    allowed = evaluate(ds, "dev/web-2", "egress", ping, snap, calc.set_sources)
    assert allowed.allowed and allowed.policy == "gnp/out" and allowed.rule == 0
    assert allowed.network_sets == ("GlobalNetworkSet db-global (10.244.0.2 in 10.244.0.0/30)",)
    assert "matched through GlobalNetworkSet db-global" in allowed.reason
    web_1 = Packet("10.244.0.2", "10.244.0.4", 1, icmp_type=8, icmp_code=0)  # outside the set: default deny
    denied = evaluate(ds, "prod/web-1", "egress", web_1, snap, calc.set_sources)
    assert not denied.allowed and denied.network_sets == ()
