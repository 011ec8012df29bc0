"""The policy kinds (NetworkPolicy, GlobalNetworkPolicy, Profile): decoding, defaults, round trips,
and the validation messages that point at the field in error."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from datastore import codec
from datastore.errors import ValidationError
from datastore.model import Resource
from datastore.policy import (
    GlobalNetworkPolicy,
    NetworkPolicy,
    Profile,
    check_port,
    order_key,
    parse_port,
    protocol_number,
)
from datastore.resources import kind_named
from netctl.resources_cmd import table

VALID = """
apiVersion: tortie.dev/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  order: 100
  selector: app == 'web'
  types: [Ingress, Egress]
  ingress:
  - action: Allow
    protocol: TCP
    source:
      selector: role == 'lb'
      namespaceSelector: team in {'edge', 'ops'}
      nets: [10.0.0.0/8, 192.0.2.1]
      notNets: [10.9.0.0/16]
    destination:
      ports: [80, "8000:8080", http]
      notPorts: [8081]
  - action: Log
    protocol: ICMP
    icmp: {type: 8, code: 0}
  - action: Deny
    protocol: 47
    notProtocol: UDP
  - action: Pass
    ipVersion: 6
    protocol: ICMPv6
    notICMP: {type: 128}
    metadata: {annotations: {why: ping6}}
  egress:
  - action: Allow
    destination: {notSelector: "has(secret)", ports: [dns]}
  - action: Deny
    protocol: UDP
    destination: {nets: ["2001:db8::/32"], notPorts: ["1:1023"]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-egress-to-metadata}
spec:
  order: 0.5
  selector: all()
  namespaceSelector: tortie.dev/namespace starts with 'prod-'
  applyOnForward: true
  egress:
  - action: Deny
    destination: {nets: [169.254.169.254/32]}
  - action: Allow
    destination: {namespaceSelector: global()}
---
apiVersion: tortie.dev/v1
kind: Profile
metadata: {name: kns.shop}
spec:
  labelsToApply: {pcns.team: shop, pcns.tortie.dev/name: shop}
  ingress: [{action: Allow}]
  egress: [{action: Allow}]
"""


def load(text: str) -> list[Resource]:
    return [codec.decode(doc) for doc in codec.load_documents(textwrap.dedent(text))]


def test_each_kind_decodes_with_typed_fields() -> None:
    np, gnp, profile = load(VALID)
    assert (np.kind, gnp.kind, profile.kind) == (NetworkPolicy, GlobalNetworkPolicy, Profile)
    assert (np.namespace, gnp.namespace, profile.namespace) == ("shop", None, None)

    assert np.spec.order == 100 and np.spec.selector == "app == 'web'"
    allow, log, deny, pass_ = np.spec.ingress
    assert allow.action == "Allow" and allow.protocol == "TCP"
    assert allow.source.nets == ["10.0.0.0/8", "192.0.2.1/32"] and allow.source.not_nets == ["10.9.0.0/16"]
    assert allow.source.namespace_selector == "team in {'edge', 'ops'}"
    assert allow.destination.ports == [80, "8000:8080", "http"] and allow.destination.not_ports == [8081]
    assert (log.icmp.type, log.icmp.code) == (8, 0)
    assert (deny.protocol, deny.not_protocol) == (47, "UDP")
    assert pass_.ip_version == 6 and pass_.not_icmp.type == 128 and pass_.metadata.annotations == {"why": "ping6"}
    assert np.spec.egress[0].destination.not_selector == "has(secret)"

    assert gnp.spec.order == 0.5 and gnp.spec.types == ["Egress"]
    assert gnp.spec.namespace_selector == "tortie.dev/namespace starts with 'prod-'"
    assert gnp.spec.egress[1].destination.namespace_selector == "global()"
    assert profile.spec.labels_to_apply == {"pcns.team": "shop", "pcns.tortie.dev/name": "shop"}


def test_values_are_made_canonical() -> None:
    (np,) = load("""
        apiVersion: tortie.dev/v1
        kind: NetworkPolicy
        metadata: {name: p}
        spec:
          selector: "  "
          types: [ingress]
          ingress:
          - action: allow
            protocol: udplite
            source: {nets: [10.1.2.3/16, 10.2.0.1]}
          - {action: deny, protocol: "6", destination: {ports: ["443"]}}
        """)
    assert np.namespace == "default" and np.spec.selector == "all()" and np.spec.types == ["Ingress"]
    first, second = np.spec.ingress
    assert (first.action, first.protocol, first.source.nets) == ("Allow", "UDPLite", ["10.1.0.0/16", "10.2.0.1/32"])
    assert (second.action, second.protocol, second.destination.ports) == ("Deny", 6, [443])


@pytest.mark.parametrize(("rules", "types"), [
    ("{}", ["Ingress"]),
    ("{ingress: [{action: Allow}]}", ["Ingress"]),
    ("{egress: [{action: Allow}]}", ["Egress"]),
    ("{ingress: [{action: Allow}], egress: [{action: Deny}]}", ["Ingress", "Egress"]),
    ("{types: [Egress, Ingress]}", ["Egress", "Ingress"]),
])
def test_types_default_as_calico_does(rules: str, types: list[str]) -> None:
    (gnp,) = load(f"{{apiVersion: tortie.dev/v1, kind: GlobalNetworkPolicy, metadata: {{name: p}}, spec: {rules}}}")
    assert gnp.spec.types == types
    assert gnp.spec.order is None
    assert all(gnp.spec.applies_to(t) for t in types)


def test_round_trip_through_to_dict() -> None:
    for resource in load(VALID):
        doc = resource.to_dict()
        again = codec.decode(doc)
        assert again == resource
        assert again.to_dict() == doc
        assert codec.from_stored(codec.stored_bytes(resource), 7, "k").spec == resource.spec


def test_integral_order_stays_integral_and_booleans_stay_out() -> None:
    (np,) = load("{apiVersion: tortie.dev/v1, kind: GlobalNetworkPolicy, metadata: {name: p}, spec: {order: 10}}")
    assert np.to_dict()["spec"] == {"order": 10, "selector": "all()", "types": ["Ingress"]}


@pytest.mark.parametrize(("name", "kind"), [
    ("NetworkPolicy", NetworkPolicy), ("networkpolicy", NetworkPolicy), ("networkpolicies", NetworkPolicy),
    ("netpol", NetworkPolicy), ("np", NetworkPolicy), ("policy", NetworkPolicy),
    ("GlobalNetworkPolicy", GlobalNetworkPolicy), ("gnp", GlobalNetworkPolicy),
    ("globalnetworkpolicies", GlobalNetworkPolicy), ("GNP", GlobalNetworkPolicy),
    ("profile", Profile), ("profiles", Profile), ("pro", Profile),
])
def test_kinds_are_registered_under_calicos_names(name: str, kind: type) -> None:
    assert kind_named(name) is kind


def test_table_columns() -> None:
    np, gnp, profile = load(VALID)
    assert table(NetworkPolicy, [np]) == (
        ["NAMESPACE", "NAME", "ORDER", "SELECTOR", "TYPES"], [["shop", "allow-web", "100", "app == 'web'",
                                                               "Ingress,Egress"]])
    headers, rows = table(GlobalNetworkPolicy, [gnp], wide=True)
    assert headers[-1] == "NAMESPACESELECTOR" and rows[0][1:4] == ["0.5", "all()", "Egress"]
    assert table(Profile, [profile])[1] == [["kns.shop", '{"pcns.team":"shop","pcns.tortie.dev/name":"shop"}']]


def test_order_key_puts_unordered_last_and_breaks_ties_by_name() -> None:
    def policy(name: str, order: str, kind: str = "NetworkPolicy") -> Resource:
        spec = f"{{order: {order}}}" if order else "{}"
        return load(f"{{apiVersion: tortie.dev/v1, kind: {kind}, metadata: {{name: {name}}}, spec: {spec}}}")[0]

    policies = [policy("z", ""), policy("b", "10"), policy("a", "10"), policy("c", "2.5"),
                policy("g", "10", "GlobalNetworkPolicy")]
    assert [p.name for p in sorted(policies, key=order_key)] == ["c", "a", "b", "g", "z"]


def test_port_and_protocol_helpers() -> None:
    assert [parse_port(p) for p in (80, "80:90", "http")] == [(80, 80), (80, 90), "http"]
    assert [protocol_number(p) for p in ("TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite", 47)] == \
        [6, 17, 1, 58, 132, 136, 47]
    assert check_port("1:65535", "p") == "1:65535"
    with pytest.raises(ValidationError, match=r"^p: 0 is out of range"):
        check_port(0, "p")


# --- Invalid documents: (kind, spec, expected message fragment) ------------------------------

INVALID: list[tuple[str, str, str]] = [
    ("NetworkPolicy", "{ingress: [{action: Allow, destination: {ports: [http]}}, {action: Allow, protocol: TCP, "
     "destination: {ports: [70000]}}]}", "spec.ingress[1].destination.ports[0]: 70000 is out of range"),
    ("NetworkPolicy", "{ingress: [{protocol: TCP}]}", "spec.ingress[0].action is required"),
    ("NetworkPolicy", "{ingress: [{action: Permit}]}", "spec.ingress[0].action 'Permit' must be one of Allow, Deny"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: HTTP}]}", "spec.ingress[0].protocol 'HTTP' must be one"),
    ("NetworkPolicy", "{egress: [{action: Allow, protocol: 256}]}", "spec.egress[0].protocol: 256 is out of range"),
    ("NetworkPolicy", "{egress: [{action: Allow, notProtocol: 0}]}", "spec.egress[0].notProtocol: 0 is out of range"),
    ("NetworkPolicy", "{ingress: [{action: Allow, ipVersion: 5}]}", "spec.ingress[0].ipVersion 5 must be 4 or 6"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: TCP, icmp: {type: 8}}]}",
     "spec.ingress[0].icmp needs protocol ICMP or ICMPv6"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: ICMP, icmp: {code: 1}}]}",
     "spec.ingress[0].icmp.type is required"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: ICMP, notICMP: {type: 255}}]}",
     "spec.ingress[0].notICMP.type 255 is out of range (0-254)"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: ICMP, icmp: {type: 3, code: 256}}]}",
     "spec.ingress[0].icmp.code 256 is out of range"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: ICMPv6, ipVersion: 4}]}",
     "spec.ingress[0].ipVersion 4 does not match protocol ICMPv6"),
    ("NetworkPolicy", "{ingress: [{action: Allow, destination: {ports: [80]}}]}",
     "spec.ingress[0].destination.ports: port numbers and ranges need protocol TCP, UDP, SCTP or UDPLite"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: ICMP, source: {notPorts: [http]}}]}",
     "spec.ingress[0].source.notPorts: protocol ICMP has no ports"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: TCP, destination: {ports: ['90:80']}}]}",
     "spec.ingress[0].destination.ports[0]: range '90:80' is backwards"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: TCP, destination: {ports: ['1:70000']}}]}",
     "spec.ingress[0].destination.ports[0]: 70000 in range '1:70000' is out of range"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: TCP, destination: {notPorts: [Web_Port]}}]}",
     "spec.ingress[0].destination.notPorts[0]: 'Web_Port' is not a port"),
    ("NetworkPolicy", "{ingress: [{action: Allow, protocol: TCP, destination: {ports: [80-90]}}]}",
     "spec.ingress[0].destination.ports[0]: '80-90' is not a port"),
    ("NetworkPolicy", "{ingress: [{action: Allow, source: {nets: [10.0.0.0/33]}}]}",
     "spec.ingress[0].source.nets[0] '10.0.0.0/33' is not a CIDR"),
    ("NetworkPolicy", "{ingress: [{action: Allow, source: {notNets: [0.0.0.0/0]}}]}",
     "spec.ingress[0].source.notNets[0] 0.0.0.0/0 matches every address"),
    ("NetworkPolicy", "{ingress: [{action: Allow, source: {nets: [10.0.0.0/8]}, destination: {nets: ['fd00::/8']}}]}",
     "spec.ingress[0].destination.nets: the rule mixes IPv4 and IPv6"),
    ("NetworkPolicy", "{ingress: [{action: Allow, ipVersion: 6, source: {nets: [10.0.0.0/8]}}]}",
     "spec.ingress[0].source.nets has an IPv4 CIDR but ipVersion is 6"),
    ("NetworkPolicy", "{selector: app = 'web'}", "spec.selector: bad selector \"app = 'web'\": expected an operator"),
    ("NetworkPolicy", "{ingress: [{action: Allow, source: {selector: \"has(app\"}}]}",
     "spec.ingress[0].source.selector: bad selector"),
    ("NetworkPolicy", "{egress: [{action: Allow, destination: {notSelector: \"a in {'x'\"}}]}",
     "spec.egress[0].destination.notSelector: bad selector"),
    ("NetworkPolicy", "{ingress: [{action: Allow, source: {namespaceSelector: \"global() && a == 'b'\"}}]}",
     "spec.ingress[0].source.namespaceSelector: global() can only be used, on its own"),
    ("NetworkPolicy", "{ingress: [{action: Allow, source: {selector: global()}}]}",
     "spec.ingress[0].source.selector: global() can only be used"),
    ("NetworkPolicy", "{types: [Ingress, Forward]}", "spec.types[1] 'Forward' must be one of Ingress, Egress"),
    ("NetworkPolicy", "{types: [Egress, Egress]}", "spec.types lists Egress more than once"),
    ("NetworkPolicy", "{types: [Ingress], egress: [{action: Deny}]}",
     "spec.egress has rules but spec.types does not include Egress"),
    ("NetworkPolicy", "{order: high}", "spec.order must be a number"),
    ("NetworkPolicy", "{order: .nan}", "spec.order must be a finite number"),
    ("NetworkPolicy", "{tier: security}", "spec.tier 'security': Tortie has only the default tier"),
    ("NetworkPolicy", "{ingres: []}", "spec has no field 'ingres'"),
    ("NetworkPolicy", "{namespaceSelector: all()}", "spec has no field 'namespaceSelector'"),
    ("NetworkPolicy", "{ingress: [{action: Allow, source: {serviceAccounts: {names: [a]}}}]}",
     "spec.ingress[0].source.serviceAccounts is not supported by Tortie"),
    ("NetworkPolicy", "{ingress: [{action: Allow, http: {methods: [GET]}}]}", "spec.ingress[0].http is not supported"),
    ("NetworkPolicy", "{ingress: [{action: Allow, source: {port: 80}}]}", "spec.ingress[0].source has no field 'port'"),
    ("NetworkPolicy", "{ingress: {action: Allow}}", "spec.ingress must be a list"),
    ("NetworkPolicy", "{serviceAccountSelector: \"x == 'y'\"}", "spec.serviceAccountSelector is not supported"),
    ("GlobalNetworkPolicy", "{doNotTrack: true}", "spec.doNotTrack needs applyOnForward: true"),
    ("GlobalNetworkPolicy", "{preDNAT: true}", "spec.preDNAT needs applyOnForward: true"),
    ("GlobalNetworkPolicy", "{namespaceSelector: 'team =='}", "spec.namespaceSelector: bad selector"),
    ("Profile", "{labelsToApply: {'bad key!': x}}", "spec.labelsToApply: 'bad key!' is not a valid label key"),
    ("Profile", "{order: 1}", "spec has no field 'order'"),
    ("Profile", "{ingress: [{action: Allow, protocol: UDP, destination: {ports: [0]}}]}",
     "spec.ingress[0].destination.ports[0]: 0 is out of range"),
]


@pytest.mark.parametrize(("kind", "spec", "message"), INVALID, ids=[m[:60] for _, _, m in INVALID])
def test_invalid_documents_name_the_field(kind: str, spec: str, message: str) -> None:
    doc: dict[str, Any] = next(codec.load_documents(
        f"{{apiVersion: tortie.dev/v1, kind: {kind}, metadata: {{name: p}}, spec: {spec}}}"))
    with pytest.raises(ValidationError) as error:
        codec.decode(doc)
    assert message in str(error.value)


def test_global_network_policy_is_not_namespaced() -> None:
    with pytest.raises(ValidationError, match="GlobalNetworkPolicy is not namespaced"):
        load("{apiVersion: tortie.dev/v1, kind: GlobalNetworkPolicy, metadata: {name: p, namespace: x}}")
