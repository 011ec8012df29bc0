"""Issue 15's BGP options as pure logic: BGPFilter decisions (Calico's order and fall-through),
what each peer is sent (``bgp.outbound``), the options derived from BGPPeer/BGPConfiguration
(``bgp.config``), their ExaBGP rendering (checked by ExaBGP's own parser), key files, and the
one-line errors of bad documents."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bgp import exabgp, outbound
from bgp.config import exports, speaker_config
from bgp.filters import Filter, Rule, accepts, compile_filter
from bgp.model import EXTERNAL, MESH, Export, Peer, PeerOptions, SpeakerConfig
from bgp.passwords import PasswordError, read_key, with_keys
from datastore import codec
from datastore.errors import ValidationError
from datastore.model import Resource
from datastore.references import check_references
from datastore.resources import kind_named
from felix_agent.calc.snapshot import Snapshot
from ipam.block import Block

EXABGP = Path(sys.executable).parent / "exabgp"


def res(kind: str, name: str, spec: dict[str, Any]) -> Resource:
    return codec.decode({"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name},
                         "spec": spec})


def rejected(kind: str, spec: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as e:
        res(kind, "x", spec)
    return str(e.value)


def flt(name: str, **rules: list[dict[str, Any]]) -> Filter:
    return compile_filter(name, res("BGPFilter", name, rules).spec)


# -- decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("operator, prefix, hit", [
    ("In", "10.245.0.0/16", True), ("In", "10.245.3.0/26", True), ("In", "10.244.0.0/26", False),
    ("NotIn", "10.245.3.0/26", False), ("NotIn", "10.244.0.0/26", True),
    ("Equal", "10.245.0.0/16", True), ("Equal", "10.245.0.0/17", False),
    ("NotEqual", "10.245.0.0/16", False), ("NotEqual", "10.245.0.0/17", True),
])
def test_match_operators(operator: str, prefix: str, hit: bool) -> None:
    f = flt("f", exportV4=[{"action": "Reject", "matchOperator": operator, "cidr": "10.245.0.0/16"}])
    assert accepts([f], "export", prefix) is not hit


def test_prefix_length_narrows_in() -> None:
    f = flt("f", importV4=[{"action": "Accept", "matchOperator": "In", "cidr": "10.0.0.0/8",
                            "prefixLength": {"min": 24, "max": 26}}, {"action": "Reject"}])
    assert [accepts([f], "import", p, remote=True) for p in ("10.1.0.0/16", "10.1.2.0/24", "10.1.2.0/26",
                                                            "10.1.2.0/28", "192.0.2.0/24")] == \
        [False, True, True, False, False]


def test_first_match_wins_and_no_match_falls_through_to_the_next_filter_then_accept() -> None:
    first = flt("first", exportV4=[{"action": "Accept", "matchOperator": "Equal", "cidr": "10.245.1.0/26"},
                                   {"action": "Reject", "matchOperator": "In", "cidr": "10.245.0.0/16"}])
    second = flt("second", exportV4=[{"action": "Reject", "matchOperator": "In", "cidr": "10.244.0.0/16"}])
    both = [first, second]
    assert accepts(both, "export", "10.245.1.0/26")  # first rule of the first filter
    assert not accepts(both, "export", "10.245.2.0/26")  # second rule
    assert not accepts(both, "export", "10.244.0.0/26")  # no match in `first`: `second` decides
    assert accepts(both, "export", "10.96.0.0/12")  # no filter decides: accepted
    assert accepts(both, "import", "10.245.2.0/26", remote=True)  # export rules say nothing on import


def test_families_and_sources_and_interfaces() -> None:
    f = flt("f", exportV4=[{"action": "Reject", "source": "RemotePeers"}, {"action": "Reject", "interface": "cali*"}],
            importV6=[{"action": "Reject", "matchOperator": "In", "cidr": "fd00::/8"}])
    assert accepts([f], "export", "10.244.0.0/26")  # own routes are not from remote peers, nor interface routes
    assert not accepts([f], "export", "10.244.0.0/26", remote=True)  # a reflected route
    assert not accepts([f], "export", "10.244.0.5/32", interface="cali123")
    assert not accepts([f], "import", "fd00:1::/64", remote=True)
    assert accepts([f], "import", "10.0.0.0/8", remote=True)  # v4 import: no rules


def test_compiled_filters_are_values() -> None:
    spec = {"exportV4": [{"action": "Reject", "matchOperator": "In", "cidr": "10.245.0.0/16"}]}
    assert flt("f", **spec) == flt("f", **spec)
    assert flt("f", **spec).export_v4 == (Rule(False, "In", ipaddress.ip_network("10.245.0.0/16")),)


# -- what each peer is sent ----------------------------------------------------------------------


A, B, S = Export("10.244.0.0/26", "10.0.0.1"), Export("10.245.0.0/26", "10.0.0.1"), Export("10.96.0.0/12", "10.0.0.1")
NO_B = flt("no-b", exportV4=[{"action": "Reject", "matchOperator": "In", "cidr": "10.245.0.0/16"}])


def by_prefix(*exports: Export) -> dict[str, Export]:
    return {e.prefix: e for e in exports}


def test_without_export_filters_one_global_command() -> None:
    peers = [Peer("10.0.0.2", 64512, MESH), Peer("10.0.0.3", 64512, MESH)]
    assert outbound.changes({}, by_prefix(A, B), peers, ["10.0.0.2"]) == \
        ["announce attributes next-hop 10.0.0.1 nlri 10.244.0.0/26 10.245.0.0/26"]


def test_with_export_filters_each_group_of_sessions_gets_what_its_filters_accept() -> None:
    peers = [Peer("10.0.0.2", 64512, MESH), Peer("192.0.2.1", 65001, EXTERNAL, options=PeerOptions(filters=(NO_B,))),
             Peer("192.0.2.2", 65001, EXTERNAL, options=PeerOptions(filters=(NO_B,))),
             Peer("10.0.0.9", 64512, MESH)]  # not established: gets everything on session up
    up = ["10.0.0.2", "192.0.2.1", "192.0.2.2"]
    assert outbound.changes({}, by_prefix(A, B), peers, up) == [
        "neighbor 10.0.0.2 announce attributes next-hop 10.0.0.1 nlri 10.244.0.0/26 10.245.0.0/26",
        "neighbor 192.0.2.1, neighbor 192.0.2.2 announce attributes next-hop 10.0.0.1 nlri 10.244.0.0/26",
    ]
    # B goes: only the unfiltered peer had it.
    assert outbound.changes(by_prefix(A, B), by_prefix(A), peers, up) == \
        ["neighbor 10.0.0.2 withdraw attributes next-hop 10.0.0.1 nlri 10.245.0.0/26"]
    # A filter added to a session that is up: what it now rejects is withdrawn from it.
    assert outbound.refilter(by_prefix(A, B), "10.0.0.2", (), (NO_B,)) == \
        ["neighbor 10.0.0.2 withdraw attributes next-hop 10.0.0.1 nlri 10.245.0.0/26"]


def test_communities_ride_with_their_routes() -> None:
    tagged = Export("10.244.0.0/26", "10.0.0.1", ("64512:100", "64512:1:2"))
    assert outbound.diff({}, by_prefix(tagged, S)) == [
        "announce attributes next-hop 10.0.0.1 nlri 10.96.0.0/12",
        "announce attributes next-hop 10.0.0.1 community [ 64512:100 ] large-community [ 64512:1:2 ] "
        "nlri 10.244.0.0/26",
    ]
    # New communities on the same prefix: announced again (the new attributes replace the old).
    assert outbound.diff(by_prefix(A), by_prefix(tagged)) == [
        "announce attributes next-hop 10.0.0.1 community [ 64512:100 ] large-community [ 64512:1:2 ] "
        "nlri 10.244.0.0/26"]


# -- from the datastore --------------------------------------------------------------------------


def node(name: str, ip: str) -> Resource:
    return res("Node", name, {"bgp": {"ipv4Address": ip}})


def test_exports_carry_services_and_prefix_advertisement_communities() -> None:
    config = res("BGPConfiguration", "default", {
        "communities": [{"name": "pods", "value": "64512:100"}],
        "prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["pods", "64512:1:2"]},
                                 {"cidr": "10.244.0.0/24", "communities": ["64512:200"]}],
        "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}], "serviceExternalIPs": [{"cidr": "192.0.2.0/28"}],
        "serviceLoadBalancerIPs": [{"cidr": "fd00:96::/112"}]})
    blocks = [Block.empty(ipaddress.ip_network("10.244.0.0/26"), "n1"),
              Block.empty(ipaddress.ip_network("10.245.0.0/26"), "n1")]
    snap = Snapshot.of([node("n1", "10.0.0.1/24"), config], blocks)
    assert exports(snap, "n1") == frozenset({
        Export("10.244.0.0/26", "10.0.0.1", ("64512:100", "64512:1:2", "64512:200")),
        Export("10.245.0.0/26", "10.0.0.1"), Export("10.96.0.0/12", "10.0.0.1"),
        Export("192.0.2.0/28", "10.0.0.1")})  # no IPv6 address: the IPv6 service CIDR is not announced


def test_peer_options_and_filters_in_order() -> None:
    tor = res("BGPPeer", "tor", {
        "peerIP": "192.0.2.1", "asNumber": 65001, "localASNumber": 64600, "keepOriginalNextHop": True,
        "maxRestartTime": "5m", "sourceAddress": "None", "numAllowedLocalASNumbers": 2, "ttlSecurity": 1,
        "password": {"file": {"path": "/etc/tortie/tor.key"}}, "filters": ["b", "a", "missing"]})
    fa, fb = res("BGPFilter", "a", {}), res("BGPFilter", "b", {"importV4": [{"action": "Reject"}]})
    config = speaker_config(Snapshot.of([node("n1", "10.0.0.1/24"), tor, fa, fb]), "n1")
    assert config is not None
    (peer,) = config.peers
    assert peer.options == PeerOptions(local_asn=64600, keep_original_next_hop=True, restart_time=300,
                                       use_node_ip=False, allowed_local_as=2, ttl_security=1,
                                       password_file="/etc/tortie/tor.key",
                                       filters=(compile_filter("b", fb.spec), compile_filter("a", fa.spec)))


def test_rendered_options_are_accepted_by_exabgp(tmp_path: Path) -> None:
    options = PeerOptions(local_asn=64600, restart_time=300, use_node_ip=False, ttl_security=2)
    config = SpeakerConfig("n1", "10.0.0.1", "10.0.0.1", 64512,
                           peers=(Peer("10.0.0.2", 64512, MESH), Peer("192.0.2.1", 65001, EXTERNAL, options=options)))
    text = exabgp.render(config, socket_path=tmp_path / "api.sock")
    tor = text[text.index("neighbor 192.0.2.1 {"):]
    for line in ("local-as 64600;", "peer-as 65001;", "graceful-restart 300;", "outgoing-ttl 255;",
                 "incoming-ttl 254;"):  # GTSM: 2 hops away
        assert line in tor, line
    assert "local-address" not in tor and "ttl" not in text[:text.index("neighbor 192.0.2.1 {")]
    conf = tmp_path / "exabgp.conf"
    conf.write_text(text)
    done = subprocess.run([str(EXABGP), "validate", "-n", str(conf)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_keys_come_from_files(tmp_path: Path) -> None:
    key = tmp_path / "tor.key"
    key.write_text("s3cr\"et #;{\n")
    assert read_key(str(key), "192.0.2.1") == 's3cr"et #;{'
    config = SpeakerConfig("n1", "10.0.0.1", "10.0.0.1", 64512, peers=(
        Peer("192.0.2.1", 65001, EXTERNAL, options=PeerOptions(password_file=str(key))),
        Peer("192.0.2.2", 65001, EXTERNAL, options=PeerOptions(password_file=str(tmp_path / "nope")))))
    resolved, problems = with_keys(config)
    assert [(p.address, p.password) for p in resolved.peers] == [("192.0.2.1", 's3cr"et #;{')]
    assert "cannot read the TCP-MD5 key file" in problems["192.0.2.2"]
    key.write_text("x" * 81)
    with pytest.raises(PasswordError, match="must be 1-80 bytes"):
        read_key(str(key), "192.0.2.1")


# -- validation -----------------------------------------------------------------------------------


def test_bgpfilter_kind_names() -> None:
    assert kind_named("bgpfilter").KIND == kind_named("BGPFilters").KIND == "BGPFilter"


@pytest.mark.parametrize("kind, spec, message", [
    ("BGPFilter", {"exportV4": [{"action": "Drop"}]}, "spec.exportV4[0].action 'Drop' must be Accept or Reject"),
    ("BGPFilter", {"exportV4": [{"action": "Reject", "cidr": "10.0.0.0/8"}]},
     "spec.exportV4[0]: cidr and matchOperator must be given together"),
    ("BGPFilter", {"importV4": [{"action": "Reject", "matchOperator": "Under", "cidr": "10.0.0.0/8"}]},
     "spec.importV4[0].matchOperator 'Under' must be one of Equal, NotEqual, In, NotIn"),
    ("BGPFilter", {"importV4": [{"action": "Reject", "matchOperator": "In", "cidr": "fd00::/8"}]},
     "spec.importV4[0].cidr 'fd00::/8' is not an IPv4 CIDR"),
    ("BGPFilter", {"exportV6": [{"action": "Reject", "matchOperator": "In", "cidr": "fd00::/8",
                                 "prefixLength": {"min": 64, "max": 129}}]},
     "spec.exportV6[0].prefixLength.max 129 is out of range (0-128)"),
    ("BGPFilter", {"exportV4": [{"action": "Reject", "matchOperator": "In", "cidr": "10.0.0.0/8",
                                 "prefixLength": {"min": 28, "max": 24}}]}, "min 28 is greater than max 24"),
    ("BGPFilter", {"exportV4": [{"action": "Reject", "prefixLength": {"min": 24}}]},
     "spec.exportV4[0].prefixLength needs cidr and matchOperator"),
    ("BGPFilter", {"exportV4": [{"action": "Reject", "source": "Everyone"}]}, "must be RemotePeers"),
    ("BGPConfiguration", {"communities": [{"name": "a", "value": "65536:1"}]},
     "spec.communities[0].value '65536:1' is not a community"),
    ("BGPConfiguration", {"communities": [{"name": "a", "value": "1:1"}, {"name": "a", "value": "1:2"}]},
     "spec.communities[1].name 'a' is defined twice"),
    ("BGPConfiguration", {"prefixAdvertisements": [{"cidr": "10.0.0.0/8", "communities": ["nope"]}]},
     "spec.prefixAdvertisements[0].communities[0] 'nope' is neither a community defined"),
    ("BGPConfiguration", {"serviceClusterIPs": [{"cidr": "10.96.0.0/12"}, {"cidr": "10.96.0.0/12"}]},
     "spec.serviceClusterIPs[1].cidr 10.96.0.0/12 is listed twice"),
    ("BGPConfiguration", {"serviceLoadBalancerIPs": [{}]}, "spec.serviceLoadBalancerIPs[0].cidr is required"),
    ("BGPPeer", {"peerIP": "192.0.2.1", "asNumber": 1, "localASNumber": 0}, "spec.localASNumber 0 is out of range"),
    ("BGPPeer", {"peerIP": "192.0.2.1", "asNumber": 1, "maxRestartTime": "soon"},
     "spec.maxRestartTime 'soon' is not a duration"),
    ("BGPPeer", {"peerIP": "192.0.2.1", "asNumber": 1, "maxRestartTime": "2h"}, "must be 1s to 4095s"),
    ("BGPPeer", {"peerIP": "192.0.2.1", "asNumber": 1, "sourceAddress": "Loopback"},
     "spec.sourceAddress 'Loopback' must be UseNodeIP or None"),
    ("BGPPeer", {"peerIP": "192.0.2.1", "asNumber": 1, "numAllowedLocalASNumbers": 11},
     "spec.numAllowedLocalASNumbers 11 must be 0-10"),
    ("BGPPeer", {"peerIP": "192.0.2.1", "asNumber": 1, "ttlSecurity": 255}, "spec.ttlSecurity 255 must be 0-254"),
    ("BGPPeer", {"peerIP": "192.0.2.1", "asNumber": 1, "keepOriginalNextHop": "maybe"},
     "spec.keepOriginalNextHop must be true or false"),
    ("BGPPeer", {"peerIP": "192.0.2.1", "asNumber": 1, "password": {"file": {"path": "tor.key"}}},
     "spec.password.file.path 'tor.key' must be an absolute path"),
    ("BGPPeer", {"peerIP": "192.0.2.1", "asNumber": 1, "filters": ["Bad_Name"]}, "spec.filters[0] 'Bad_Name'"),
])
def test_bad_documents_get_one_line_naming_the_field(kind: str, spec: dict[str, Any], message: str) -> None:
    error = rejected(kind, spec)
    assert message in error and "\n" not in error, error


class Store:
    def __init__(self, *resources: Resource) -> None:
        self.resources = resources

    def get(self, kind: Any, name: str, namespace: str | None = None) -> Resource | None:
        return next((r for r in self.resources if r.kind is kind and r.name == name), None)


def test_a_peer_must_name_existing_filters() -> None:
    tor = res("BGPPeer", "tor", {"peerIP": "192.0.2.1", "asNumber": 1, "filters": ["no-b"]})
    with pytest.raises(ValidationError, match="spec.filters names 'no-b', which is not a known BGPFilter"):
        check_references(tor, Store())
    check_references(tor, Store(res("BGPFilter", "no-b", {})))
    check_references(tor, Store(), [res("BGPFilter", "no-b", {})])


# -- a reflector applies the export filters of the session it reflects to ------------------------


def test_reflected_routes_pass_the_export_filters_of_the_receiving_session() -> None:
    from bgp.model import CLIENT
    from bgp.reflector import Received, Reflector

    me, n2, n3, n4 = "198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"
    remote_b = flt("remote-b", exportV4=[{"action": "Reject", "matchOperator": "In", "cidr": "10.245.0.0/16",
                                          "source": "RemotePeers"}])
    peers = [Peer(n2, 64512, CLIENT), Peer(n3, 64512, CLIENT, options=PeerOptions(filters=(remote_b,))),
             Peer(n4, 64512, CLIENT)]
    rr = Reflector(me, me, 64512)
    rr.set_peers(peers)
    for p in peers:
        rr.session_up(p.address, p.address)
    [command] = rr.update(n2, "10.245.2.0/26", Received(n2))
    assert command.startswith(f"neighbor {n4} announce route 10.245.2.0/26 ")  # n3's filter rejects it
    [command] = rr.update(n2, "10.244.2.0/26", Received(n2))
    assert command.startswith(f"neighbor {n3}, neighbor {n4} announce route 10.244.2.0/26 ")
    # The filter removed: n3 gets what it was refused.
    [command] = rr.set_peers([Peer(n2, 64512, CLIENT), Peer(n3, 64512, CLIENT), Peer(n4, 64512, CLIENT)])
    assert command.startswith(f"neighbor {n3} announce route 10.245.2.0/26 ")
