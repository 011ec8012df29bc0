"""Tortie's BGP as a network team configures it, checked from routers Tortie did not write: FRR 8.4
(``bgpd`` in a lab namespace) and BIRD 2 as external peers of two nodes.

One lab: nodes 1 and 2 run agents (mesh between them), node 3 runs FRR, node 4 BIRD. What FRR
and BIRD see (``show ip bgp ... json``, ``birdc show route all``) and what reaches a node's
kernel is asserted; nothing sleeps for a fixed time.

- an export filter rejecting pool B: FRR gets pool A's block only, while the mesh peer (no
  filter) gets both;
- an import filter rejecting one of FRR's two /24s: the other one is in the node's kernel, this
  one never is;
- the communities of ``prefixAdvertisements`` on FRR and on BIRD;
- ``serviceClusterIPs`` announced by both nodes, then withdrawn live when removed;
- ``localASNumber``: FRR sees it as the nodes' AS;
- ``netctl node status``: filters, prefixes received / accepted / sent;
- the filter emptied while the sessions stay up: what it refused goes out and comes in.

A second lab: a Tortie route reflector whose session to FRR (an iBGP client) carries the filter:
it applies to reflected routes both ways, as Calico documents.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from typing import Any

import pytest

from netlab.bgp_cluster import (
    ASN,
    BIRD_ASN,
    CONVERGE,
    BGPCluster,
    bgp_peer_yaml,
    bird_external_config,
    documents,
    node_yaml,
    start_bird,
)
from netlab.cluster_lab import POOL_V6
from netlab.frr import Frr, frr_config
from netlab.wait import wait_for

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.environ.get("TORTIE_BGP_CLUSTER_TESTS") == "0", reason="TORTIE_BGP_CLUSTER_TESTS=0"),
    pytest.mark.skipif(shutil.which("vtysh") is None, reason="FRR is not installed (scripts/install-deps.sh)"),
]

FRR_ASN = 65002
LOCAL_ASN = 64600  # the AS the nodes claim towards FRR (BGPPeer localASNumber)
POOL_A, POOL_B = "10.244.0.0/16", "10.245.0.0/16"
BLOCK_A, BLOCK_B = "10.244.0.0/26", "10.245.0.0/26"
SERVICES = "10.96.0.0/12"
KEPT, REFUSED = "198.51.100.0/24", "192.0.2.0/24"  # what FRR announces; the import filter refuses one
STANDARD, LARGE = "64512:100", "64512:1:2"


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")


def pools() -> str:
    return textwrap.dedent(f"""\
        apiVersion: tortie.dev/v1
        kind: IPPool
        metadata: {{name: pool-a}}
        spec: {{cidr: {POOL_A}, blockSize: 26, vxlanMode: Never, ipipMode: Never, natOutgoing: false}}
        ---
        apiVersion: tortie.dev/v1
        kind: IPPool
        metadata: {{name: pool-b}}
        spec: {{cidr: {POOL_B}, blockSize: 26, vxlanMode: Never, ipipMode: Never, natOutgoing: false}}
        ---
        apiVersion: tortie.dev/v1
        kind: IPPool
        metadata: {{name: pool-v6}}
        spec: {{cidr: '{POOL_V6}', blockSize: 122, vxlanMode: Never, natOutgoing: false}}
        """)


def bgp_configuration(*, services: bool) -> str:
    spec: dict[str, Any] = {
        "asNumber": ASN,
        "communities": [{"name": "pods", "value": STANDARD}, {"name": "pods-large", "value": LARGE}],
        "prefixAdvertisements": [{"cidr": POOL_A, "communities": ["pods", "pods-large"]}],
    }
    if services:
        spec["serviceClusterIPs"] = [{"cidr": SERVICES}]
    return json.dumps({"apiVersion": "tortie.dev/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
                       "spec": spec}) + "\n"


def bgp_filter() -> str:
    spec = {"exportV4": [{"action": "Reject", "matchOperator": "In", "cidr": POOL_B}],
            "importV4": [{"action": "Reject", "matchOperator": "Equal", "cidr": REFUSED}]}
    return json.dumps({"apiVersion": "tortie.dev/v1", "kind": "BGPFilter", "metadata": {"name": "tor-policy"},
                       "spec": spec}) + "\n"


def communities(path: dict[str, Any]) -> tuple[str, str]:
    return (path.get("community", {}).get("string", ""), path.get("largeCommunity", {}).get("string", ""))


def test_frr_and_bird_see_filters_communities_services_and_local_as() -> None:
    frr_ip, bird_ip = "198.18.0.13", "198.18.0.14"  # lab nodes 3 and 4
    preamble = documents(
        bgp_configuration(services=True), bgp_filter(),
        bgp_peer_yaml("tor", peerIP=frr_ip, asNumber=FRR_ASN, localASNumber=LOCAL_ASN, filters=["tor-policy"]),
        bgp_peer_yaml("bird", peerIP=bird_ip, asNumber=BIRD_ASN))
    with BGPCluster("bgf", 4, agents=[1, 2], pools=pools(), preamble=preamble) as bgp:
        nodes = [1, 2]
        assert (bgp.address(3), bgp.address(4)) == (frr_ip, bird_ip)
        frr = Frr(bgp.lab, 3)
        try:
            frr.start(frr_config(frr_ip, FRR_ASN, {bgp.address(k): LOCAL_ASN for k in nodes},
                                 networks=[KEPT, REFUSED]))
            bird = start_bird(bgp, 4, bird_external_config(bird_ip, [bgp.address(k) for k in nodes]))
            # Node 1 holds an address of each pool: a block of each.
            bgp.assign(1, "h-a", "n1", addresses=["10.244.0.5"])
            bgp.assign(1, "h-b", "n1", addresses=["10.245.0.5"])

            # localASNumber: FRR's sessions come up with the nodes as AS 64600.
            def frr_up() -> bool:
                seen = frr.neighbors()
                return all(seen.get(bgp.address(k), {}).get("bgpState") == "Established" for k in nodes)
            wait_for(frr_up, CONVERGE, "FRR's sessions to both nodes", describe=lambda: json.dumps(frr.neighbors()))
            assert {a: n["remoteAs"] for a, n in frr.neighbors().items()} == {bgp.address(k): LOCAL_ASN for k in nodes}

            # Export filter: FRR gets pool A's block, never pool B's; the mesh peer gets both.
            wait_for(lambda: BLOCK_A in frr.routes(), CONVERGE, "FRR to learn pool A's block",
                     describe=lambda: json.dumps(frr.routes()))
            bgp.wait_routes(2, {BLOCK_A: bgp.address(1), BLOCK_B: bgp.address(1)})
            assert BLOCK_B not in frr.routes()

            # Service CIDR: from both nodes (two paths), with the nodes as next hops.
            def service_paths() -> set[str]:
                return {p.get("peerId", "") for p in frr.routes().get(SERVICES, [])}
            wait_for(lambda: service_paths() == {bgp.address(k) for k in nodes}, CONVERGE,
                     "FRR to learn the service CIDR from both nodes", describe=lambda: json.dumps(frr.route(SERVICES)))

            # Communities of prefixAdvertisements: on pool A's block, not on the service CIDR.
            paths = frr.route(BLOCK_A)["paths"]
            assert [communities(p) for p in paths] == [(STANDARD, LARGE)], paths
            assert all(communities(p) == ("", "") for p in frr.route(SERVICES)["paths"])

            # Import filter: FRR's other /24 reaches the kernel, the refused one never does.
            bgp.wait_routes(1, {KEPT: frr_ip})
            bgp.wait_routes(2, {KEPT: frr_ip})
            for k in nodes:
                assert REFUSED not in bgp.bgp_routes(k)

            # BIRD sees the communities too (no filter on its sessions: both blocks).
            def bird_block() -> str:
                # birdc exits 1 with "Network not found" until the route has come: not yet, not an error.
                try:
                    return bird.birdc("show", "route", "all", BLOCK_A)
                except subprocess.CalledProcessError as e:
                    return str(e.stdout or "")
            wait_for(lambda: "BGP.community" in bird_block(), CONVERGE, "BIRD to learn pool A's block",
                     describe=bird_block)
            text = bird_block()
            assert "(64512,100)" in text and "(64512, 1, 2)" in text, text

            # netctl node status: filters and prefix counts per peer.
            def tor_status() -> dict[str, Any]:
                return bgp.sessions(1)[frr_ip]
            wait_for(lambda: tor_status().get("prefixesReceived") == 2, CONVERGE, "node status to count FRR's routes",
                     describe=lambda: json.dumps(tor_status()))
            tor = tor_status()
            assert (tor["filters"], tor["prefixesReceived"], tor["prefixesAccepted"], tor["prefixesSent"]) == \
                (["tor-policy"], 2, 1, 2), tor  # sent: pool A's block and the service CIDR
            assert {"peerAddress", "peerType", "state", "since", "info"} <= set(tor)
            mesh = bgp.sessions(1)[bgp.address(2)]
            assert (mesh["filters"], mesh["prefixesSent"]) == ([], 3), mesh
            table = bgp.cluster.netctl("node", "status", "--node", "n1").stdout
            assert "tor-policy" in table and "ACCEPTED" in table, table

            # Removing the service CIDR withdraws it live, from both nodes.
            bgp.cluster.apply(bgp_configuration(services=False))
            wait_for(lambda: SERVICES not in frr.routes(), CONVERGE, "FRR to lose the service CIDR",
                     describe=lambda: json.dumps(frr.routes()))
            assert BLOCK_A in frr.routes()

            # The filter emptied, live: FRR gets pool B's block, the refused /24 reaches the kernel.
            bgp.cluster.apply(json.dumps({"apiVersion": "tortie.dev/v1", "kind": "BGPFilter",
                                          "metadata": {"name": "tor-policy"}, "spec": {}}) + "\n")
            wait_for(lambda: BLOCK_B in frr.routes(), CONVERGE, "FRR to learn pool B's block once unfiltered",
                     describe=lambda: json.dumps(frr.routes()))
            bgp.wait_routes(1, {KEPT: frr_ip, REFUSED: frr_ip})
        finally:
            frr.stop()


# -- route reflectors with filters ----------------------------------------------------------------


def test_a_reflector_applies_the_filters_of_a_clients_session_to_reflected_routes() -> None:
    """Calico's BGPFilter on a route reflector (``BGPPeer.spec.filters`` of a session to a client):
    its export rules apply to what the reflector sends that client, reflected routes of other
    clients included, and its import rules to what that client sends, so a refused route is
    neither installed on the reflector nor reflected to the other clients.

    n1 reflects (``routeReflectorClusterID``, mesh off); n2 is a Tortie client and holds a block
    of each pool; FRR on n3 is an iBGP client of n1 through a BGPPeer carrying the filter (export:
    reject pool B; import: reject one of FRR's two /24s)."""
    frr_ip, cluster_id = "198.18.0.13", "224.0.0.7"
    preamble = documents(
        json.dumps({"apiVersion": "tortie.dev/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
                    "spec": {"asNumber": ASN, "nodeToNodeMeshEnabled": False}}) + "\n",
        node_yaml("n1", "198.18.0.11", labels={"rr": "true"}, cluster_id=cluster_id),
        bgp_filter(),
        bgp_peer_yaml("to-reflector", nodeSelector="all()", peerSelector="rr == 'true'"),
        bgp_peer_yaml("frr-client", node="n1", peerIP=frr_ip, asNumber=ASN, filters=["tor-policy"]))
    with BGPCluster("bgr", 3, agents=[1, 2], pools=pools(), preamble=preamble) as bgp:
        assert (bgp.address(1), bgp.address(3)) == ("198.18.0.11", frr_ip)
        frr = Frr(bgp.lab, 3)
        try:
            frr.start(frr_config(frr_ip, ASN, {bgp.address(1): ASN}, networks=[KEPT, REFUSED]))
            bgp.assign(1, "h-a", "n2", addresses=["10.244.0.5"])
            bgp.assign(1, "h-b", "n2", addresses=["10.245.0.5"])
            bgp.wait_established(1, [2, frr_ip], timeout=CONVERGE)
            assert bgp.sessions(1)[frr_ip]["peerType"] == "rr client"

            # Export side: the reflector has both of n2's blocks, and reflects only pool A's to FRR,
            # with n2 as next hop and the reflection attributes (originator n2, our cluster ID).
            bgp.wait_routes(1, {BLOCK_A: bgp.address(2), BLOCK_B: bgp.address(2)})
            wait_for(lambda: BLOCK_A in frr.routes(), CONVERGE, "FRR to get pool A's block reflected",
                     describe=lambda: json.dumps(frr.routes()))
            path = frr.route(BLOCK_A)["paths"][0]
            assert path["nexthops"][0]["ip"] == bgp.address(2), path
            assert path.get("originatorId") == bgp.address(2), path
            assert [c for c in path.get("clusterList", {}).get("list", [])] == [cluster_id], path

            def frr_sent() -> Any:
                return bgp.sessions(1)[frr_ip].get("prefixesSent")
            wait_for(lambda: frr_sent() == 1, CONVERGE, "the reflector to count what it sends FRR",
                     describe=lambda: json.dumps(bgp.sessions(1)[frr_ip]))
            assert BLOCK_B not in frr.routes()

            # Import side: FRR's kept /24 is installed on the reflector and reflected to n2; the
            # refused one reaches neither kernel.
            bgp.wait_routes(1, {KEPT: frr_ip})
            bgp.wait_routes(2, {KEPT: frr_ip})
            wait_for(lambda: bgp.sessions(1)[frr_ip].get("prefixesReceived") == 2, CONVERGE,
                     "the reflector to count FRR's routes", describe=lambda: json.dumps(bgp.sessions(1)[frr_ip]))
            assert bgp.sessions(1)[frr_ip]["prefixesAccepted"] == 1
            for k in (1, 2):
                assert REFUSED not in bgp.bgp_routes(k)

            # The filter emptied, live: the reflector reflects pool B's block to FRR, and the
            # refused /24 to n2.
            bgp.cluster.apply(json.dumps({"apiVersion": "tortie.dev/v1", "kind": "BGPFilter",
                                          "metadata": {"name": "tor-policy"}, "spec": {}}) + "\n")
            wait_for(lambda: BLOCK_B in frr.routes(), CONVERGE, "FRR to get pool B's block once unfiltered",
                     describe=lambda: json.dumps(frr.routes()))
            bgp.wait_routes(2, {KEPT: frr_ip, REFUSED: frr_ip})
        finally:
            frr.stop()
