"""BGPConfiguration and BGPPeer documents: names, defaults, canonical values, and the messages that
name the field of a bad one; a reflector cluster ID on a Node; references to unknown nodes."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from datastore import codec
from datastore.bgp import BGPConfiguration, BGPPeer
from datastore.errors import ValidationError
from datastore.model import Kind, Resource
from datastore.references import check_references
from datastore.resources import Node, kind_named


def doc(kind: str, spec: dict[str, Any], name: str = "x") -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name}, "spec": spec}


def decode(kind: str, spec: dict[str, Any], name: str = "x") -> Resource:
    return codec.decode(doc(kind, spec, name))


def rejected(kind: str, spec: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as e:
        decode(kind, spec)
    return str(e.value)


@pytest.mark.parametrize("name, kind", [
    ("BGPConfiguration", BGPConfiguration), ("bgpconfig", BGPConfiguration), ("bgpconfiguration", BGPConfiguration),
    ("BGPConfigurations", BGPConfiguration), ("bgppeer", BGPPeer), ("BGPPeers", BGPPeer), ("BGPPeer", BGPPeer)])
def test_kind_names(name: str, kind: type[Kind]) -> None:
    assert kind_named(name) is kind


def test_bgp_configuration_defaults_and_round_trip() -> None:
    r = decode("BGPConfiguration", {}, "default")
    assert (r.spec.asn, r.spec.node_to_node_mesh_enabled, r.spec.listen_port) == (None, True, 179)
    r = decode("BGPConfiguration", {"asNumber": 64513, "nodeToNodeMeshEnabled": False, "listenPort": 1179,
                                    "logSeverityScreen": "Info"}, "default")
    assert (r.spec.asn, r.spec.node_to_node_mesh_enabled, r.spec.listen_port) == (64513, False, 1179)
    again = codec.from_stored(codec.stored_bytes(r), 7, "/k")
    assert again.spec == r.spec


@pytest.mark.parametrize("given, asn", [(64512, 64512), ("64512", 64512), ("1.10", 65546), ("0.1", 1),
                                        (4294967295, 4294967295), ("65535.65535", 4294967295)])
def test_as_numbers_plain_and_asdot(given: Any, asn: int) -> None:
    assert decode("BGPConfiguration", {"asNumber": given}).spec.as_number == asn
    assert decode("BGPPeer", {"peerIP": "10.0.0.1", "asNumber": given}).spec.asn == asn


def test_valid_peers() -> None:
    tor = decode("BGPPeer", {"peerIP": "192.0.2.1:1790", "asNumber": 65000, "node": "node-1",
                             "password": {"file": {"path": "/etc/tortie/tor.key"}},
                             "keepOriginalNextHop": True}).spec
    assert (tor.address(), tor.is_global) == ((ipaddress.ip_address("192.0.2.1"), 1790), False)
    v6 = decode("BGPPeer", {"peerIP": "[FD00:0::1]:179", "asNumber": 65000}).spec
    assert v6.peer_ip == "[fd00::1]:179" and v6.is_global
    rr = decode("BGPPeer", {"nodeSelector": "all()", "peerSelector": " route-reflector == 'true' "}).spec
    assert (rr.peer_selector, rr.peer_ip, rr.asn, rr.address()) == ("route-reflector == 'true'", None, None, None)
    # A document read back from etcd is the same peer.
    r = decode("BGPPeer", {"peerIP": "fd00::1", "asNumber": "1.10"})
    assert codec.from_stored(codec.stored_bytes(r), 3, "/k").spec == r.spec


@pytest.mark.parametrize("kind, spec, message", [
    ("BGPConfiguration", {"asNumber": 0}, "spec.asNumber 0 is out of range (1-4294967295)"),
    ("BGPConfiguration", {"asNumber": 4294967296}, "spec.asNumber 4294967296 is out of range"),
    ("BGPConfiguration", {"asNumber": "65536.1"}, "spec.asNumber '65536.1': both halves"),
    ("BGPConfiguration", {"asNumber": 1.1}, "write asdot numbers quoted ('1.10')"),
    ("BGPConfiguration", {"asNumber": "big"}, "spec.asNumber 'big' is not an AS number"),
    ("BGPConfiguration", {"listenPort": 70000}, "spec.listenPort 70000 is out of range"),
    ("BGPConfiguration", {"serviceClusterIPs": [{"cidr": "10.96.0.0/99"}]},
     "spec.serviceClusterIPs[0].cidr '10.96.0.0/99' is not a CIDR"),
    ("BGPPeer", {"peerIP": "10.0.0.1", "asNumber": -5}, "spec.asNumber -5 is out of range"),
    ("BGPPeer", {"peerIP": "10.0.0.300", "asNumber": 65000}, "spec.peerIP '10.0.0.300' is not an IP address"),
    ("BGPPeer", {"peerIP": "router.example", "asNumber": 65000}, "spec.peerIP 'router.example' is not an IP"),
    ("BGPPeer", {"peerIP": "10.0.0.1:99999", "asNumber": 65000}, "port 99999 is out of range"),
    ("BGPPeer", {"peerIP": "fd00::1:179x", "asNumber": 65000}, "is not an IP address"),
    ("BGPPeer", {"peerIP": "0.0.0.0", "asNumber": 65000}, "cannot be a BGP peer"),
    ("BGPPeer", {"peerIP": "10.0.0.1"}, "spec.asNumber is required with peerIP"),
    ("BGPPeer", {"asNumber": 65000}, "spec: one of peerIP or peerSelector is required"),
    ("BGPPeer", {"node": "n1", "nodeSelector": "all()", "peerIP": "10.0.0.1", "asNumber": 65000},
     "spec: node and nodeSelector cannot both be set"),
    ("BGPPeer", {"peerIP": "10.0.0.1", "peerSelector": "all()"}, "spec: peerIP and peerSelector cannot both be set"),
    ("BGPPeer", {"peerSelector": "all()", "asNumber": 65000}, "spec.asNumber must not be set with peerSelector"),
    ("BGPPeer", {"peerSelector": "rr == "}, "spec.peerSelector:"),
    ("BGPPeer", {"nodeSelector": "has(", "peerIP": "10.0.0.1", "asNumber": 1}, "spec.nodeSelector:"),
    ("BGPPeer", {"node": "Node_1", "peerIP": "10.0.0.1", "asNumber": 1}, "spec.node 'Node_1' is not a valid name"),
    ("BGPPeer", {"peerIP": "10.0.0.1", "asNumber": 1, "password": "s3cret"},
     "spec.password must not hold the key itself (it would be stored in etcd)"),
    ("BGPPeer", {"peerIP": "10.0.0.1", "asNumber": 1, "password": {"secretKeyRef": {"name": "s", "key": "k"}}},
     "spec.password.secretKeyRef is not supported"),
    ("Node", {"bgp": {"ipv4Address": "10.0.0.1/24", "routeReflectorClusterID": "rr-1"}},
     "spec.bgp.routeReflectorClusterID 'rr-1' must be an IPv4 address"),
    ("Node", {"bgp": {"ipv4Address": "10.0.0.1/24", "asNumber": 4294967296}}, "spec.bgp.asNumber 4294967296 is out"),
])
def test_invalid_documents_name_the_field(kind: str, spec: dict[str, Any], message: str) -> None:
    assert message in rejected(kind, spec)


class FakeStore:
    def __init__(self, *nodes: str) -> None:
        self.nodes = set(nodes)

    def get(self, kind: type[Kind], name: str, namespace: str | None = None) -> Resource | None:
        assert kind is Node
        return decode("Node", {}, name) if name in self.nodes else None


def test_a_peer_must_name_a_known_node() -> None:
    peer = decode("BGPPeer", {"node": "node-9", "peerIP": "10.0.0.1", "asNumber": 65000}, "tor")
    with pytest.raises(ValidationError, match=r"BGPPeer tor: spec.node 'node-9' is not a known node"):
        check_references(peer, FakeStore("node-1"))
    check_references(peer, FakeStore("node-9"))
    # ... or a node created by the same file.
    check_references(peer, FakeStore(), [decode("Node", {}, "node-9")])
    # Peers without a node, and other kinds, name nothing.
    check_references(decode("BGPPeer", {"peerIP": "10.0.0.1", "asNumber": 1}), FakeStore())
    check_references(decode("Node", {}, "n"), FakeStore())
