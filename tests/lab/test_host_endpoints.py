"""Issue 14, host endpoints, end to end on three BGP nodes: HostEndpoint policy on a node's own
traffic, the failsafe ports no policy removes, applyOnForward on forwarded traffic,
defaultEndpointToHostAction applied live, automatic host endpoints following a node's labels, and
preDNAT and doNotTrack policies.

One lab for the module (building it is most of the cost); every test removes what it applied. The
probes are listeners started in a node's namespace (port 22 needs a listener, not sshd) and a TCP
client run in another node's namespace, or on the fabric (an operator's machine outside the cluster).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from netlab.bgp_cluster import BGPCluster
from netlab.cluster_lab import PYTHON
from netlab.probes import TCP_CLIENT, TCP_SERVER
from netlab.wait import wait_for

pytestmark = pytest.mark.lab

PORTS = (22, 8080, 9090)
APPLY_TIMEOUT = 20.0  # an agent's apply, on a busy 2-core machine


@pytest.fixture(scope="module")
def bgp() -> Iterator[BGPCluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces and runs etcd, ExaBGP and felix-agent")
    with BGPCluster("hep", 3, agent_args=["--resync-interval", "5"]) as lab:
        for k in (1, 2, 3):
            lab.wait_established(k, [j for j in (1, 2, 3) if j != k])
        for k in (1, 2, 3):
            for port in PORTS:
                serve(lab, k, port)
        yield lab


def serve(bgp: BGPCluster, k: int, port: int) -> None:
    lab = bgp.lab
    netns = lab.node(k).netns
    log = bgp.cluster.work / f"host-server-n{k}-{port}.log"
    lab.start_process(netns, [str(PYTHON), "-c", TCP_SERVER, str(port)], log, {})
    wait_for(lambda: lab.exec(netns, "ss", "-Hltn", f"sport = :{port}").stdout.strip(), 10,
             f"the server on port {port} of node {k}", interval=0.05)


def connect(bgp: BGPCluster, src: str, address: str, port: int) -> bool:
    """One TCP connection from namespace ``src`` (a node's or the fabric's) to ``address:port``."""
    done = bgp.lab.exec(src, str(PYTHON), "-c", TCP_CLIENT, address, str(port), "1", timeout=30)
    return done.stdout.startswith("ok")


def ns(bgp: BGPCluster, k: int) -> str:
    return bgp.lab.node(k).netns


def expect(bgp: BGPCluster, want: dict[tuple[str, int, int], bool], what: str) -> None:
    """Until every (source namespace, node, port) connection gives its expected result."""
    last: dict[tuple[str, int, int], bool] = {}

    def matches() -> bool:
        nonlocal last
        last = {key: connect(bgp, key[0], bgp.address(key[1]), key[2]) for key in want}
        return last == want

    wait_for(matches, APPLY_TIMEOUT, what, interval=0.2,
             describe=lambda: "\n".join(f"  {src} → n{k}:{port}: expected {'pass' if ok else 'drop'}"
                                        for (src, k, port), ok in want.items() if last.get((src, k, port)) != ok))


def sessions_since(bgp: BGPCluster, k: int) -> dict[str, str]:
    return bgp.established(k)


def etcd_reachable(bgp: BGPCluster, k: int) -> bool:
    """``netctl get nodes`` from node ``k``'s namespace: the node's own traffic to etcd."""
    done = bgp.cluster.netctl("get", "nodes", "-o", "json", node=k, check=False)
    return done.returncode == 0 and "n1" in done.stdout


def remove(bgp: BGPCluster, kind: str, name: str) -> None:
    """Delete a resource if it is there (cleanup after a test, whatever it reached)."""
    bgp.cluster.netctl("delete", kind, name, check=False)


def hep_yaml(name: str, node: str, interface: str, labels: dict[str, str], profiles: list[str] | None = None) -> str:
    return json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
                       "metadata": {"name": name, "labels": labels},
                       "spec": {"node": node, "interfaceName": interface, "expectedIPs": [],
                                "profiles": profiles or []}}) + "\n"


def gnp_yaml(name: str, **spec: object) -> str:
    return json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                       "metadata": {"name": name}, "spec": spec}) + "\n"


def test_underlay_host_endpoint_allows_only_8080_from_the_other_node_and_keeps_failsafe(bgp: BGPCluster) -> None:
    c = bgp.cluster
    n1, n2, n3 = (ns(bgp, k) for k in (1, 2, 3))
    expect(bgp, {(n2, 1, 8080): True, (n2, 1, 9090): True, (n3, 1, 8080): True}, "n1 open before any host endpoint")
    before = sessions_since(bgp, 1)
    c.apply(hep_yaml("n1-eth0", "n1", "eth0", {"hep": "n1-eth0"})
            + "---\n" + gnp_yaml("n1-8080-from-n2", selector="hep == 'n1-eth0'", ingress=[
                {"action": "Allow", "protocol": "TCP", "source": {"nets": [f"{bgp.address(2)}/32"]},
                 "destination": {"ports": [8080]}}]))
    expect(bgp, {(n2, 1, 8080): True, (n2, 1, 9090): False, (n3, 1, 8080): False, (n3, 1, 9090): False,
                 (n2, 1, 22): True, (n3, 1, 22): True},
           "only 8080 from n2 (and failsafe 22) into n1")
    # Other nodes are not protected: the policy is n1's eth0 only.
    expect(bgp, {(n1, 2, 9090): False, (n3, 2, 9090): True},
           "n1's own egress denied (no egress policy) but n2 open to n3")
    assert etcd_reachable(bgp, 1), "n1 lost etcd"
    assert sessions_since(bgp, 1) == before, "n1's BGP sessions were re-established (or lost)"
    table = c.netctl("get", "heps", "-o", "wide").stdout
    assert "n1-eth0" in table and "eth0" in table, table
    assert "interfaceName: eth0" in c.get_yaml("hostendpoint", "n1-eth0")
    # The node still takes part in the cluster: a change made elsewhere reaches its kernel.
    c.apply(gnp_yaml("n1-8080-from-n2", selector="hep == 'n1-eth0'", ingress=[
        {"action": "Allow", "protocol": "TCP", "source": {"nets": [f"{bgp.address(3)}/32"]},
         "destination": {"ports": [8080]}}]))
    expect(bgp, {(n3, 1, 8080): True, (n2, 1, 8080): False}, "the policy edit reaches n1 over etcd")

    c.delete("hostendpoint", "n1-eth0")
    expect(bgp, {(n2, 1, 8080): True, (n2, 1, 9090): True, (n3, 1, 9090): True, (n1, 2, 9090): True},
           "everything back once the host endpoint is deleted")
    c.delete("globalnetworkpolicy", "n1-8080-from-n2")
    assert sessions_since(bgp, 1) == before


def test_deny_all_host_policy_on_every_node_keeps_etcd_bgp_and_ssh(bgp: BGPCluster) -> None:
    c = bgp.cluster
    fabric = bgp.lab.fabric
    before = {k: sessions_since(bgp, k) for k in (1, 2, 3)}
    heps = "---\n".join(hep_yaml(f"n{k}-all", f"n{k}", "*", {"deny-all": "yes"}) for k in (1, 2, 3))
    c.apply(heps + "---\n" + gnp_yaml("deny-all-hosts", selector="has(deny-all)", types=["Ingress", "Egress"],
                                      ingress=[{"action": "Deny"}], egress=[{"action": "Deny"}]))
    want = {}
    for k in (1, 2, 3):
        want[(fabric, k, 22)] = True  # an operator can always get back in
        want[(fabric, k, 9090)] = False
    expect(bgp, want, "every host closed but port 22")
    for k in (1, 2, 3):
        assert etcd_reachable(bgp, k), f"n{k} lost etcd"
        assert sessions_since(bgp, k) == before[k], f"n{k}'s BGP sessions were re-established (or lost)"
    c.delete("globalnetworkpolicy", "deny-all-hosts")
    for k in (1, 2, 3):
        c.delete("hostendpoint", f"n{k}-all")
    expect(bgp, {(fabric, k, 9090): True for k in (1, 2, 3)}, "hosts open again")


def test_all_interfaces_host_endpoint_with_apply_on_forward_filters_forwarded_traffic(bgp: BGPCluster) -> None:
    c = bgp.cluster
    pods = {k: c.add_pod(k, f"fwd{k}") for k in (1, 2)}
    try:
        assert c.can_tcp(pods[2], pods[1], 8080) and c.can_tcp(pods[2], pods[1], 8081)
        c.apply(hep_yaml("n1-star", "n1", "*", {"star": "n1"}, ["projectcalico-default-allow"])
                + "---\n" + gnp_yaml("no-8080-through-n1", selector="star == 'n1'", applyOnForward=True,
                                     ingress=[{"action": "Deny", "protocol": "TCP", "destination": {"ports": [8080]}},
                                              {"action": "Allow"}]))
        wait_for(lambda: not c.can_tcp(pods[2], pods[1], 8080), APPLY_TIMEOUT,
                 "forwarded TCP 8080 into n1 to be dropped")
        assert c.can_tcp(pods[2], pods[1], 8081), "other forwarded traffic must pass"
        assert c.can_ping(pods[2], pods[1])
        # Local traffic to n1 obeys the same policy (it applies to both): 9090 allowed, 8080 denied.
        expect(bgp, {(ns(bgp, 2), 1, 9090): True, (ns(bgp, 2), 1, 8080): False}, "n1's own ports by the policy")
        # Pod traffic to its own host stays governed by the workload's policy (and the default Accept).
        assert connect(bgp, pods[1].netns, bgp.address(1), 8080)
        c.delete("globalnetworkpolicy", "no-8080-through-n1")
        wait_for(lambda: c.can_tcp(pods[2], pods[1], 8080), APPLY_TIMEOUT, "forwarded 8080 to pass again")
    finally:
        remove(bgp, "hostendpoint", "n1-star")
        remove(bgp, "globalnetworkpolicy", "no-8080-through-n1")
        for pod in pods.values():
            c.delete_pod(pod)


def felix_yaml(**spec: object) -> str:
    return json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
                       "metadata": {"name": "default"}, "spec": spec}) + "\n"


def test_default_endpoint_to_host_action_is_applied_live(bgp: BGPCluster) -> None:
    c = bgp.cluster
    pod = c.add_pod(1, "tohost")
    peer = c.add_pod(2, "tohost-peer")
    host = bgp.address(1)

    def verdict(want: bool, what: str) -> None:
        wait_for(lambda: connect(bgp, pod.netns, host, 9090) is want, APPLY_TIMEOUT, what)

    try:
        verdict(True, "pod → its host allowed by default (Accept)")
        c.apply(felix_yaml(defaultEndpointToHostAction="Drop"))
        verdict(False, "pod → its host dropped after defaultEndpointToHostAction: Drop")
        assert c.can_ping(pod, peer), "Drop is about the host only"
        # Return: the "*" host endpoint's ingress policy decides.
        c.apply(felix_yaml(defaultEndpointToHostAction="Return")
                + "---\n" + hep_yaml("n1-return", "n1", "*", {"ret": "n1"}, ["projectcalico-default-allow"])
                + "---\n" + gnp_yaml("ret-no-9090", selector="ret == 'n1'", ingress=[
                    {"action": "Deny", "protocol": "TCP", "destination": {"ports": [9090]}}, {"action": "Allow"}]))
        verdict(False, "pod → host 9090 denied by the '*' host endpoint's policy (Return)")
        assert connect(bgp, pod.netns, host, 8080), "Return: the host endpoint's policy allows 8080"
        c.apply(felix_yaml(defaultEndpointToHostAction="Accept"))
        verdict(True, "pod → its host allowed again (Accept)")
    finally:
        remove(bgp, "felixconfiguration", "default")
        remove(bgp, "hostendpoint", "n1-return")
        remove(bgp, "globalnetworkpolicy", "ret-no-9090")
        for p in (pod, peer):
            c.delete_pod(p)


def hep_labels(bgp: BGPCluster, name: str) -> dict[str, str] | None:
    done = bgp.cluster.netctl("get", "hostendpoint", name, "-o", "json", check=False)
    if done.returncode != 0:
        return None
    labels: dict[str, str] = json.loads(done.stdout)["metadata"].get("labels", {})
    return labels


def relabel_node(bgp: BGPCluster, node: str, labels: dict[str, str]) -> None:
    doc = json.loads(bgp.cluster.netctl("get", "node", node, "-o", "json").stdout)
    doc["metadata"]["labels"] = labels
    for field in ("resourceVersion", "uid", "creationTimestamp"):
        doc["metadata"].pop(field, None)
    doc.pop("status", None)
    bgp.cluster.apply(json.dumps(doc) + "\n")


def test_automatic_host_endpoints_follow_node_labels(bgp: BGPCluster) -> None:
    c = bgp.cluster
    n2 = ns(bgp, 2)
    try:
        c.apply(felix_yaml(autoHostEndpoints="Enabled")
                + "---\n" + gnp_yaml("blue-no-9090", selector="zone == 'blue'", ingress=[
                    {"action": "Deny", "protocol": "TCP", "destination": {"ports": [9090]}}, {"action": "Allow"}]))
        for k in (1, 2, 3):
            wait_for(lambda k=k: hep_labels(bgp, f"n{k}-auto-hep") is not None, APPLY_TIMEOUT,
                     f"n{k}-auto-hep to be created")
        # default-allow profile: switching it on changes no traffic
        expect(bgp, {(n2, 1, 9090): True, (n2, 3, 9090): True}, "auto host endpoints allow by default")
        relabel_node(bgp, "n1", {"zone": "blue"})
        wait_for(lambda: (hep_labels(bgp, "n1-auto-hep") or {}).get("zone") == "blue", APPLY_TIMEOUT,
                 "n1-auto-hep to take n1's new label")
        expect(bgp, {(n2, 1, 9090): False, (n2, 1, 8080): True, (n2, 3, 9090): True},
               "the policy selecting zone == blue applies to n1 only")
        relabel_node(bgp, "n1", {})
        wait_for(lambda: hep_labels(bgp, "n1-auto-hep") == {}, APPLY_TIMEOUT, "n1-auto-hep to lose the label")
        expect(bgp, {(n2, 1, 9090): True}, "n1 open again")
        c.apply(felix_yaml(autoHostEndpoints="Disabled"))
        for k in (1, 2, 3):
            wait_for(lambda k=k: hep_labels(bgp, f"n{k}-auto-hep") is None, APPLY_TIMEOUT,
                     f"n{k}-auto-hep to be deleted once switched off")
    finally:
        remove(bgp, "felixconfiguration", "default")
        remove(bgp, "globalnetworkpolicy", "blue-no-9090")
        for k in (1, 2, 3):
            remove(bgp, "hostendpoint", f"n{k}-auto-hep")


def test_pre_dnat_and_untracked_policies(bgp: BGPCluster) -> None:
    c = bgp.cluster
    n2, n3 = ns(bgp, 2), ns(bgp, 3)
    n3_net = f"{bgp.address(3)}/32"
    try:
        # preDNAT: deny 8080 from n3 before anything else; normal policy allows everything.
        c.apply(hep_yaml("n1-pre", "n1", "*", {"pre": "n1"}, ["projectcalico-default-allow"])
                + "---\n" + gnp_yaml("pre-no-8080-from-n3", selector="pre == 'n1'", preDNAT=True, applyOnForward=True,
                                     ingress=[{"action": "Deny", "protocol": "TCP", "source": {"nets": [n3_net]},
                                               "destination": {"ports": [8080]}}]))
        expect(bgp, {(n3, 1, 8080): False, (n3, 1, 9090): True, (n2, 1, 8080): True},
               "preDNAT denies 8080 from n3 only; what it does not decide goes on")
        remove(bgp, "globalnetworkpolicy", "pre-no-8080-from-n3")
        # doNotTrack: 9090 allowed untracked both ways; a normal deny-all closes the rest.
        c.apply(gnp_yaml("nt-9090", selector="pre == 'n1'", doNotTrack=True, applyOnForward=True,
                         types=["Ingress", "Egress"],
                         ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [9090]}}],
                         egress=[{"action": "Allow", "protocol": "TCP", "source": {"ports": [9090]}}])
                + "---\n" + gnp_yaml("deny-rest", selector="pre == 'n1'", ingress=[{"action": "Deny"}]))
        expect(bgp, {(n2, 1, 9090): True, (n2, 1, 8080): False, (n2, 1, 22): True},
               "untracked 9090 passes the normal deny-all; failsafe 22 too")
        assert "notrack" in c.nft(1, "list", "table", "inet", "tortie").stdout
    finally:
        remove(bgp, "globalnetworkpolicy", "pre-no-8080-from-n3")
        remove(bgp, "globalnetworkpolicy", "nt-9090")
        remove(bgp, "globalnetworkpolicy", "deny-rest")
        remove(bgp, "hostendpoint", "n1-pre")
    expect(bgp, {(n2, 1, 8080): True, (n3, 1, 8080): True}, "n1 open again")
