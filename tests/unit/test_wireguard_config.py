"""WireGuard without a kernel: the key file (made once, 0600, survives restarts, never in the Node
document but its public half), FelixConfiguration documents (defaults, node over default, the
messages that name a bad field), the peers the calculation derives, and the generic netlink codec."""

from __future__ import annotations

import base64
import ipaddress
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datastore import codec, keys
from datastore.errors import ValidationError
from datastore.felixconfig import FelixConfiguration, FelixConfigurationSpec
from datastore.model import Metadata, Resource
from datastore.resources import Node, NodeBGPSpec, NodeSpec, NodeStatus, kind_named
from felix_agent.calc.settings import resolve
from felix_agent.calc.snapshot import BLOCK, Snapshot, Update
from felix_agent.calc.wireguard import WireGuardState, wireguard
from felix_agent.wireguard_key import KEY_FILE, KeyFileError, load_or_create, public_key
from ipam.block import Allocation, Block
from kernel import wireguard as kwg
from kernel.netlink import attrs


def test_the_key_is_made_once_kept_0600_and_read_back(tmp_path: Path) -> None:
    first = load_or_create(tmp_path / "state")
    path = tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create(tmp_path / "state")
    assert again.private == first.private and again.public == first.public
    assert public_key(first.private) == first.public and len(first.public) == 32
    assert base64.b64encode(first.private).decode() not in repr(first)
    path.unlink()  # rotation: remove the file, restart
    assert load_or_create(tmp_path / "state").public != first.public


def test_a_corrupt_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("not a key\n")
    with pytest.raises(KeyFileError, match="remove it to make a new one"):
        load_or_create(tmp_path)


def test_the_node_document_carries_the_public_key_only(tmp_path: Path) -> None:
    pair = load_or_create(tmp_path)
    node = Resource(Node, Metadata(name="n1"), NodeSpec(bgp=NodeBGPSpec(ipv4_address="10.9.1.11/24")),
                    NodeStatus(wireguard_public_key=pair.public_b64))
    stored = codec.stored_bytes(node)
    assert json.loads(stored)["status"] == {"wireguardPublicKey": pair.public_b64}
    assert base64.b64encode(pair.private) not in stored
    back = codec.from_stored(stored, 7, "/tortie/resources/v3/nodes/n1")
    assert back.status.wireguard_public_key == pair.public_b64


def doc(spec: dict[str, Any], name: str = "default") -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration", "metadata": {"name": name},
            "spec": spec}


def test_felixconfiguration_defaults_and_node_over_default() -> None:
    assert kind_named("felixconfig") is FelixConfiguration
    default = codec.decode(doc({"wireguardEnabled": True, "wireguardListeningPort": 51821})).spec
    node = codec.decode(doc({"wireguardListeningPort": 51999, "wireguardMTU": 1400}, "node.n1")).spec
    merged = resolve(default, node, "n1").spec
    assert merged.wireguard_enabled is True
    assert merged.wireguard_listening_port == 51999 and merged.wireguard_mtu == 1400
    assert merged.wireguard_routing_rule_priority == 99
    assert merged.wireguard_interface_name == "wg.tortie"
    assert resolve(None, None, "n1").spec.wireguard_enabled is False
    assert codec.to_document(codec.decode(doc({"wireguardMTU": 1400})))["spec"] == {"wireguardMTU": 1400}


@pytest.mark.parametrize(("spec", "message"), [
    ({"wireguardListeningPort": 0}, "wireguardListeningPort 0 is out of range"),
    ({"wireguardMTU": 500}, "wireguardMTU 500"),
    ({"wireguardRoutingRulePriority": 32766}, "wireguardRoutingRulePriority"),
    ({"wireguardRoutingTableIndex": 254}, r"main \(254\)"),
    ({"wireguardInterfaceName": "a/b"}, "wireguardInterfaceName"),
    ({"wireguardEnabled": "yes"}, "wireguardEnabled"),
    ({"wireguardColour": 1}, "no field 'wireguardColour'"),
])
def test_bad_felixconfiguration_fields_are_named(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        codec.decode(doc(spec))


def node(name: str, ip: str, key: str = "") -> Resource:
    return Resource(Node, Metadata(name=name), NodeSpec(bgp=NodeBGPSpec(ipv4_address=ip)), NodeStatus(key) if key
                    else None)


def test_peers_are_the_nodes_with_keys_carrying_their_blocks_and_borrowed_addresses(tmp_path: Path) -> None:
    k2 = base64.b64encode(bytes(range(32))).decode()
    k3 = base64.b64encode(bytes(range(1, 33))).decode()
    b1 = Block.empty(ipaddress.ip_network("10.244.1.0/26"), "n1")
    b1 = Block(b1.cidr, b1.affinity, {5: Allocation("h", 1, {"node": "n3"})}, b1.free)
    b2 = Block.empty(ipaddress.ip_network("10.244.2.0/26"), "n2")
    b4 = Block.empty(ipaddress.ip_network("10.244.4.0/26"), "n4")  # n4: no key, no peer (stays on the overlay)
    config = Resource(FelixConfiguration, Metadata(name="default"), FelixConfigurationSpec(wireguard_enabled=True))
    snap = Snapshot.of([config, node("n1", "10.9.1.11/24"), node("n2", "10.9.1.12/24", k2),
                        node("n3", "10.9.2.13/24", k3), node("n4", "10.9.2.14/24")], [b1, b2, b4])
    wg = wireguard(snap, "n1")
    assert wg.enabled and wg.listen_port == 51820 and wg.rule_priority == 99
    assert {(p.node, p.endpoint, p.allowed_ips) for p in wg.peers} == {
        ("n2", "10.9.1.12:51820", ("10.244.2.0/26",)), ("n3", "10.9.2.13:51820", ("10.244.1.5/32",))}
    off = Resource(FelixConfiguration, Metadata(name="node.n1"), FelixConfigurationSpec(wireguard_enabled=False))
    assert not wireguard(Snapshot.of([config, off, node("n2", "10.9.1.12/24", k2)], [b2]), "n1").enabled


def test_borrowed_addresses_of_non_peers_inside_a_peers_block_get_throw_routes() -> None:
    k2 = base64.b64encode(bytes(range(32))).decode()
    b2 = Block.empty(ipaddress.ip_network("10.244.2.0/26"), "n2")
    b2 = Block(b2.cidr, b2.affinity, {7: Allocation("mine", 1, {"node": "n1"}),  # n1's own pod
                                      8: Allocation("keyless", 1, {"node": "n4"}),  # n4 has no key
                                      9: Allocation("n2s", 1, {"node": "n2"})}, b2.free)
    b4 = Block.empty(ipaddress.ip_network("10.244.4.0/26"), "n4")
    b4 = Block(b4.cidr, b4.affinity, {3: Allocation("peer", 1, {"node": "n2"})}, b4.free)
    config = Resource(FelixConfiguration, Metadata(name="default"), FelixConfigurationSpec(wireguard_enabled=True))
    snap = Snapshot.of([config, node("n1", "10.9.1.11/24"), node("n2", "10.9.1.12/24", k2),
                        node("n4", "10.9.2.14/24")], [b2, b4])
    wg = wireguard(snap, "n1")
    assert {(p.node, p.allowed_ips) for p in wg.peers} == {("n2", ("10.244.2.0/26", "10.244.4.3/32"))}
    # n1's pod and n4's pod sit in n2's block but must not be sent to n2 through the tunnel.
    assert wg.throw == ("10.244.2.7/32", "10.244.2.8/32")


def test_the_set_device_message_round_trips_through_the_parser() -> None:
    peer = kwg.Peer(bytes(range(32)), "10.9.1.12:51820", ("10.244.2.0/26", "10.244.1.5/32"), 25)
    parsed = kwg.parse_peer(kwg.peer_attrs(peer))
    assert parsed.public_key == peer.public_key and parsed.endpoint == peer.endpoint
    assert parsed.allowed_ips == peer.allowed_ips and parsed.keepalive == 25
    rule = kwg.MarkRule(99, 1, 0x100000, 0x100000, invert=True)
    body = kwg._rule_body(rule)
    found = attrs(body, kwg._RULE.size)
    assert found[kwg.FRA_FWMARK] == (0x100000).to_bytes(4, "little")


# ---- the agent's WireGuard part, worked out again only when its inputs move ----
KEYS = {"n2": base64.b64encode(bytes(range(32))).decode(), "n3": base64.b64encode(bytes(range(1, 33))).decode()}
wg_nodes = st.builds(lambda name, keyed, subnet: node(name, f"10.9.{subnet}.{name[1:]}/24", KEYS.get(name, "") if keyed
                                                      else ""),
                     st.sampled_from(["n1", "n2", "n3", "n4"]), st.booleans(), st.integers(1, 2))
wg_blocks = st.builds(lambda cidr, owner, held: Block(ipaddress.ip_network(cidr), f"host:{owner}" if owner else None,
                                                      {o: Allocation(f"h{o}", 1, {"node": h}) for o, h in held.items()},
                                                      ()),
                      st.sampled_from(["10.244.1.0/26", "10.244.2.0/26", "fd00:244::/122"]),
                      st.sampled_from(["n1", "n2", "n3", None]),
                      st.dictionaries(st.integers(1, 5), st.sampled_from(["n1", "n2", "n3", "n4"]), max_size=3))
wg_configs = st.builds(lambda on, port: Resource(FelixConfiguration, Metadata(name="default"), FelixConfigurationSpec(
    wireguard_enabled=on, wireguard_listening_port=port)), st.booleans(), st.sampled_from([None, 51821]))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "put", "delete"]), st.one_of(wg_nodes, wg_blocks, wg_configs)),
                min_size=1, max_size=20))
def test_the_agents_wireguard_state_is_the_one_computed_from_nothing(changes: list[tuple[str, Any]]) -> None:
    """Blocks that change owner, lend and take back addresses (or only assign their owner's), nodes
    that publish or clear keys, WireGuard turned on and off: the state kept between views answers
    what ``wireguard`` answers from nothing, and hands on the same object while nothing it reads moved."""
    state = WireGuardState()
    snap = Snapshot.of()
    last = state.wireguard(snap, "n1", [])
    for op, value in changes:
        if isinstance(value, Block):
            kind, key = BLOCK, keys.block_key(value.cidr)
        else:
            kind, key = value.kind.KIND, next(iter(Snapshot.of([value]).tables[value.kind.KIND]))
        snap.apply(Update(kind, key, value if op == "put" else None))
        got = state.wireguard(snap, "n1", [])
        assert got == wireguard(snap, "n1", [])
        last = got
    assert state.wireguard(snap, "n1", []) is last  # the same view again: the same object
