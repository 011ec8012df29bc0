"""Network sets end to end: resources applied with ``netctl``, programmed by the real agent, proven
by traffic from a pod to two addresses outside the cluster.

The two outside addresses: the fabric's own address (198.18.0.1, every node's default route) and
an "external" namespace made for the test, wired to node 1 by a veth on 198.19.<n>.0/30 (inside the
lab underlay range 198.18.0.0/15), each with a TCP server. Pods' traffic to them leaves through
NAT-outgoing, as traffic to any address outside the pools does.
"""

from __future__ import annotations

import json
import os
import secrets
import textwrap
from collections.abc import Iterator

import pytest

from netlab import netns as ip_netns
from netlab.cluster_lab import FABRIC_HOST, PYTHON, Check, ClusterLab
from netlab.lab import Pod
from netlab.probes import TCP_SERVER, rewritten
from netlab.wait import wait_for

pytestmark = pytest.mark.lab
PORT = 5580


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces and runs etcd and felix-agent")
    with ClusterLab("nset", 1) as lab:
        yield lab


@pytest.fixture(scope="module")
def external(cluster: ClusterLab) -> str:
    """The external namespace's address (its TCP server listening on PORT)."""
    lab = cluster.lab
    ns = f"{lab.name}-p{secrets.token_hex(4)}"  # named like a pod's: recorded, always removed by the lab
    lab._add_netns(ns)
    n = int(secrets.token_hex(1), 16)
    node_side, ext_side = f"198.19.{n}.1", f"198.19.{n}.2"
    node_ns = cluster.node(1).netns
    ip_netns.add_veth(node_ns, f"ext{n}", ns, "eth0")
    ip_netns.add_address(node_ns, f"ext{n}", f"{node_side}/30")
    ip_netns.add_address(ns, "eth0", f"{ext_side}/30")
    lab.exec(ns, "ip", "link", "set", "lo", "up")
    lab.exec(ns, "ip", "route", "add", "default", "via", node_side)
    lab.start_process(ns, [str(PYTHON), "-c", TCP_SERVER, str(PORT)], cluster.work / f"ext-{PORT}.log", {})
    wait_for(lambda: lab.exec(ns, "ss", "-Hltn", f"sport = :{PORT}").stdout.strip(), 10, "the external server")
    cluster.fabric_listener(PORT)
    return ext_side


@pytest.fixture(scope="module")
def pods(cluster: ClusterLab) -> dict[str, Pod]:
    return {"client": cluster.add_pod(1, "client", namespace="front", labels={"app": "client"}),
            "other": cluster.add_pod(1, "other", namespace="back", labels={"app": "other"})}




def reaches(pod: Pod, fabric: bool, external: bool, ext: str) -> dict[Check, bool]:
    return {Check(pod, FABRIC_HOST, PORT): fabric, Check(pod, ext, PORT): external,
            Check(pod, FABRIC_HOST): fabric, Check(pod, ext): external}


def test_both_outside_addresses_are_reachable_without_policy(cluster: ClusterLab, pods: dict[str, Pod],
                                                             external: str) -> None:
    cluster.expect(reaches(pods["client"], True, True, external), what="no policy: both reachable")


def test_egress_only_to_a_global_network_set_and_editing_nets_flips_it(cluster: ClusterLab, pods: dict[str, Pod],
                                                                       external: str) -> None:
    gns = """
        apiVersion: projectcalico.org/v3
        kind: GlobalNetworkSet
        metadata: {{name: allowed-out, labels: {{role: allowed}}}}
        spec:
          nets: [{net}]
        """
    policy = """
        apiVersion: projectcalico.org/v3
        kind: GlobalNetworkPolicy
        metadata: {name: client-egress-allowed-only}
        spec:
          selector: app == 'client'
          types: [Egress]
          egress:
          - action: Allow
            destination: {selector: role == 'allowed'}
        """
    with cluster.applied(textwrap.dedent(gns.format(net=f"{FABRIC_HOST}/32")) + "---\n" + textwrap.dedent(policy)):
        cluster.expect({**reaches(pods["client"], True, False, external),
                        **reaches(pods["other"], True, True, external)}, what="only the fabric host allowed")
        handles = cluster.rule_handles(1)
        cluster.apply(textwrap.dedent(gns.format(net=f"{external}/32")))
        cluster.expect(reaches(pods["client"], False, True, external), what="nets edited: only the external one")
        assert not rewritten(handles, cluster.rule_handles(1)), "a change of nets rewrote rules"
        cluster.apply(textwrap.dedent(gns.format(net="198.18.0.0/15")))  # both, as one CIDR
        cluster.expect(reaches(pods["client"], True, True, external), what="nets widened to the underlay range")
        assert not rewritten(handles, cluster.rule_handles(1))
    cluster.expect(reaches(pods["client"], True, True, external), what="policy and set deleted")


def test_a_namespaced_network_set_through_a_network_policy_of_its_namespace(
        cluster: ClusterLab, pods: dict[str, Pod], external: str) -> None:
    """The NetworkSet in ``front`` is matched by front's policy; the one in ``back`` with the same label,
    holding the fabric host, is not (a NetworkPolicy's selector sees its own namespace only)."""
    with cluster.applied(f"""
            apiVersion: projectcalico.org/v3
            kind: NetworkSet
            metadata: {{name: partner, namespace: front, labels: {{role: partner}}}}
            spec:
              nets: ['{external}']
            ---
            apiVersion: projectcalico.org/v3
            kind: NetworkSet
            metadata: {{name: partner, namespace: back, labels: {{role: partner}}}}
            spec:
              nets: ['{FABRIC_HOST}/32']
            ---
            apiVersion: projectcalico.org/v3
            kind: NetworkPolicy
            metadata: {{name: to-partner, namespace: front}}
            spec:
              selector: app == 'client'
              types: [Egress]
              egress:
              - action: Allow
                destination: {{selector: role == 'partner'}}
            """):
        cluster.expect(reaches(pods["client"], False, True, external), what="front's partner set only")
    cluster.expect(reaches(pods["client"], True, True, external), what="policy and sets deleted")


def test_lab_matrix_explain_names_the_network_set_that_decided() -> None:
    """``netctl lab matrix --explain``: pod1's egress is allowed only to a GlobalNetworkSet holding pod2's
    address; the explanation of pod1 -> pod2 names the set, and the matrix agrees with it."""
    from netlab.lab import STATE_ROOT, destroy_by_name
    from tests.lab.test_netctl_lab import matrix, netctl, wait_until

    name = f"ns{secrets.token_hex(3)}"
    try:
        netctl("lab", "up", "--name", name, "--nodes", "2", "--mode", "vxlan", "--pods-per-node", "1")
        pod2 = next(p for p in json.loads(netctl("lab", "status", "--name", name, "-o", "json").stdout)["pods"]
                    if p["name"] == "pod2")
        address = pod2["addresses"][0].split("/")[0]
        resources = STATE_ROOT / name / "netsets.yaml"
        resources.write_text(textwrap.dedent(f"""\
            apiVersion: projectcalico.org/v3
            kind: GlobalNetworkSet
            metadata: {{name: to-pod2, labels: {{role: allowed}}}}
            spec: {{nets: ['{address}/32']}}
            ---
            apiVersion: projectcalico.org/v3
            kind: GlobalNetworkPolicy
            metadata: {{name: pod1-out}}
            spec:
              selector: tortie.dev/name == 'pod1'
              types: [Egress]
              egress:
              - action: Allow
                destination: {{selector: role == 'allowed'}}
            """))
        netctl("lab", "exec", "--name", name, "n1", "--", "netctl", "apply", "-f", str(resources))
        wait_until(lambda: matrix(name)["results"]["icmp"]["pod1"]["pod2"], 20, "pod1 to reach pod2")
        icmp = json.loads(netctl("lab", "matrix", "--name", name, "--explain", "pod1", "pod2", "-o", "json").stdout)[0]
        assert icmp["allowed"] and icmp["egress"]["policy"] == "gnp/pod1-out"
        assert icmp["egress"]["networkSets"] == [f"GlobalNetworkSet to-pod2 ({address} in {address}/32)"]
        text = netctl("lab", "matrix", "--name", name, "--explain", "pod1", "pod2").stdout
        assert "matched through GlobalNetworkSet to-pod2" in text
    finally:
        destroy_by_name(name)
