"""HostEndpoint: the resource's validation, the host-endpoint FelixConfiguration fields, the
calculation (which policies apply to which host endpoint, in which role) and the rendered table."""

from __future__ import annotations

from typing import Any

import pytest

from datastore import codec
from datastore.errors import ValidationError
from datastore.hostendpoint import DEFAULT_ALLOW_PROFILE
from felix_agent.auto_host_endpoint import MANAGED_BY, switched_on, wanted
from felix_agent.calc.graph import compute
from felix_agent.calc.snapshot import Snapshot
from felix_agent.dataplane import host_policy
from felix_agent.dataplane.policy import render
from tests.unit.test_calc_graph import NODE, gnp, np, res, wep


def doc(kind: str, spec: dict[str, Any], name: str = "x", **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name, **meta}, "spec": spec}


def hep(name: str, interface: str, node: str = NODE, profiles: list[str] | None = None, **labels: str) -> Any:
    return res("HostEndpoint", name, {"node": node, "interfaceName": interface, "profiles": profiles or []},
               labels=labels)


# -- the resource ---------------------------------------------------------------------------------


def test_a_calico_host_endpoint_decodes_unchanged() -> None:
    r = codec.decode(doc("HostEndpoint", {"node": "n1", "interfaceName": "eth0", "expectedIPs": ["198.18.0.11"],
                                          "profiles": ["p"], "ports": [{"name": "http", "port": 8080,
                                                                        "protocol": "tcp"}]},
                         labels={"role": "gw"}))
    assert r.spec.interface_name == "eth0" and r.spec.expected_ips == ["198.18.0.11"]
    assert r.spec.ports[0].protocol == "TCP"
    assert codec.to_document(r)["spec"]["expectedIPs"] == ["198.18.0.11"]


def test_host_endpoint_kind_names() -> None:
    from datastore.hostendpoint import HostEndpoint
    from datastore.resources import kind_named

    assert all(kind_named(name) is HostEndpoint for name in ("HostEndpoint", "hostendpoints", "hep", "HEPS"))


@pytest.mark.parametrize(("spec", "message"), [
    ({"interfaceName": "eth0"}, "spec.node is required"),
    ({"node": "n1"}, "spec.interfaceName is required"),
    ({"node": "n1", "interfaceName": "a/b"}, "is not an interface name"),
    ({"node": "n1", "interfaceName": "*", "expectedIPs": ["10.0.0.300"]}, "expectedIPs[0]"),
    ({"node": "n1", "interfaceName": "*", "ports": [{"name": "HTTP", "port": 80}]}, "is not a port name"),
    ({"node": "n1", "interfaceName": "*", "ports": [{"name": "http", "port": 0}]}, "out of range"),
    ({"node": "n1", "interfaceName": "*", "ports": [{"name": "http", "port": 80, "protocol": "ICMP"}]},
     "must be one of TCP, UDP, SCTP"),
    ({"node": "n1", "interfaceName": "*", "bogus": 1}, "has no field 'bogus'"),
])
def test_bad_host_endpoints_get_one_line_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=None) as err:
        codec.decode(doc("HostEndpoint", spec))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("spec", "message"), [
    ({"preDNAT": True, "ingress": [{"action": "Allow"}]}, "preDNAT needs applyOnForward"),
    ({"doNotTrack": True, "ingress": [{"action": "Allow"}]}, "doNotTrack needs applyOnForward"),
    ({"preDNAT": True, "doNotTrack": True, "applyOnForward": True}, "cannot both be true"),
    ({"preDNAT": True, "applyOnForward": True, "egress": [{"action": "Allow"}]}, "ingress only"),
])
def test_host_policy_flags_follow_calicos_rules(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        codec.decode(doc("GlobalNetworkPolicy", spec))
    assert message in str(err.value)


def test_felix_configuration_host_fields() -> None:
    r = codec.decode(doc("FelixConfiguration", {
        "failsafeInboundHostPorts": [{"protocol": "tcp", "port": 22}, {"port": 179, "net": "10.1.2.3/8"}],
        "failsafeOutboundHostPorts": [], "defaultEndpointToHostAction": "RETURN",
        "autoHostEndpoints": "enabled"}, name="default"))
    assert r.spec.failsafe_inbound_host_ports[1].net == "10.0.0.0/8"
    assert r.spec.failsafe_outbound_host_ports == "none"  # [] survives storage as "none"
    assert r.spec.default_endpoint_to_host_action == "Return" and r.spec.auto_host_endpoints == "Enabled"
    again = codec.from_stored(codec.stored_bytes(r), 1, "/k")
    assert again.spec == r.spec
    for spec, message in (({"defaultEndpointToHostAction": "Reject"}, "must be one of Drop, Accept, Return"),
                          ({"failsafeInboundHostPorts": "some"}, "or 'none'"),
                          ({"failsafeInboundHostPorts": [{"port": 70000}]}, "out of range"),
                          ({"failsafeInboundHostPorts": [{"port": 1, "protocol": "ICMP"}]}, "must be one of")):
        with pytest.raises(ValidationError) as err:
            codec.decode(doc("FelixConfiguration", spec, name="default"))
        assert message in str(err.value)


# -- the calculation ------------------------------------------------------------------------------


def test_policies_select_host_endpoints_by_role() -> None:
    snap = Snapshot.of([
        hep("eth0", "eth0", role="gw"), hep("other-node", "eth0", node="node-b", role="gw"),
        hep("star", "*", profiles=[DEFAULT_ALLOW_PROFILE], role="any"),
        gnp("local", order=1, selector="has(role)", ingress=[{"action": "Allow"}]),
        gnp("fwd", order=2, selector="role == 'gw'", applyOnForward=True, types=["Ingress", "Egress"],
            egress=[{"action": "Deny"}]),
        gnp("pre", order=3, selector="has(role)", applyOnForward=True, preDNAT=True, ingress=[{"action": "Deny"}]),
        gnp("nt", order=4, selector="role == 'any'", applyOnForward=True, doNotTrack=True,
            types=["Egress"], egress=[{"action": "Allow"}]),
        gnp("ns-scoped", selector="all()", namespaceSelector="all()", ingress=[{"action": "Allow"}]),
        np("default", "namespaced", selector="all()", ingress=[{"action": "Allow"}]),
        wep("default", "pod", ["10.244.0.5/32"], role="gw"),
    ])
    state = compute(snap, NODE)
    by_key = {h.key: h for h in state.host_endpoints}
    assert set(by_key) == {"eth0", "star"}  # node-b's is not ours
    gw, star = by_key["eth0"], by_key["star"]
    assert gw.ingress_policies == ("gnp/local", "gnp/fwd") and gw.egress_policies == ("gnp/fwd",)
    assert gw.forward_ingress_policies == ("gnp/fwd",) and gw.forward_egress_policies == ("gnp/fwd",)
    assert gw.pre_dnat_policies == ("gnp/pre",) and gw.untracked_egress_policies == ()
    assert star.untracked_egress_policies == ("gnp/nt",) and star.profiles == (f"pro/{DEFAULT_ALLOW_PROFILE}",)
    ids = {p.id for p in state.policies}
    assert {"gnp/local", "gnp/fwd", "gnp/pre", "gnp/nt", f"pro/{DEFAULT_ALLOW_PROFILE}"} <= ids
    # preDNAT and doNotTrack policies never apply to workloads
    (pod,) = state.endpoints
    assert "gnp/pre" not in pod.ingress_policies and "gnp/nt" not in pod.egress_policies


def test_failsafe_defaults_and_none() -> None:
    state = compute(Snapshot.of([]), NODE)
    assert (6, 22) in {(p.protocol, p.port) for p in state.host.failsafe_inbound}
    assert (17, 53) in {(p.protocol, p.port) for p in state.host.failsafe_outbound}
    assert state.host.endpoint_to_host_action == "Accept"
    config = res("FelixConfiguration", "default", {"failsafeInboundHostPorts": "none",
                                                   "defaultEndpointToHostAction": "Drop"})
    node = res("FelixConfiguration", f"node.{NODE}", {"failsafeOutboundHostPorts": [{"port": 2379}]})
    state = compute(Snapshot.of([config, node]), NODE)
    assert state.host.failsafe_inbound == () and [p.port for p in state.host.failsafe_outbound] == [2379]
    assert state.host.endpoint_to_host_action == "Drop"


# -- the table ------------------------------------------------------------------------------------


def chains(state: Any) -> dict[str, list[str]]:
    return {c.name: [r.body for r in c.rules] for c in host_policy.render(state).chains}


def test_named_host_endpoint_without_policy_denies_behind_failsafe() -> None:
    state = compute(Snapshot.of([hep("eth0", "eth0")]), NODE)
    table = chains(state)
    inp = table["host-input"]
    assert inp.index("tcp dport 22 accept".replace("tcp", "meta l4proto tcp th", 1)) < inp.index(
        f'iifname "eth0" goto {host_policy.host_chain("hin", "eth0")}')
    assert table[host_policy.host_chain("hin", "eth0")][-1] == "drop"
    assert "host-forward-in" not in table  # no applyOnForward policy: forwarded traffic passes


def test_no_host_endpoint_no_host_chains() -> None:
    assert host_policy.render(compute(Snapshot.of([]), NODE)).chains == ()


def test_return_hands_workload_traffic_to_the_all_interfaces_endpoint() -> None:
    config = res("FelixConfiguration", "default", {"defaultEndpointToHostAction": "Return"})
    state = compute(Snapshot.of([config, hep("star", "*")]), NODE)
    assert f'iifname "tor*" goto {host_policy.host_chain("hin", "star")}' in chains(state)["host-input"]
    drop = res("FelixConfiguration", "default", {"defaultEndpointToHostAction": "Drop"})
    wl_to_host = {c.name: c for c in render(compute(Snapshot.of([drop]), NODE)).chains}["input-wl-to-host"]
    assert wl_to_host.rules[-1].body == 'iifname "tor*" drop'


def test_untracked_policy_allows_with_notrack() -> None:
    snap = Snapshot.of([hep("star", "*", role="x"),
                        gnp("nt", selector="has(role)", applyOnForward=True, doNotTrack=True,
                            ingress=[{"action": "Allow", "protocol": "UDP", "destination": {"ports": [53]}}])])
    state = compute(snap, NODE)
    policy_chains = {c.name: [r.body for r in c.rules] for c in render(state).chains}
    (untracked,) = [rules for name, rules in policy_chains.items() if name.endswith("-in-nt")]
    assert untracked == ["meta l4proto udp th dport 53 notrack accept"]
    assert "host-raw-prerouting" in chains(state)


# -- automatic host endpoints ---------------------------------------------------------------------


def test_automatic_host_endpoint_follows_the_node() -> None:
    node = res("Node", NODE, {"bgp": {"ipv4Address": "198.18.0.11/24"}}, labels={"zone": "a"})
    snap = Snapshot.of([node])
    auto = wanted(snap, NODE)
    assert auto is not None and auto.name == f"{NODE}-auto-hep"
    assert auto.spec.interface_name == "*" and auto.spec.expected_ips == ["198.18.0.11"]
    assert auto.metadata.labels == {"zone": "a"} and auto.metadata.annotations[MANAGED_BY] == "felix-agent"
    assert auto.spec.profiles == [DEFAULT_ALLOW_PROFILE]
    assert not switched_on(snap, NODE)
    on = res("FelixConfiguration", "default", {"autoHostEndpoints": "Enabled"})
    assert switched_on(Snapshot.of([node, on]), NODE)


def test_the_auto_host_endpoints_flag_and_variable_beat_felix_configuration() -> None:
    from felix_agent.calc.settings import settings
    from felix_agent.command_line import override_layers, parse_args

    on = Snapshot.of([res("FelixConfiguration", "default", {"autoHostEndpoints": "Enabled"})])
    args = parse_args(["--nodename", NODE, "--no-auto-host-endpoints"])
    assert settings(on, NODE, override_layers(args, {})).auto_host_endpoints == "Disabled"
    args = parse_args(["--nodename", NODE])
    layers = override_layers(args, {"FELIX_AUTOHOSTENDPOINTS": "true"})
    assert settings(Snapshot.of([]), NODE, layers).auto_host_endpoints == "Enabled"


def test_overlay_between_nodes_passes_before_host_policy() -> None:
    from dataclasses import replace

    from felix_agent.calc.model import VXLANPeer

    state = compute(Snapshot.of([hep("star", "*")]), NODE)
    peers = {VXLANPeer("node-b", "198.18.0.12", "10.244.1.0", "aa:bb:cc:dd:ee:ff"),
             VXLANPeer("node-c", "198.18.0.13", "10.244.2.0", "aa:bb:cc:dd:ee:fe")}
    state = replace(state, vxlan_peers=frozenset(peers))
    table = chains(state)
    rule = "ip saddr { 198.18.0.12, 198.18.0.13 } udp dport 4789 accept"
    assert table["host-input"].index(rule) < table["host-input"].index(f"goto {host_policy.host_chain('hin', 'star')}")
    assert "ip daddr { 198.18.0.12, 198.18.0.13 } udp dport 4789 accept" in table["host-output"]


def test_rule_selectors_and_named_ports_resolve_to_host_endpoints() -> None:
    gw = res("HostEndpoint", "gw", {"node": "node-b", "interfaceName": "eth0", "expectedIPs": ["198.18.0.12"],
                                    "ports": [{"name": "admin", "port": 9000}]}, labels={"role": "gw"})
    snap = Snapshot.of([
        gw, hep("mine", "eth0", role="edge"),
        wep("default", "pod", ["10.244.0.5/32"], app="web"),
        gnp("from-gw", selector="app == 'web' || role == 'edge'", ingress=[
            {"action": "Allow", "source": {"selector": "role == 'gw'"}},
            {"action": "Allow", "protocol": "TCP", "destination": {"selector": "role == 'gw'", "ports": ["admin"]}}]),
        np("default", "ns-only", selector="app == 'web'", egress=[{"action": "Allow", "destination": {
            "selector": "role == 'gw'"}}], types=["Egress"]),
    ])
    state = compute(snap, NODE)
    members = {(s.id, s.version): s.members for s in state.ipsets}
    v4 = [m for (set_id, version), m in members.items() if version == 4]
    assert frozenset({"198.18.0.12"}) in v4  # the GlobalNetworkPolicy's selector: the host endpoint's address
    assert frozenset({"198.18.0.12,tcp:9000"}) in v4  # its named port
    assert frozenset() in v4  # the NetworkPolicy's selector sees its own namespace only


def test_a_named_host_endpoint_takes_its_interface_out_of_the_all_interfaces_one() -> None:
    snap = Snapshot.of([hep("star", "*", role="x"), hep("eth0", "eth0", role="y"),
                        gnp("fwd", selector="role == 'x'", applyOnForward=True, ingress=[{"action": "Allow"}])])
    table = chains(compute(snap, NODE))
    inp = table["host-input"]
    named = inp.index(f'iifname "eth0" goto {host_policy.host_chain("hin", "eth0")}')
    assert named < inp.index(f'goto {host_policy.host_chain("hin", "star")}')
    # eth0 has no applyOnForward policy: its forwarded traffic passes rather than meeting star's policy
    fwd = table["host-forward-in"]
    assert fwd.index('iifname "eth0" accept') < fwd.index(f'goto {host_policy.host_chain("hfin", "star")}')


def test_the_agents_configuration_cache_keeps_failsafe_ports(tmp_path: Any) -> None:
    """The re-exec's cache (felix_agent.live_config) gives back what it was given, nested ports included."""
    from felix_agent.live_config import read_cache, write_cache

    spec = codec.decode(doc("FelixConfiguration", {"failsafeInboundHostPorts": [{"port": 22}],
                                                   "failsafeOutboundHostPorts": "none", "healthPort": 9100},
                            name="default")).spec
    write_cache(tmp_path / "cache.json", spec, None)
    assert read_cache(tmp_path / "cache.json") == (spec, None)
