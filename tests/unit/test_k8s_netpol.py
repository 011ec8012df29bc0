"""Kubernetes NetworkPolicy → Tortie NetworkPolicy, on the examples of the Kubernetes documentation
(https://kubernetes.io/docs/concepts/services-networking/network-policies/)."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from datastore import codec
from datastore.errors import ValidationError
from datastore.k8s_netpol import is_k8s_netpol, translate
from datastore.policy import NetworkPolicy
from datastore.selector import parse


def k8s(text: str) -> dict[str, Any]:
    doc: dict[str, Any] = next(codec.load_documents(textwrap.dedent(text)))
    return doc


def spec_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The Tortie spec a Kubernetes policy translates to, as a document."""
    resource = translate(doc)
    # The translation is a valid Tortie resource: it survives the Tortie codec unchanged.
    assert codec.decode(resource.to_dict()) == resource
    spec: dict[str, Any] = resource.to_dict()["spec"]
    return spec


def policy(spec: str, name: str = "p") -> dict[str, Any]:
    """A Kubernetes NetworkPolicy in namespace shop with ``spec`` (YAML)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "shop"}, "spec": k8s(spec)}


TEST_NETWORK_POLICY = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata:
      name: test-network-policy
      namespace: default
    spec:
      podSelector:
        matchLabels:
          role: db
      policyTypes:
      - Ingress
      - Egress
      ingress:
      - from:
        - ipBlock:
            cidr: 172.17.0.0/16
            except:
            - 172.17.1.0/24
        - namespaceSelector:
            matchLabels:
              project: myproject
        - podSelector:
            matchLabels:
              role: frontend
        ports:
        - protocol: TCP
          port: 6379
      egress:
      - to:
        - ipBlock:
            cidr: 10.0.0.0/24
        ports:
        - protocol: TCP
          port: 5978
    """


def test_the_documentations_test_network_policy() -> None:
    doc = k8s(TEST_NETWORK_POLICY)
    assert is_k8s_netpol(doc)
    resource = translate(doc)
    assert resource.kind is NetworkPolicy
    assert (resource.namespace, resource.name) == ("default", "knp.default.test-network-policy")
    redis = {"ports": [6379]}
    assert resource.to_dict()["spec"] == {
        "order": 1000,
        "selector": 'role == "db"',
        "types": ["Ingress", "Egress"],
        "ingress": [
            {"action": "Allow", "protocol": "TCP", "destination": redis,
             "source": {"nets": ["172.17.0.0/16"], "notNets": ["172.17.1.0/24"]}},
            {"action": "Allow", "protocol": "TCP", "destination": redis,
             "source": {"selector": "all()", "namespaceSelector": 'project == "myproject"'}},
            {"action": "Allow", "protocol": "TCP", "destination": redis,
             "source": {"selector": 'role == "frontend"'}},
        ],
        "egress": [
            {"action": "Allow", "protocol": "TCP", "destination": {"nets": ["10.0.0.0/24"], "ports": [5978]}},
        ],
    }
    # The selectors select what the documentation says they do.
    assert parse(resource.spec.selector).matches({"role": "db"})
    assert not parse(resource.spec.selector).matches({"role": "frontend"})


def test_default_deny_ingress() -> None:
    resource = translate(policy("{podSelector: {}}", "default-deny-ingress"))
    assert (resource.namespace, resource.name) == ("shop", "knp.default.default-deny-ingress")
    assert spec_of(policy("{podSelector: {}, policyTypes: [Ingress]}", "default-deny-ingress")) == {
        "order": 1000, "selector": "all()", "types": ["Ingress"]}


def test_allow_all_ingress() -> None:
    assert spec_of(policy("{podSelector: {}, ingress: [{}], policyTypes: [Ingress]}")) == {
        "order": 1000, "selector": "all()", "types": ["Ingress"], "ingress": [{"action": "Allow"}]}


def test_default_deny_egress() -> None:
    assert spec_of(policy("{podSelector: {}, policyTypes: [Egress]}")) == {
        "order": 1000, "selector": "all()", "types": ["Egress"]}


def test_allow_all_egress() -> None:
    assert spec_of(policy("{podSelector: {}, egress: [{}], policyTypes: [Egress]}"))["egress"] == [
        {"action": "Allow"}]


def test_default_deny_all_ingress_and_egress() -> None:
    assert spec_of(policy("{podSelector: {}, policyTypes: [Ingress, Egress]}"))["types"] == ["Ingress", "Egress"]


def test_end_port_makes_a_range() -> None:
    spec = spec_of(policy("""
          podSelector: {matchLabels: {role: db}}
          policyTypes: [Egress]
          egress:
          - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
            ports: [{protocol: TCP, port: 32000, endPort: 32768}]
        """))
    assert spec["egress"] == [{"action": "Allow", "protocol": "TCP",
                               "destination": {"nets": ["10.0.0.0/24"], "ports": ["32000:32768"]}}]


def test_named_port_and_default_protocol() -> None:
    spec = spec_of(policy("{podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{port: http}, {port: 8443}]}]}"))
    assert spec["ingress"] == [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["http", 8443]}}]


def test_one_rule_per_peer_and_protocol() -> None:
    spec = spec_of(policy("""
        podSelector: {}
        ingress:
        - from:
          - podSelector: {matchLabels: {app: a}}
          - namespaceSelector: {matchLabels: {team: x}}
            podSelector: {matchExpressions: [{key: tier, operator: In, values: [web, api]}]}
          ports: [{port: 53, protocol: UDP}, {port: 53}, {protocol: UDP, port: 5353}, {protocol: SCTP}]
        """))
    both = {"selector": 'tier in {"api", "web"}', "namespaceSelector": 'team == "x"'}
    assert spec["ingress"] == [
        {"action": "Allow", "protocol": "SCTP", "source": {"selector": 'app == "a"'}},
        {"action": "Allow", "protocol": "TCP", "source": {"selector": 'app == "a"'}, "destination": {"ports": [53]}},
        {"action": "Allow", "protocol": "UDP", "source": {"selector": 'app == "a"'},
         "destination": {"ports": [53, 5353]}},
        {"action": "Allow", "protocol": "SCTP", "source": both},
        {"action": "Allow", "protocol": "TCP", "source": both, "destination": {"ports": [53]}},
        {"action": "Allow", "protocol": "UDP", "source": both, "destination": {"ports": [53, 5353]}},
    ]
    assert spec["types"] == ["Ingress"]


def test_egress_rules_imply_the_egress_type() -> None:
    spec = spec_of(policy("{podSelector: {}, egress: [{to: [{namespaceSelector: {}}]}]}"))
    assert spec["types"] == ["Ingress", "Egress"]
    assert spec["egress"] == [{"action": "Allow", "destination": {"selector": "all()", "namespaceSelector": "all()"}}]


def test_label_selector_expressions() -> None:
    spec = spec_of(policy("""{podSelector: {matchLabels: {app: web}, matchExpressions: [
        {key: env, operator: NotIn, values: [dev]}, {key: canary, operator: DoesNotExist},
        {key: tortie.dev/name, operator: Exists}]}}"""))
    assert spec["selector"] == 'app == "web" && env not in {"dev"} && !has(canary) && has(tortie.dev/name)'


def test_rules_of_an_ungoverned_direction_are_dropped() -> None:
    spec = spec_of(policy("{podSelector: {}, policyTypes: [Egress], ingress: [{}]}"))
    assert "ingress" not in spec and spec["types"] == ["Egress"]


def test_output_of_kubectl_get_is_accepted() -> None:
    doc = k8s(TEST_NETWORK_POLICY)
    doc["metadata"].update(uid="abc", resourceVersion="12", generation=1, labels={"x": "y"},
                           annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"})
    doc["status"] = {}
    assert translate(doc).name == "knp.default.test-network-policy"


def test_is_k8s_netpol() -> None:
    assert is_k8s_netpol({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy"})
    assert is_k8s_netpol({"apiVersion": "networking.k8s.io/v1beta1", "kind": "NetworkPolicy"})
    assert not is_k8s_netpol({"apiVersion": "tortie.dev/v1", "kind": "NetworkPolicy"})
    assert not is_k8s_netpol({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy"})
    assert not is_k8s_netpol({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress"})
    assert not is_k8s_netpol(["NetworkPolicy"])


INVALID: list[tuple[str, str]] = [
    ("{podSelector: {}, ingres: []}", "spec has no field 'ingres'"),
    ("{podSelector: {matchLabel: {a: b}}}", "spec.podSelector has no field 'matchLabel'"),
    ("{podSelector: {matchLabels: {enabled: true}}}", "spec.podSelector.matchLabels.enabled must be a string"),
    ("{podSelector: {matchExpressions: [{key: a, operator: Has}]}}", "spec.podSelector: bad matchExpression operator"),
    ("{podSelector: {matchExpressions: [{key: a, operator: In}]}}",
     "spec.podSelector.matchExpressions[0].values must not be empty"),
    ("{podSelector: {}, policyTypes: [ingress]}", "spec.policyTypes[0] 'ingress' must be Ingress or Egress"),
    ("{podSelector: {}, ingress: [{from: [{}]}]}", "spec.ingress[0].from[0] must have podSelector"),
    ("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
     "spec.ingress[0].from[0]: ipBlock cannot be combined"),
    ("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}",
     "spec.ingress[0].from[0].ipBlock.except[0] 11.0.0.0/16 must be inside cidr 10.0.0.0/8"),
    ("{podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.300/8}}]}]}",
     "spec.egress[0].to[0].ipBlock.cidr '10.0.0.300/8' is not a CIDR"),
    ("{podSelector: {}, egress: [{to: [{ipBlock: {except: [10.0.0.0/16]}}]}]}",
     "spec.egress[0].to[0].ipBlock.cidr is required"),
    ("{podSelector: {}, ingress: [{ports: [{port: 70000}]}]}", "spec.ingress[0].ports[0].port 70000 is out of range"),
    ("{podSelector: {}, ingress: [{ports: [{port: 80, protocol: ICMP}]}]}",
     "spec.ingress[0].ports[0].protocol 'ICMP' must be one of TCP, UDP, SCTP"),
    ("{podSelector: {}, ingress: [{ports: [{port: http, endPort: 90}]}]}",
     "spec.ingress[0].ports[0].endPort needs a numeric port, not the named port 'http'"),
    ("{podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}",
     "spec.ingress[0].ports[0].endPort 80 must be a number from port (90) to 65535"),
    ("{podSelector: {}, ingress: [{ports: [{port: '80'}]}]}",
     "spec.ingress[0].ports[0].port '80' is a string; write 80 without quotes"),
    ("{podSelector: {}, ingress: [{ports: [{port: my_port}]}]}", "spec.ingress[0].ports[0].port: 'my_port' is not"),
    ("{podSelector: {}, egress: [{from: []}]}", "spec.egress[0] has no field 'from'"),
    ("{podSelector: {}, ingress: {from: []}}", "spec.ingress must be a list"),
]


@pytest.mark.parametrize(("spec", "message"), INVALID, ids=[m[:60] for _, m in INVALID])
def test_invalid_kubernetes_policies_name_the_field(spec: str, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        translate(policy(spec))
    assert message in str(error.value)


def test_invalid_documents() -> None:
    with pytest.raises(ValidationError, match="apiVersion 'networking.k8s.io/v1beta1' is not supported"):
        translate({"apiVersion": "networking.k8s.io/v1beta1", "kind": "NetworkPolicy", "metadata": {"name": "p"}})
    with pytest.raises(ValidationError, match="metadata.name is required"):
        translate({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "spec": {}})
    with pytest.raises(ValidationError, match="unknown top-level|has no field 'extra'"):
        translate({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p"},
                   "extra": 1})
    with pytest.raises(ValidationError, match="too long"):
        translate(policy("{}", name="a" * 250))


# ---- a podSelector sees the pod's own labels, never its namespace's ----------------------------


POD_LABELS = {"app": "web", "tortie.dev/namespace": "shop"}
# What an endpoint in namespace shop (labelled team=a) carries: its own labels and its namespace's.
ENDPOINT_LABELS = {**POD_LABELS, "pcns.team": "a", "pcns.kubernetes.io/metadata.name": "shop"}


@pytest.mark.parametrize(("selector", "selects"), [
    ("{matchLabels: {pcns.team: a}}", False),
    ("{matchLabels: {app: web, pcns.kubernetes.io/metadata.name: shop}}", False),
    ("{matchExpressions: [{key: pcns.team, operator: Exists}]}", False),
    ("{matchExpressions: [{key: pcns.team, operator: In, values: [a]}]}", False),
    ("{matchExpressions: [{key: pcns.team, operator: DoesNotExist}]}", True),
    ("{matchExpressions: [{key: pcns.team, operator: NotIn, values: [a]}], matchLabels: {app: web}}", True),
    ("{matchExpressions: [{key: pcns.team, operator: DoesNotExist}], matchLabels: {app: db}}", False),
    ("{matchLabels: {team: a}}", False),
    ("{matchLabels: {app: web}}", True),
])
def test_pod_selector_matches_the_pods_own_labels_only(selector: str, selects: bool) -> None:
    """Decided on the endpoint's labels, which include the namespace's: the answer must be the one
    Kubernetes gives on the pod's own labels."""
    text = f"podSelector: {selector}\ningress:\n- from:\n  - podSelector: {selector}\n"
    spec = spec_of(policy(text))
    peer = spec["ingress"][0]["source"]["selector"]
    for translated in (spec["selector"], peer):
        assert parse(translated).matches(ENDPOINT_LABELS) == selects, translated
        assert parse(translated).matches(POD_LABELS) == selects, translated


def test_namespace_selector_still_reaches_the_namespace_labels() -> None:
    spec = spec_of(policy("""
        podSelector: {}
        ingress:
        - from:
          - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: front}}
        """))
    assert spec["ingress"][0]["source"] == {"namespaceSelector": "kubernetes.io/metadata.name == \"front\"",
                                            "selector": "all()"}
