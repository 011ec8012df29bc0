"""BGP between felix-agents (``felix-agent --bgp``) in real labs: the node-to-node mesh, Tortie
route reflectors, BIRD 2 as an external router and as a reflector, borrowed addresses, and the bad
configurations ``netctl`` refuses. Every claim is checked by traffic between pods or by kernel
routes (protocol 81), with ``wait_for``; no fixed sleep.

Pools have no encapsulation (routes between nodes come only from BGP). IPv4 only: the lab's nodes
have no IPv6 address, so no IPv6 session is made. Each test builds its own lab (unique name) and
tears it down, even on failure. Figures are printed, never asserted (``bench/bgp_bench.py``).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import time
from pathlib import Path

import pytest

from netlab.bgp_cluster import (
    ASN,
    BIRD_ASN,
    CLUSTER_ID,
    CONVERGE,
    HOLD,
    ORPHAN_GRACE,
    BGPCluster,
    PingRun,
    bgp_configuration_yaml,
    bgp_peer_yaml,
    bgp_pools,
    bird_established,
    bird_external_config,
    bird_reflector_config,
    documents,
    node_yaml,
    processes,
    start_bird,
)
from netlab.bird import RouteMonitor
from netlab.cluster_lab import NETCTL, Check, v4
from netlab.lab import Pod
from netlab.wait import wait_for

# Part of every run (about 3 minutes in all, on 2 CPUs). TORTIE_BGP_CLUSTER_TESTS=0 skips them, for a
# quick local run on a machine without BIRD or ExaBGP.
pytestmark = [pytest.mark.lab, pytest.mark.skipif(os.environ.get("TORTIE_BGP_CLUSTER_TESTS") == "0",
                                                  reason="TORTIE_BGP_CLUSTER_TESTS=0")]

MESH = "node-to-node mesh"
REFLECTOR = "route reflector"
CLIENT = "rr client"
GLOBAL = "global"
SERVICE = "10.96.0.10/32"


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")


def block(pod: Pod, size: int = 26) -> str:
    return str(ipaddress.ip_network(f"{v4(pod)}/{size}", strict=False))


def all_pairs(pods: list[Pod]) -> dict[Check, bool]:
    return {Check(a, b): True for a, b in itertools.permutations(pods, 2)}


# -- 1. the node-to-node mesh ---------------------------------------------------------------------


def test_mesh_learns_blocks_survives_kill_cut_restart_and_nodes_joining_and_leaving() -> None:
    with BGPCluster("bgm", 4, agents=[1, 2, 3]) as bgp:
        c = bgp.cluster
        pods = {k: c.add_pod(k, f"pod{k}") for k in (1, 2, 3)}
        blocks = {k: block(p) for k, p in pods.items()}

        # Every node learns the others' blocks over BGP, next hop the owner, and nothing else.
        for k in (1, 2, 3):
            bgp.wait_routes(k, {blocks[j]: bgp.address(j) for j in (1, 2, 3) if j != k}, exactly=True)
        c.expect(all_pairs(list(pods.values())), what="pods on different nodes to reach each other")
        for k in (1, 2, 3):
            sessions = bgp.wait_established(k, [j for j in (1, 2, 3) if j != k], kind=MESH)
            assert len(sessions) == 2, sessions
            metrics = c.metrics(k)
            assert metrics['felix_bgp_sessions{state="Established"}'] == 2
            assert metrics["felix_bgp_routes_learned"] == 2
            assert metrics["felix_bgp_routes_announced"] >= 1

        # A hard-killed agent: its routes leave the others within the hold time (its orphaned
        # ExaBGP withdraws them after ORPHAN_GRACE seconds).
        killed = time.monotonic()
        c.kill_agent(3)
        for k in (1, 2):
            bgp.wait_no_route(k, blocks[3], HOLD)
        gone_after = time.monotonic() - killed
        print(f"\nkilled agent's block gone from both peers after {gone_after:.2f} s "
              f"(hold time {HOLD} s, orphan grace {ORPHAN_GRACE:g} s)")
        for k in (1, 2):
            assert bgp.bgp_routes(k) == {blocks[j]: bgp.address(j) for j in (1, 2) if j != k}
        assert not c.can_ping(pods[1], pods[3])
        # Its ExaBGP does not outlive it: the API process stops it once the withdrawals are out.
        wait_for(lambda: not processes(bgp, 3, "exabgp"), 15, "the killed agent's ExaBGP to exit",
                   describe=lambda: str(processes(bgp, 3, "exabgp")))

        c.start_agent(3)
        c.wait_ready(3)
        for k in (1, 2):
            bgp.wait_routes(k, {blocks[3]: bgp.address(3)})
        c.expect(all_pairs(list(pods.values())), what="the restarted node's pod to be reachable again")

        # A node cut off without a word (its BGP packets dropped, as a dead host would): its routes
        # go when the hold timer expires, graceful restart notwithstanding.
        bgp.wait_established(3, [1, 2], kind=MESH)
        cut = time.monotonic()
        bgp.cut_bgp(3)
        for k in (1, 2):
            bgp.wait_no_route(k, blocks[3], HOLD + 3)  # + ExaBGP's timer tick and the agent under load
        print(f"cut-off node's block gone from both peers after {time.monotonic() - cut:.2f} s (hold time {HOLD} s)")
        bgp.uncut_bgp(3)
        for k in (1, 2):
            bgp.wait_routes(k, {blocks[3]: bgp.address(3)})
        bgp.wait_routes(3, {blocks[1]: bgp.address(1), blocks[2]: bgp.address(2)}, exactly=True)
        c.expect(all_pairs(list(pods.values())), what="the cut-off node's pod to be reachable again")

        # Graceful restart (SIGTERM, start): a ping between a pod on the restarted node and one
        # on another node loses nothing; neither side drops a route meanwhile.
        with RouteMonitor(c.node(1).netns) as on_n1, RouteMonitor(c.node(2).netns) as on_n2:
            ping = PingRun.start(bgp, pods[1], v4(pods[2]), "graceful")
            ping.wait_replies(20)
            restarted = time.monotonic()
            c.stop_agent(1)
            c.start_agent(1)
            c.wait_ready(1)
            bgp.wait_established(1, [2, 3], kind=MESH)
            for k in (2, 3):
                bgp.wait_established(k, [1], exactly=False)
            bgp.wait_routes(1, {blocks[j]: bgp.address(j) for j in (2, 3)}, exactly=True)
            ping.wait_replies(40)  # two more seconds of traffic once everything is back
            sent, lost = ping.stop()
            print(f"graceful restart: {sent} echo requests over {time.monotonic() - restarted:.1f} s, "
                  f"{len(lost)} lost")
            assert lost == [], f"echo requests lost during the graceful restart: {lost}"
            assert on_n1.deletions(blocks[2], restarted) == [] and on_n1.deletions(blocks[3], restarted) == []
            assert on_n2.deletions(blocks[1], restarted) == []

        # A port change in FelixConfiguration re-executes the agent (same PID, a new image). Its
        # ExaBGP restarts as on SIGTERM, and graceful restart keeps every route on both sides: no
        # echo is lost, and the sessions come back.
        node1 = f"node.{c.node(1).name}"
        with RouteMonitor(c.node(1).netns) as on_n1, RouteMonitor(c.node(2).netns) as on_n2:
            ping = PingRun.start(bgp, pods[1], v4(pods[2]), "reexec")
            ping.wait_replies(20)
            pid, starts = c.agents[1], c.agent_output(1).count("felix-agent started on node")
            reexec = time.monotonic()
            c.apply(json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
                                "metadata": {"name": node1}, "spec": {"healthPort": 9199}}))
            wait_for(lambda: c.agent_output(1).count("felix-agent started on node") > starts, 30,
                     "node 1's agent to start again", describe=lambda: c.agent_output(1)[-3000:])
            assert c.agents[1] == pid and f"re-executing felix-agent (pid {pid})" in c.agent_output(1)
            wait_for(lambda: c.http(1, "/readiness", port=9199).status == 200, 30, "readiness on port 9199")
            bgp.wait_established(1, [2, 3], kind=MESH)
            bgp.wait_routes(1, {blocks[j]: bgp.address(j) for j in (2, 3)}, exactly=True)
            ping.wait_replies(40)
            sent, lost = ping.stop()
            print(f"re-exec with --bgp: {sent} echo requests over {time.monotonic() - reexec:.1f} s, {len(lost)} lost")
            assert lost == [], f"echo requests lost across the re-exec: {lost}"
            assert on_n1.deletions(blocks[2], reexec) == [] and on_n1.deletions(blocks[3], reexec) == []
            assert on_n2.deletions(blocks[1], reexec) == []
        c.netctl("delete", "felixconfiguration", node1)
        wait_for(lambda: c.readiness(1) == 200, 30, "readiness on port 9099 again")
        assert c.agents[1] == pid
        # That was one more re-exec: its sessions come back before the next step counts them.
        bgp.wait_established(1, [2, 3], kind=MESH)
        for k in (2, 3):
            bgp.wait_established(k, [1], exactly=False)

        # A fourth node joins: it peers with everyone, and the sessions already up stay up.
        before = {k: bgp.established(k) for k in (1, 2, 3)}
        assert all(len(s) == 2 for s in before.values()), before
        with RouteMonitor(c.node(1).netns) as on_n1:
            joined = time.monotonic()
            c.start_agent(4)
            c.wait_ready(4)
            pods[4] = c.add_pod(4, "pod4")
            blocks[4] = block(pods[4])
            for k in (1, 2, 3, 4):
                bgp.wait_established(k, [j for j in (1, 2, 3, 4) if j != k], kind=MESH)
                bgp.wait_routes(k, {blocks[j]: bgp.address(j) for j in (1, 2, 3, 4) if j != k}, exactly=True)
            assert on_n1.deletions(blocks[2], joined) == [] and on_n1.deletions(blocks[3], joined) == []
        for k in (1, 2, 3):
            after = bgp.established(k)
            assert {a: after.get(a) for a in before[k]} == before[k], \
                f"node {k}'s existing sessions were reset by the join: {before[k]} -> {after}"
        c.expect(all_pairs(list(pods.values())), what="every pod, the new node's included, to reach every other")

        # ... and leaves (its pod deleted, its agent stopped, its Node deleted): the others drop
        # the session and its routes at once, and keep the sessions among themselves.
        before = {k: bgp.established(k) for k in (1, 2, 3)}
        c.delete_pod(pods.pop(4))
        c.stop_agent(4)
        c.delete("node", "n4", missing_ok=False)
        for k in (1, 2, 3):
            bgp.wait_peers(k, [j for j in (1, 2, 3) if j != k])
            bgp.wait_routes(k, {blocks[j]: bgp.address(j) for j in (1, 2, 3) if j != k}, exactly=True)
            after = bgp.established(k)
            kept = {a: s for a, s in before[k].items() if a != bgp.address(4)}
            assert {a: after.get(a) for a in kept} == kept, f"node {k}'s sessions were reset by the leave"
        c.expect(all_pairs(list(pods.values())), what="the remaining pods to reach each other")


# -- 2. Tortie route reflectors, mesh off ---------------------------------------------------------


def test_route_reflectors_with_the_mesh_off() -> None:
    rr_peer = bgp_peer_yaml("to-reflectors", nodeSelector="all()", peerSelector="rr == 'true'")
    preamble = documents(bgp_configuration_yaml(mesh=False),
                         node_yaml("n1", "198.18.0.11", labels={"rr": "true"}, cluster_id=CLUSTER_ID), rr_peer)
    with BGPCluster("bgr", 5, preamble=preamble) as bgp:
        c = bgp.cluster
        assert bgp.address(1) == "198.18.0.11"
        pods = {k: c.add_pod(k, f"pod{k}") for k in range(1, 6)}
        blocks = {k: block(p) for k, p in pods.items()}

        bgp.wait_established(1, [2, 3, 4, 5], kind=CLIENT)
        for k in range(2, 6):
            bgp.wait_established(k, [1], kind=REFLECTOR)  # the only session: no mesh
        for k in range(1, 6):
            bgp.wait_routes(k, {blocks[j]: bgp.address(j) for j in range(1, 6) if j != k}, exactly=True)
        c.expect(all_pairs(list(pods.values())), what="every pod to reach every other through the reflector")

        # A second reflector of the same cluster: clients peer with both, the two with each other.
        c.apply(node_yaml("n2", bgp.address(2), labels={"rr": "true"}, cluster_id=CLUSTER_ID))
        bgp.wait_established(1, [3, 4, 5], kind=CLIENT, exactly=False)
        bgp.wait_established(1, [2], kind=REFLECTOR, exactly=False)
        bgp.wait_established(2, [3, 4, 5], kind=CLIENT, exactly=False)
        bgp.wait_established(2, [1], kind=REFLECTOR, exactly=False)
        for k in (1, 2):
            assert len(bgp.sessions(k)) == 4, bgp.sessions(k)
        for k in (3, 4, 5):
            bgp.wait_established(k, [1, 2], kind=REFLECTOR)
        for k in range(1, 6):
            bgp.wait_routes(k, {blocks[j]: bgp.address(j) for j in range(1, 6) if j != k}, exactly=True)

        # One reflector dies (agent SIGKILLed: its ExaBGP tears its sessions down): the other
        # still carries every route between the rest, and a running ping loses nothing.
        survivors = [pods[k] for k in range(2, 6)]
        ping = PingRun.start(bgp, pods[3], v4(pods[4]), "reflector-down")
        ping.wait_replies(20)
        with RouteMonitor(c.node(3).netns) as on_n3:
            killed = time.monotonic()
            c.kill_agent(1)
            for k in range(2, 6):
                bgp.wait_no_route(k, blocks[1], HOLD)
            for k in (3, 4, 5):
                bgp.wait_down(k, 1, HOLD)
            ping.wait_replies(40)
            assert [d for d in (blocks[2], blocks[4], blocks[5]) if on_n3.deletions(d, killed)] == []
        sent, lost = ping.stop()
        assert lost == [], f"{len(lost)} of {sent} echo requests lost when a reflector died: {lost}"
        for k in range(2, 6):
            bgp.wait_routes(k, {blocks[j]: bgp.address(j) for j in range(2, 6) if j != k}, exactly=True)
        c.expect(all_pairs(survivors), what="the pods of the surviving nodes to still reach each other")


# -- 3. BIRD 2 as an external router, then as the reflector ---------------------------------------


def test_bird_as_external_peer_and_as_route_reflector(tmp_path: Path) -> None:
    bird_ip = "198.18.0.14"
    password = "tortie #1; secret"  # TCP-MD5, with characters ExaBGP's tokenizer would trip on
    key = tmp_path / "tor.key"  # the key stays on the nodes: etcd holds only its path
    key.write_text(password + "\n")
    preamble = bgp_peer_yaml("tor", peerIP=bird_ip, asNumber=BIRD_ASN, password={"file": {"path": str(key)}})
    with BGPCluster("bgb", 4, agents=[1, 2, 3], preamble=preamble) as bgp:
        c = bgp.cluster
        nodes = [1, 2, 3]
        assert bgp.address(4) == bird_ip
        pods = {k: c.add_pod(k, f"pod{k}") for k in nodes}
        blocks = {k: block(p) for k, p in pods.items()}
        # The "service" lives in BIRD's namespace; BIRD announces it and routes back to the pods.
        c.exec(4, "ip", "addr", "add", SERVICE, "dev", "lo")
        bird = start_bird(bgp, 4, bird_external_config(bird_ip, [bgp.address(k) for k in nodes], services=[SERVICE],
                                                       password=password))

        want_bird = {blocks[k]: bgp.address(k) for k in nodes}
        wait_for(lambda: {p: nh for p, nh in bird.routes().items() if p in want_bird} == want_bird, CONVERGE,
                   "BIRD to learn every block with its node as next hop",
                   describe=lambda: bird.birdc("show", "protocols") + bird.birdc("show", "route"))
        for k in nodes:
            bgp.wait_established(k, [j for j in nodes if j != k], kind=MESH, exactly=False)
            assert bgp.wait_established(k, [bird_ip], exactly=False)[bird_ip]["peerType"] == GLOBAL
            bgp.wait_routes(k, {SERVICE: bird_ip, **{blocks[j]: bgp.address(j) for j in nodes if j != k}},
                            exactly=True)
        c.expect({Check(p, SERVICE.split("/")[0]): True for p in pods.values()},
                 what="every pod to reach the service BIRD announces")

        # BIRD as the only route reflector: mesh off, the global peer now iBGP.
        bird.stop()
        c.apply(documents(bgp_configuration_yaml(mesh=False), bgp_peer_yaml("tor", peerIP=bird_ip, asNumber=ASN)))
        for k in nodes:
            bgp.wait_peers(k, [bird_ip])  # the mesh sessions are gone
        bird = start_bird(bgp, 4, bird_reflector_config(bird_ip, [bgp.address(k) for k in nodes]))
        wait_for(lambda: len(bird_established(bird)) == len(nodes), CONVERGE, "BIRD's sessions to every node",
                   describe=lambda: bird.birdc("show", "protocols"))
        for k in nodes:
            bgp.wait_established(k, [bird_ip])
            bgp.wait_routes(k, {blocks[j]: bgp.address(j) for j in nodes if j != k}, exactly=True)
        c.expect(all_pairs(list(pods.values())), what="every pod to reach every other through BIRD reflecting")


# -- 4. borrowed addresses ------------------------------------------------------------------------


def test_a_borrowed_address_is_reachable_from_other_nodes() -> None:
    # 10.245.0.0/28 in /30 blocks: four blocks of four addresses.
    with BGPCluster("bgw", 3, pools=bgp_pools("10.245.0.0/28", 30)) as bgp:
        c = bgp.cluster
        on2 = c.add_pod(2, "owner")  # node 2 claims a block and keeps 3 addresses free in it
        on3 = c.add_pod(3, "third")
        # Node 3 takes every other address: its own block, then the two blocks left.
        filler = bgp.assign(3, "filler", "n3", num_v4=11)
        assert len(filler) == 11
        borrower = c.add_pod(1, "borrower")
        assert block(borrower, 30) == block(on2, 30), \
            f"node 1 did not borrow from node 2's block: {v4(borrower)} vs {block(on2, 30)}"
        host = f"{v4(borrower)}/32"
        for k in (2, 3):
            bgp.wait_routes(k, {host: bgp.address(1)})
        c.expect(all_pairs([borrower, on2, on3]), what="the pod with a borrowed address to reach and be reached")

        # The pod goes: so does its host route, everywhere.
        c.delete_pod(borrower)
        for k in (2, 3):
            bgp.wait_no_route(k, host, CONVERGE)


# -- 5. bad configuration -------------------------------------------------------------------------


BAD = [
    ("a BGPPeer on an unknown node", bgp_peer_yaml("tor", node="nowhere", peerIP="10.0.0.254", asNumber=BIRD_ASN),
     "spec.node 'nowhere' is not a known node"),
    ("an AS number out of range", bgp_peer_yaml("tor", peerIP="10.0.0.254", asNumber=4294967296),
     "spec.asNumber 4294967296 is out of range"),
    ("an AS number of 0", bgp_configuration_yaml(asn=0), "spec.asNumber 0 is out of range"),
    ("a node AS number out of range", node_yaml("n1", "198.18.0.11", asn=4294967296), "asNumber"),
    ("a malformed peer address", bgp_peer_yaml("tor", peerIP="10.0.0.300", asNumber=BIRD_ASN),
     "spec.peerIP '10.0.0.300' is not an IP address"),
    ("a cluster ID that is a name", node_yaml("n1", "198.18.0.11", cluster_id="cluster-a"),
     "routeReflectorClusterID 'cluster-a' must be an IPv4 address"),
    ("a cluster ID that is IPv6", node_yaml("n1", "198.18.0.11", cluster_id="fd00::1"),
     "routeReflectorClusterID 'fd00::1' must be an IPv4 address"),
]


def test_netctl_refuses_bad_bgp_configuration() -> None:
    with BGPCluster("bgx", 1, agents=[], preamble=node_yaml("n1", "198.18.0.11")) as bgp:
        c, etcd = bgp.cluster, bgp.lab.etcd
        assert etcd is not None and hasattr(etcd, "revision")
        env = [f"{k}={v}" for k, v in c.env.items()]
        failures = []
        for n, (what, text, message) in enumerate(BAD):
            path = c.work / f"bad-{n}.yaml"
            path.write_text(text)
            before = etcd.revision()
            done = bgp.lab.exec(c.node(1).netns, "env", *env, str(NETCTL), "apply", "-f", str(path), check=False)
            lines = done.stderr.strip().splitlines()
            problems = []
            if done.returncode != 1:
                problems.append(f"exit {done.returncode}")
            if len(lines) != 1 or not lines[0].startswith("netctl: ") or message not in lines[0]:
                problems.append(f"stderr {done.stderr.strip()!r}")
            if etcd.revision() != before:
                problems.append("the datastore changed")
            if problems:
                failures.append(f"{what}: {', '.join(problems)}")
        assert failures == [], "\n".join(failures)
        assert json.loads(c.netctl("get", "bgppeers", "-o", "json").stdout)["items"] == []


# IPIP over BGP (ipipMode: Always) needs the ipip module, which this host's kernel lacks: it is
# tests/vm/test_ipip_bgp.py, run inside a VM by tests/vm/test_ipip_in_vm.py.
