"""Network policy end to end on two nodes: policies applied with ``netctl``, programmed by the real
agents, proven by traffic that passes or is dropped, in both directions, across nodes.

Pods, in the namespaces ``front`` (labels ``team=front``, ``project=myproject`` through the
``kns.front`` profile) and ``back`` (``team=back``)::

    node 1: front/web {app: web}      back/api {app: api, role: frontend}   back/batch {app: batch}
    node 2: front/ui  {app: ui}       back/db  {app: db, role: db}          back/report {app: report}

One lab for the module. Every test removes its policies and waits until the traffic it blocked
flows again, so that the next one starts from the network's default: open within itself.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator

import pytest

from netlab.cluster_lab import FABRIC_HOST, POOL_V4, Check, ClusterLab, block_of, v4, v6
from netlab.lab import Pod
from netlab.probes import rewritten

pytestmark = pytest.mark.lab

PORT, OTHER_PORT = 8080, 9090
NAMESPACES = """\
apiVersion: tortie.dev/v1
kind: Profile
metadata: {name: kns.front}
spec:
  labelsToApply: {team: front, project: myproject}
---
apiVersion: tortie.dev/v1
kind: Profile
metadata: {name: kns.back}
spec:
  labelsToApply: {team: back}
"""
PODS = {  # name: (node, namespace, labels)
    "web": (1, "front", {"app": "web"}),
    "api": (1, "back", {"app": "api", "role": "frontend"}),
    "batch": (1, "back", {"app": "batch"}),
    "ui": (2, "front", {"app": "ui"}),
    "db": (2, "back", {"app": "db", "role": "db"}),
    "report": (2, "back", {"app": "report"}),
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces and runs etcd and felix-agent")
    with ClusterLab("pm", 2) as lab:
        lab.apply(NAMESPACES)
        yield lab


@pytest.fixture(scope="module")
def pods(cluster: ClusterLab) -> dict[str, Pod]:
    return {name: cluster.add_pod(node, name, namespace=ns, labels=labels)
            for name, (node, ns, labels) in PODS.items()}


@pytest.fixture(autouse=True)
def back_to_default_allow(cluster: ClusterLab, pods: dict[str, Pod]) -> Iterator[None]:
    """After each test (its policies deleted): every pod reaches db and web again."""
    yield
    cluster.expect({Check(pods[p], pods[dst], PORT): True for dst in ("db", "web") for p in pods if p != dst},
                   what="default allow after the test's policies were deleted")




def both_ways(pods: dict[str, Pod], a: str, b: str, forward: bool, backward: bool,
              port: int | None = PORT, family: int = 4) -> dict[Check, bool]:
    return {Check(pods[a], pods[b], port, family): forward, Check(pods[b], pods[a], port, family): backward}


def test_default_allow(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """No policy: every pod reaches every pod on the other node, IPv4 and IPv6, ping and TCP."""
    expected = {Check(pods[a], pods[b], port, family): True
                for a in pods for b in pods if PODS[a][0] != PODS[b][0]
                for port in (None, PORT) for family in (4, 6)}
    cluster.expect(expected, timeout=5, what="default allow")


def test_deny_all_ingress(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """A policy selecting db for Ingress with no rules: nothing reaches db; db still reaches out
    (its egress is not governed, and the replies to its connections are let back in)."""
    expected = {**both_ways(pods, "api", "db", False, True), **both_ways(pods, "web", "db", False, True),
                **both_ways(pods, "api", "db", False, True, port=None),
                **both_ways(pods, "web", "db", False, True, family=6)}
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: GlobalNetworkPolicy
            metadata: {name: deny-db-ingress}
            spec:
              selector: app == 'db'
              types: [Ingress]
            """):
        cluster.expect(expected, what="db isolated for ingress")


def test_allow_by_label(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """Only pods labelled app=api (in db's namespace) reach db."""
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: NetworkPolicy
            metadata: {name: db-from-api, namespace: back}
            spec:
              selector: app == 'db'
              ingress:
              - action: Allow
                source: {selector: app == 'api'}
            """):
        cluster.expect({**both_ways(pods, "api", "db", True, True), **both_ways(pods, "batch", "db", False, True),
                        **both_ways(pods, "web", "db", False, True),
                        **both_ways(pods, "api", "db", True, True, port=None, family=6),
                        **both_ways(pods, "batch", "db", False, True, port=None)},
                       what="db open to app=api only")


def test_allow_by_port_and_protocol(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """db admits TCP to port 8080 from anyone; another port and ICMP are dropped. db's own
    traffic to the others, on any port and ICMP, passes."""
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: NetworkPolicy
            metadata: {name: db-tcp-8080, namespace: back}
            spec:
              selector: app == 'db'
              ingress:
              - action: Allow
                protocol: TCP
                destination: {ports: [8080]}
            """):
        cluster.expect({**both_ways(pods, "api", "db", True, True, port=PORT),
                        **both_ways(pods, "web", "db", True, True, port=PORT, family=6),
                        **both_ways(pods, "api", "db", False, True, port=OTHER_PORT),
                        **both_ways(pods, "api", "db", False, True, port=None),
                        **both_ways(pods, "web", "db", False, True, port=None, family=6)},
                       what="db open on TCP 8080 only")


def test_egress_deny_to_a_net(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """web may not send to db's IPv4 address (a /32 net); everything else, db's IPv6 address
    included, is allowed, and db still reaches web (the replies are not new egress)."""
    with cluster.applied(f"""
            apiVersion: tortie.dev/v1
            kind: GlobalNetworkPolicy
            metadata: {{name: web-not-to-db}}
            spec:
              selector: app == 'web'
              types: [Egress]
              egress:
              - action: Deny
                destination: {{nets: ['{v4(pods["db"])}/32']}}
              - action: Allow
            """):
        cluster.expect({**both_ways(pods, "web", "db", False, True),
                        **both_ways(pods, "web", "db", False, True, port=None),
                        **both_ways(pods, "web", "db", True, True, family=6),
                        **both_ways(pods, "web", "report", True, True),
                        **both_ways(pods, "web", "ui", True, True, port=None)},
                       what="web's egress to db's IPv4 address denied")


def test_egress_deny_to_a_net_outside_the_pools(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """An egress Deny to the fabric's network drops web's traffic to the fabric host; pods stay reachable."""
    port = 5557
    cluster.fabric_listener(port)
    assert cluster.can_tcp(pods["web"], FABRIC_HOST, port) and cluster.can_ping(pods["web"], FABRIC_HOST)
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: GlobalNetworkPolicy
            metadata: {name: web-not-to-fabric}
            spec:
              selector: app == 'web'
              types: [Egress]
              egress:
              - action: Deny
                destination: {nets: [198.18.0.0/24]}
              - action: Allow
            """):
        cluster.expect({Check(pods["web"], FABRIC_HOST, port): False, Check(pods["web"], FABRIC_HOST): False,
                        Check(pods["api"], FABRIC_HOST, port): True, **both_ways(pods, "web", "db", True, True)},
                       what="web cut off from the fabric")
    assert cluster.can_tcp(pods["web"], FABRIC_HOST, port)


def test_namespace_isolation(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """back admits only its own namespace (selected by the namespace's labels): front's pods are
    dropped on the way in, while back's pods still reach front."""
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: NetworkPolicy
            metadata: {name: back-only, namespace: back}
            spec:
              selector: all()
              ingress:
              - action: Allow
                source: {namespaceSelector: team == 'back'}
            """):
        cluster.expect({**both_ways(pods, "api", "db", True, True), **both_ways(pods, "batch", "report", True, True),
                        **both_ways(pods, "web", "db", False, True), **both_ways(pods, "ui", "api", False, True),
                        **both_ways(pods, "ui", "batch", False, True, port=None),
                        **both_ways(pods, "web", "ui", True, True)},
                       what="namespace back isolated from front")


PASS_POLICY = """
    apiVersion: tortie.dev/v1
    kind: GlobalNetworkPolicy
    metadata: {{name: pass-api}}
    spec:
      order: {order}
      selector: app == 'db'
      ingress:
      - action: Pass
        source: {{selector: app == 'api'}}
    """
DENY_POLICY = """
    apiVersion: tortie.dev/v1
    kind: GlobalNetworkPolicy
    metadata: {name: deny-db}
    spec:
      order: 20
      selector: app == 'db'
      ingress:
      - action: Deny
    """


def test_pass_and_order(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """A Deny at order 20 drops everything to db; a Pass at order 10 hands api's traffic on to the
    profiles (which allow it) before the Deny is reached; moved to order 30 it comes too late."""
    with cluster.applied(DENY_POLICY):
        cluster.expect({**both_ways(pods, "api", "db", False, True), **both_ways(pods, "batch", "db", False, True)},
                       what="the Deny alone")
        with cluster.applied(PASS_POLICY.format(order=10)):
            cluster.expect({**both_ways(pods, "api", "db", True, True),
                            **both_ways(pods, "api", "db", True, True, port=None, family=6),
                            **both_ways(pods, "batch", "db", False, True), **both_ways(pods, "web", "db", False, True)},
                           what="the Pass at order 10 before the Deny")
            cluster.apply(textwrap.dedent(PASS_POLICY.format(order=30)))
            cluster.expect({**both_ways(pods, "api", "db", False, True), **both_ways(pods, "batch", "db", False, True)},
                           what="the Pass at order 30, after the Deny")


def test_label_change_takes_effect_without_restart(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """batch relabelled app=api (its WorkloadEndpoint edited and re-applied) is let into db, and
    shut out again when the label goes back; the agents are the same processes throughout."""
    agents = dict(cluster.agents)
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: NetworkPolicy
            metadata: {name: db-from-api, namespace: back}
            spec:
              selector: app == 'db'
              ingress:
              - action: Allow
                source: {selector: app == 'api'}
            """):
        cluster.expect({**both_ways(pods, "batch", "db", False, True), **both_ways(pods, "api", "db", True, True)},
                       what="batch shut out")
        rules = cluster.rule_handles(2)
        try:
            cluster.set_labels(pods["batch"], {"app": "api"})
            cluster.expect({**both_ways(pods, "batch", "db", True, True),
                            **both_ways(pods, "batch", "db", True, True, port=None, family=6)},
                           what="batch let in after its relabel")
            # Only set elements changed: not one rule of db's node was rewritten.
            assert not rewritten(rules, cluster.rule_handles(2))
        finally:
            cluster.set_labels(pods["batch"], {"app": "batch"})
        cluster.expect({**both_ways(pods, "batch", "db", False, True), **both_ways(pods, "api", "db", True, True)},
                       what="batch shut out again")
    assert cluster.agents == agents and all(cluster.agent_running(k) for k in agents)


def test_kubernetes_network_policy_example(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """The "test-network-policy" example of the Kubernetes documentation, adapted: pods with
    role=db (db) admit TCP 6379 from an ipBlock (the pool, except node 1's block), from namespaces
    labelled project=myproject (front) and from pods with role=frontend in their namespace (api);
    they may only open TCP 5978 to an ipBlock (api's address). Everything else to and from them is
    dropped, except the replies to connections that were allowed."""
    redis, egress_port = 6379, 5978
    except_block = block_of(v4(pods["batch"]))  # node 1's block: web, api and batch
    assert block_of(v4(pods["api"])) == except_block
    with cluster.applied(f"""
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata:
              name: test-network-policy
              namespace: back
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
                    cidr: {POOL_V4}
                    except:
                    - {except_block}
                - namespaceSelector:
                    matchLabels:
                      project: myproject
                - podSelector:
                    matchLabels:
                      role: frontend
                ports:
                - protocol: TCP
                  port: {redis}
              egress:
              - to:
                - ipBlock:
                    cidr: {v4(pods["api"])}/32
                ports:
                - protocol: TCP
                  port: {egress_port}
            """):
        to_db = {
            Check(pods["web"], pods["db"], redis): True,  # namespaceSelector (front is myproject)
            Check(pods["api"], pods["db"], redis): True,  # podSelector role=frontend
            Check(pods["report"], pods["db"], redis): True,  # ipBlock: node 2's block is not excepted
            Check(pods["batch"], pods["db"], redis): False,  # excepted, not myproject, no role
            Check(pods["api"], pods["db"], PORT): False,  # another port
            Check(pods["api"], pods["db"]): False,  # ICMP
        }
        from_db = {
            Check(pods["db"], pods["api"], egress_port): True,
            Check(pods["db"], pods["api"], PORT): False,
            Check(pods["db"], pods["web"], egress_port): False,  # not in the egress ipBlock
            Check(pods["db"], pods["api"]): False,
            Check(pods["db"], pods["ui"], PORT, 6): False,  # an IPv6 peer: outside every ipBlock
        }
        unaffected = {**both_ways(pods, "batch", "web", True, True), **both_ways(pods, "ui", "api", True, True)}
        cluster.expect({**to_db, **from_db, **unaffected}, what="the Kubernetes example's isolation of db")
        # db sees the real source of what it admits (the policy matched on it, nothing rewrote it).
        assert cluster.tcp(pods["api"], pods["db"], redis) == f"ok {v4(pods['api'])}"
        assert cluster.tcp(pods["web"], pods["db"], redis, family=6) == f"ok {v6(pods['web'])}"


def test_port_range_and_not_ports(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """A port range with a hole (notPorts): 8080 inside it passes, 8081 in the hole and 9090
    outside it are dropped."""
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: NetworkPolicy
            metadata: {name: db-range, namespace: back}
            spec:
              selector: app == 'db'
              ingress:
              - action: Allow
                protocol: TCP
                destination: {ports: ['8000:8100'], notPorts: [8081]}
            """):
        cluster.expect({**both_ways(pods, "api", "db", True, True, port=PORT),
                        **both_ways(pods, "api", "db", False, True, port=8081),
                        **both_ways(pods, "web", "db", False, True, port=OTHER_PORT, family=6)},
                       what="db open on 8000-8100 except 8081")


def test_policy_namespace_selector_and_not_selector(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """A GlobalNetworkPolicy scoped by namespaceSelector to front's pods, admitting everyone but
    app=batch (notSelector): batch is dropped on its way to front only."""
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: GlobalNetworkPolicy
            metadata: {name: front-not-from-batch}
            spec:
              namespaceSelector: team == 'front'
              selector: all()
              ingress:
              - action: Allow
                source: {notSelector: app == 'batch'}
            """):
        cluster.expect({**both_ways(pods, "batch", "ui", False, True), **both_ways(pods, "api", "ui", True, True),
                        **both_ways(pods, "db", "web", True, True), **both_ways(pods, "batch", "db", True, True),
                        **both_ways(pods, "batch", "ui", False, True, port=None, family=6)},
                       what="front closed to app=batch only")


def test_namespace_label_change_takes_effect(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """A namespaceSelector follows the namespace's labels: front admitted into back once the
    kns.front profile says team=back, and shut out again when it no longer does."""
    relabelled = NAMESPACES.replace("{team: front, project: myproject}", "{team: back, project: myproject}")
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: NetworkPolicy
            metadata: {name: back-only, namespace: back}
            spec:
              selector: all()
              ingress:
              - action: Allow
                source: {namespaceSelector: team == 'back'}
            """):
        cluster.expect({**both_ways(pods, "web", "db", False, True), **both_ways(pods, "api", "db", True, True)},
                       what="front shut out of back")
        try:
            cluster.apply(relabelled)
            cluster.expect({**both_ways(pods, "web", "db", True, True), **both_ways(pods, "ui", "api", True, True)},
                           what="front admitted once labelled team=back")
        finally:
            cluster.apply(NAMESPACES)
        cluster.expect({**both_ways(pods, "web", "db", False, True), **both_ways(pods, "ui", "api", False, True)},
                       what="front shut out again")


def test_new_pod_is_isolated_from_its_first_packet(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """No pod without its policy: a pod created while a policy isolates it (its ADD answers only
    once the policy is in the kernel) drops the very first packet sent to it, while its
    unselected twin, created alongside, answers at once."""
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: GlobalNetworkPolicy
            metadata: {name: isolate-sealed}
            spec:
              selector: app == 'sealed'
              types: [Ingress]
            """):
        rules = cluster.rule_handles(1)
        sealed = cluster.add_pod(2, "sealed", namespace="back", labels={"app": "sealed"})
        try:
            assert not cluster.can_ping(pods["api"], sealed)
            assert not cluster.can_ping(pods["web"], sealed, 6)
            assert cluster.can_ping(sealed, pods["api"])
            # On the other node, a new endpoint is a new set element: no rule was rewritten.
            assert not rewritten(rules, cluster.rule_handles(1))
        finally:
            cluster.delete_pod(sealed)
        open_pod = cluster.add_pod(2, "open", namespace="back", labels={"app": "open"})
        try:
            assert cluster.can_ping(pods["api"], open_pod)
        finally:
            cluster.delete_pod(open_pod)


def test_icmp_type(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """db admits echo requests only (ICMP type 8, ICMPv6 type 128): pings pass, TCP is dropped."""
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: NetworkPolicy
            metadata: {name: db-echo-only, namespace: back}
            spec:
              selector: app == 'db'
              ingress:
              - action: Allow
                protocol: ICMP
                icmp: {type: 8}
              - action: Allow
                protocol: ICMPv6
                icmp: {type: 128}
            """):
        cluster.expect({**both_ways(pods, "api", "db", True, True, port=None),
                        **both_ways(pods, "web", "db", True, True, port=None, family=6),
                        **both_ways(pods, "api", "db", False, True, port=PORT),
                        **both_ways(pods, "api", "db", False, True, port=PORT, family=6)},
                       what="db open to echo requests only")


def test_named_port(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """A rule naming a port ("redis") matches the port db's endpoint declares under that name, and
    follows it when the endpoint declares another."""
    def declare(port: int | None) -> None:
        def change(doc: dict[str, object]) -> None:
            spec = doc["spec"]
            assert isinstance(spec, dict)
            spec["ports"] = [{"name": "redis", "protocol": "TCP", "port": port}] if port else []
        cluster.edit_endpoint(pods["db"], change)

    declare(PORT)
    try:
        with cluster.applied("""
                apiVersion: tortie.dev/v1
                kind: NetworkPolicy
                metadata: {name: db-redis, namespace: back}
                spec:
                  selector: app == 'db'
                  ingress:
                  - action: Allow
                    protocol: TCP
                    destination: {ports: [redis]}
                """):
            cluster.expect({**both_ways(pods, "api", "db", True, True, port=PORT),
                            **both_ways(pods, "web", "db", True, True, port=PORT, family=6),
                            **both_ways(pods, "api", "db", False, True, port=OTHER_PORT)},
                           what="db open on its port named redis (8080)")
            declare(OTHER_PORT)
            cluster.expect({**both_ways(pods, "api", "db", False, True, port=PORT),
                            **both_ways(pods, "api", "db", True, True, port=OTHER_PORT)},
                           what="db open on its port named redis (now 9090)")
    finally:
        declare(None)


def test_selector_grammar(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """Calico's selector operators end to end: ``in``, ``has()``, ``&&``, ``||``, ``!``,
    ``starts with``, ``contains``, parentheses."""
    with cluster.applied("""
            apiVersion: tortie.dev/v1
            kind: GlobalNetworkPolicy
            metadata: {name: grammar}
            spec:
              selector: app in {'db', 'report'} && has(role)
              ingress:
              - action: Allow
                source:
                  selector: app starts with 'ap' || (app contains 'atc' && !has(role))
            """):
        cluster.expect({**both_ways(pods, "api", "db", True, True),  # starts with 'ap'
                        **both_ways(pods, "batch", "db", True, True),  # contains 'atc', no role
                        **both_ways(pods, "web", "db", False, True),
                        **both_ways(pods, "ui", "db", False, True, port=None),
                        **both_ways(pods, "web", "report", True, True)},  # report has no role: not selected
                       what="the selector grammar")


def test_kubernetes_default_deny_with_port_range(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """Kubernetes' "default-deny-ingress" for namespace back, plus a policy admitting TCP
    8000-8100 (port and endPort) to db: policies add up, so db answers on 8080 only and back's
    other pods answer nothing; front is not affected."""
    with cluster.applied("""
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: default-deny-ingress, namespace: back}
            spec:
              podSelector: {}
              policyTypes: [Ingress]
            ---
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: db-range, namespace: back}
            spec:
              podSelector: {matchLabels: {app: db}}
              ingress:
              - ports:
                - {protocol: TCP, port: 8000, endPort: 8100}
            """):
        cluster.expect({**both_ways(pods, "web", "db", True, True, port=PORT),
                        **both_ways(pods, "web", "db", False, True, port=OTHER_PORT),
                        **both_ways(pods, "ui", "api", False, True),
                        **both_ways(pods, "batch", "report", False, False, port=None),
                        **both_ways(pods, "web", "ui", True, True)},
                       what="back closed except db's 8000-8100")


def test_kubernetes_pod_selector_never_reaches_namespace_labels(cluster: ClusterLab, pods: dict[str, Pod]) -> None:
    """back's pods carry team=back only through their namespace (kns.back, pcns.team on the
    endpoints): a podSelector naming that label, bare or with the pcns. prefix, admits none of them.
    Only a namespaceSelector reaches a namespace's labels. A pod's own label still works."""
    with cluster.applied(f"""
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {{name: db-from-team-back, namespace: back}}
            spec:
              podSelector: {{matchLabels: {{role: db}}}}
              ingress:
              - from:
                - podSelector: {{matchLabels: {{team: back}}}}
                - podSelector: {{matchLabels: {{pcns.team: back}}}}
                - podSelector: {{matchExpressions: [{{key: pcns.kubernetes.io/metadata.name, operator: Exists}}]}}
                ports: [{{protocol: TCP, port: {PORT}}}]
              - from:
                - podSelector: {{matchLabels: {{app: api}}}}
                ports: [{{protocol: TCP, port: {OTHER_PORT}}}]
            """):
        expected = {Check(pods[p], pods["db"], PORT): False for p in ("api", "batch", "report", "web", "ui")}
        expected[Check(pods["api"], pods["db"], OTHER_PORT)] = True  # its own label: the policy is in place
        expected[Check(pods["batch"], pods["db"], OTHER_PORT)] = False
        cluster.expect(expected, what="no pod admitted by its namespace's labels through a podSelector")


@pytest.mark.parametrize("namespace", ["front", "lone"])
def test_kubernetes_namespace_selector_by_name(cluster: ClusterLab, pods: dict[str, Pod], namespace: str) -> None:
    """Upstream policies select namespaces by ``kubernetes.io/metadata.name``, which the API server
    gives every namespace: it admits exactly that namespace's pods, also one without a kns profile."""
    lone = cluster.add_pod(2, "solo", namespace="lone", labels={"app": "solo"})  # no kns.lone profile
    try:
        everyone = {**pods, "solo": lone}
        with cluster.applied(f"""
                apiVersion: networking.k8s.io/v1
                kind: NetworkPolicy
                metadata: {{name: db-from-{namespace}, namespace: back}}
                spec:
                  podSelector: {{matchLabels: {{role: db}}}}
                  ingress:
                  - from:
                    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {namespace}}}}}
                """):
            members = {"front": ("web", "ui"), "lone": ("solo",)}[namespace]
            cluster.expect({Check(pod, pods["db"], PORT): name in members
                            for name, pod in everyone.items() if name != "db"},
                           what=f"db open to the pods of namespace {namespace} only")
    finally:
        cluster.delete_pod(lone)
