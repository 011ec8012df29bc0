"""The BGP speaker runtime in real namespaces: ExaBGP per node (driven by ``bgp.speaker`` inside
the node's namespace, see ``bgp_support``), kernel routes with protocol 81, BIRD 2 as an external
peer, a Tortie node as route reflector, and graceful restart.

Each test builds its own lab (unique name, nodes on 198.18.0.0/24, no etcd) and tears it down,
even on failure. Figures (latency, bulk install time) are printed, never asserted.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bgp.model import CLIENT, EXTERNAL, MESH, REFLECTOR, Peer, SpeakerConfig
from netlab.bird import Bird, RouteMonitor
from netlab.lab import Lab
from netlab.wait import wait_for
from tests.lab.bgp_support import Node, bird_config, config_to_json

pytestmark = pytest.mark.lab

ASN = 64512
HOLD = 9
CONVERGE = 30.0  # seconds a lab may take to bring sessions up and routes in


def block(k: int) -> str:
    return f"10.244.{k}.0/26"


@contextmanager
def bgp_lab(nodes: int) -> Iterator[tuple[Lab, list[Node]]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    lab = Lab(f"bgp{secrets.token_hex(3)}", nodes=nodes, etcd_members=0)
    with lab:
        root = lab.work_dir / "bgp"
        yield lab, [Node(lab, k, root) for k in range(1, nodes + 1)]


def mesh_config(lab: Lab, k: int, members: list[int], *, gr: int = 120,
                extra: tuple[Peer, ...] = ()) -> SpeakerConfig:
    me = lab.node_ip(k)
    peers = tuple(
        # Calico's rule against connection collisions: of a pair, the higher address waits.
        Peer(lab.node_ip(j), ASN, MESH, name=f"n{j}", passive=_ip(me) > _ip(lab.node_ip(j)))
        for j in members if j != k
    )
    return SpeakerConfig(node=f"n{k}", router_id=me, local_address=me, asn=ASN, peers=peers + extra,
                         graceful_restart=gr, hold_time=HOLD)


def _ip(address: str) -> int:
    return int(ipaddress.ip_address(address))


def expected_mesh(nodes: list[Node], present: list[Node], k: Node) -> dict[str, str]:
    return {block(n.k): n.address for n in present if n is not k}


# -- (a) full mesh ----------------------------------------------------------------------------------


def test_mesh_learns_blocks_and_a_killed_node_is_withdrawn_within_the_hold_time() -> None:
    with bgp_lab(3) as (lab, nodes):
        n1, n2, n3 = nodes
        # No graceful restart here: a dead node's routes must go with its session.
        for n in (n1, n2):
            n.start(mesh_config(lab, n.k, [1, 2], gr=0), [(block(n.k), n.address)])
        n1.wait_routes({block(2): n2.address}, CONVERGE)
        since = {s["peer"]: s["since"] for s in n1.status()["sessions"]}

        # A third node joins: the others reload their configuration; their session stays up.
        with RouteMonitor(n1.netns) as on_n1:
            joined = time.monotonic()
            n3.start(mesh_config(lab, 3, [1, 2, 3], gr=0), [(block(3), n3.address)])
            for n in (n1, n2):
                n.request({"op": "configure", "config": config_to_json(mesh_config(lab, n.k, [1, 2, 3], gr=0))})
            for n in nodes:
                want = expected_mesh(nodes, nodes, n)
                n.wait_routes(want, CONVERGE)
            assert on_n1.deletions(block(2), joined) == []
        assert {s["peer"]: s["since"] for s in n1.status()["sessions"]}[n2.address] == since[n2.address]

        latencies = measure_latency(n1, n2, rounds=20)
        print(f"\nannounce -> peer kernel route: median {statistics.median(latencies) * 1000:.1f} ms, "
              f"min {min(latencies) * 1000:.1f}, max {max(latencies) * 1000:.1f} ({len(latencies)} runs)")

        # ExaBGP dies under a running agent: it is started again and the routes come back.
        old = n2.status()["exabgp"]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: n2.status()["exabgp"] not in (None, old), 10, "node 2's ExaBGP to be restarted")
        for n in nodes:
            want = expected_mesh(nodes, nodes, n)
            n.wait_routes(want, CONVERGE, sessions=2)

        n3.kill()
        killed = time.monotonic()
        for n in (n1, n2):
            n.wait_gone(block(3), HOLD + 2)
        print(f"killed node's routes gone from both peers after {time.monotonic() - killed:.2f} s")
        for n in (n1, n2):
            assert n.routes() == expected_mesh(nodes, [n1, n2], n)


def measure_latency(source: Node, target: Node, rounds: int) -> list[float]:
    """Announce a probe prefix from ``source`` and time it into ``target``'s kernel (and back out)."""
    probe = "10.244.200.0/26"
    base = [(block(source.k), source.address)]
    out = []
    with RouteMonitor(target.netns) as monitor:
        for _ in range(rounds):
            started = time.monotonic()
            source.announce(base + [(probe, source.address)])
            seen = monitor.wait_first(probe, True, started, 5)
            out.append(seen - started)
            source.announce(base)
            monitor.wait_first(probe, False, started, 5)
            time.sleep(0.1)
    return out


# -- (b) BIRD 2 as an external peer -----------------------------------------------------------------

BIRD_ASN = 65001
SERVICE = "10.96.0.10/32"
BULK = [f"10.100.{i // 250}.{i % 250 + 1}/32" for i in range(1000)]


def test_bird_learns_every_block_and_its_routes_are_installed_on_the_nodes() -> None:
    with bgp_lab(4) as (lab, all_nodes):
        nodes, bird = all_nodes[:3], Bird(lab, 4, lab.work_dir / "bgp")
        members = [1, 2, 3]
        external = Peer(bird.address, BIRD_ASN, EXTERNAL, name="tor")
        bird.start(bird_config(bird.address, BIRD_ASN, [(n.address, ASN) for n in nodes], [SERVICE], bulk=BULK))
        for n in nodes:
            n.start(mesh_config(lab, n.k, members, extra=(external,)), [(block(n.k), n.address)])

        want_bird = {block(n.k): n.address for n in nodes}
        wait_for(lambda: {p: nh for p, nh in bird.routes().items() if p in want_bird} == want_bird, CONVERGE,
                   "BIRD to learn every block with its node as next hop",
                   describe=lambda: bird.birdc("show", "protocols") + bird.birdc("show", "route"))
        for n in nodes:
            want = {**expected_mesh(nodes, nodes, n), SERVICE: bird.address}
            n.wait_routes(want, CONVERGE)

        started = time.monotonic()
        bird.birdc("enable", "bulk")
        done: dict[int, float] = {}
        while len(done) < len(nodes) and time.monotonic() - started < 120:
            for n in nodes:
                if n.k not in done and len(n.routes()) >= len(BULK) + 3:
                    done[n.k] = time.monotonic() - started
            time.sleep(0.05)
        assert len(done) == len(nodes), f"not every node got BIRD's {len(BULK)} routes: {done}"
        print(f"\n{len(BULK)} routes from BIRD in every node's kernel after "
              f"{', '.join(f'n{k} {t:.2f} s' for k, t in sorted(done.items()))}")
        assert nodes[0].routes()[BULK[-1]] == bird.address

        bird.birdc("disable", "bulk")
        for n in nodes:
            n.wait_routes({**expected_mesh(nodes, nodes, n), SERVICE: bird.address}, CONVERGE)


# -- (c) a Tortie node as route reflector -----------------------------------------------------------


def test_a_tortie_reflector_passes_client_routes_with_originator_and_cluster_list() -> None:
    with bgp_lab(3) as (lab, nodes):
        rr, c2, c3 = nodes
        cluster = rr.address
        clients = tuple(Peer(n.address, ASN, CLIENT, name=f"n{n.k}", passive=True) for n in (c2, c3))
        rr.start(SpeakerConfig(node="n1", router_id=rr.address, local_address=rr.address, asn=ASN,
                               cluster_id=cluster, peers=clients, hold_time=HOLD), [(block(1), rr.address)])
        for n in (c2, c3):
            n.start(SpeakerConfig(node=f"n{n.k}", router_id=n.address, local_address=n.address, asn=ASN,
                                  peers=(Peer(rr.address, ASN, REFLECTOR, name="n1"),), hold_time=HOLD),
                    [(block(n.k), n.address)])

        for n in nodes:
            want = expected_mesh(nodes, nodes, n)
            n.wait_routes(want, CONVERGE)

        for n, other in ((c2, c3), (c3, c2)):
            status = n.status()
            attrs = status["attrs"][f"{rr.address} {block(other.k)}"]
            assert attrs["next-hop"] == other.address
            assert attrs["originator-id"] == other.address
            assert attrs["cluster-list"] == [cluster]
            # Never back to its originator.
            assert block(n.k) not in status["learned"][rr.address]
            # The reflector's own block is an ordinary route: no reflection attributes.
            assert "originator-id" not in status["attrs"][f"{rr.address} {block(1)}"]

        c3.announce([])
        c2.wait_gone(block(3), CONVERGE)
        assert block(3) not in rr.routes()


# -- (d) graceful restart ---------------------------------------------------------------------------

GR = 20  # seconds: the restarting node's graceful-restart time, and how long it keeps its old routes


def test_graceful_restart_keeps_routes_on_both_sides() -> None:
    with bgp_lab(3) as (lab, nodes):
        n1, n2, n3 = nodes
        members = [1, 2, 3]
        gone_while_down, dropped_by_restart = "10.244.102.0/26", "10.244.101.0/26"
        exports = {
            1: [(block(1), n1.address), (dropped_by_restart, n1.address)],
            2: [(block(2), n2.address), (gone_while_down, n2.address)],
            3: [(block(3), n3.address)],
        }
        for n in nodes:
            n.start(mesh_config(lab, n.k, members, gr=GR), exports[n.k])
        for n in nodes:
            want = {p: nh for k, e in exports.items() if k != n.k for p, nh in e}
            n.wait_routes(want, CONVERGE)

        with RouteMonitor(n2.netns) as on_n2, RouteMonitor(n1.netns) as on_n1:
            stopped = time.monotonic()
            n1.stop(graceful=True)
            n2.announce(exports[2][:1])  # withdrawn while node 1 is down: it must not keep it for ever
            time.sleep(2)
            assert block(1) in n2.routes() and dropped_by_restart in n2.routes(), "peers dropped the restarting node"
            assert set(n1.routes()) == {block(2), block(3), gone_while_down}, "node 1 lost its routes when stopping"

            restarted = time.monotonic()
            n1.start(mesh_config(lab, 1, members, gr=GR), exports[1][:1], adopt=GR)
            wait_for(lambda: {n2.address, n3.address} <= n1.established(), CONVERGE, "node 1's sessions")
            # Node 1's End-of-RIB ends the peers' stale routes it no longer announces.
            n2.wait_gone(dropped_by_restart, CONVERGE)
            # Node 1 keeps what it had until re-learned; what was not re-learned goes after GR seconds.
            n1.wait_gone(gone_while_down, GR + 10)
            gone_after = time.monotonic() - restarted
            assert n1.routes() == {block(2): n2.address, block(3): n3.address}
            assert n2.routes() == {block(1): n1.address, block(3): n3.address}

            assert on_n2.deletions(block(1), stopped) == [], "node 2 dropped node 1's block during the restart"
            for kept in (block(2), block(3)):
                assert on_n1.deletions(kept, stopped) == [], f"node 1 dropped {kept} during its restart"
        print(f"\nstale route not re-learned removed {gone_after:.1f} s after the restart (GR time {GR} s)")

        # A hard-killed agent is not a restart: its orphaned ExaBGP tears the sessions down with a
        # NOTIFICATION, which ends graceful restart, so the peers drop its routes within the hold time.
        exabgp_pid = n1.kill(exabgp=False)
        killed = time.monotonic()
        for n in (n2, n3):
            n.wait_gone(block(1), HOLD)
        print(f"agent killed (graceful restart on): its routes gone from the peers after "
              f"{time.monotonic() - killed:.1f} s")
        wait_for(lambda: not os.path.exists(f"/proc/{exabgp_pid}"), 10, "the orphaned ExaBGP to stop")
