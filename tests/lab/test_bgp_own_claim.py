"""A block claimed by a pod's ADD on its own node's agent (``tortie-ipam`` through the compiled
front end and the agent's CNI socket) is announced from the commit (``felix_agent.own_claims``):
with the origin agent's datastore watch held (its TCP connection's packets dropped in the node's
namespace), the block still reaches the other node's kernel and the origin's own blackhole route
is programmed. The watch is then let go, and a later claim spreads as usual.

One 2-node BGP lab (~30 s on 2 CPUs), built and torn down by the test."""

from __future__ import annotations

import ipaddress
import os
import re
import time
from urllib.parse import urlparse

import pytest

from netlab.bgp_cluster import BGPCluster, bgp_pools
from netlab.cluster_lab import TORTIE_IPAM
from netlab.cni import Attachment, exec_plugin
from netlab.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.skipif(os.environ.get("TORTIE_BGP_CLUSTER_TESTS") == "0",
                                                  reason="TORTIE_BGP_CLUSTER_TESTS=0")]

HOLD_TABLE = "owntest"


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")


def connections(bgp: BGPCluster, k: int, port: int) -> dict[int, int]:
    """Local port → bytes received, of node ``k``'s agent's established TCP connections to etcd."""
    pid = bgp.cluster.agents[k]
    out = bgp.cluster.exec(k, "ss", "-tnpiH", "state", "established", f"( dport = :{port} )").stdout
    found: dict[int, int] = {}
    local: int | None = None
    for line in out.splitlines():
        if not line[:1].isspace():
            mine = f"pid={pid}," in line
            local = int(line.split()[2].rsplit(":", 1)[1]) if mine else None
        elif local is not None and (m := re.search(r"bytes_received:(\d+)", line)):
            found[local] = int(m.group(1))
    return found


def watch_connection(bgp: BGPCluster, k: int, port: int) -> int:
    """The local port of node ``k``'s agent's watch: the connection that receives bytes each time
    another process writes the datastore (three writes, so that a lease renewal cannot pass for it)."""
    candidates: set[int] | None = None
    for i in range(3):
        before = connections(bgp, k, port)
        bgp.cluster.apply(f"apiVersion: tortie.dev/v1\nkind: GlobalNetworkSet\nmetadata:\n  name: nudge-{i}\n"
                          "spec:\n  nets: [192.0.2.0/24]\n")
        grown: set[int] = set()

        def grew(before: dict[int, int] = before, grown: set[int] = grown) -> bool:
            now = connections(bgp, k, port)
            grown |= {p for p, n in now.items() if n > before.get(p, n)}
            return bool(grown)

        wait_for(grew, 10, f"node {k}'s agent to receive the write", interval=0.05)
        candidates = grown if candidates is None else candidates & grown
    assert candidates is not None and len(candidates) == 1, f"no single watch connection: {candidates}"
    return candidates.pop()


def add(bgp: BGPCluster, k: int, address: str, container: str) -> None:
    env = bgp.cluster.env
    conf = {"cniVersion": "1.0.0", "name": "own", "type": "tortie-ipam", "nodename": f"n{k}",
            "etcd_endpoints": env["ETCD_ENDPOINTS"], "etcd_ca_cert_file": env["ETCD_CA_CERT_FILE"],
            "etcd_cert_file": env["ETCD_CERT_FILE"], "etcd_key_file": env["ETCD_KEY_FILE"],
            "agent_socket": str(bgp.cluster.agent(k).cni_socket),
            "ipam": {"type": "tortie-ipam", "assign_ipv4": "true", "assign_ipv6": "false"}}
    run = exec_plugin(TORTIE_IPAM, "ADD", conf,
                      Attachment(container, "/var/run/netns/unused", "eth0", {"IgnoreUnknown": "1", "IP": address}))
    assert run.ok, run.stdout
    assert [a.split("/")[0] for a in run.addresses()] == [address]


def dropped(bgp: BGPCluster, k: int) -> int:
    out = bgp.cluster.nft(k, "list", "table", "inet", HOLD_TABLE).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))


def test_own_claim_spreads_from_its_commit_while_the_origin_watch_is_held() -> None:
    with BGPCluster("bgo", 2, pools=bgp_pools("10.244.0.0/16", 26)) as bgp:
        c = bgp.cluster
        bgp.wait_established(1, [2])
        port = urlparse(c.env["ETCD_ENDPOINTS"].split(",")[0]).port
        assert port is not None
        watch = watch_connection(bgp, 1, port)
        c.nft(1, "add", "table", "inet", HOLD_TABLE)
        c.nft(1, "add", "chain", "inet", HOLD_TABLE, "hold", "{ type filter hook input priority -400 ; }")
        c.nft(1, "add", "rule", "inet", HOLD_TABLE, "hold", "tcp", "sport", str(port), "tcp", "dport", str(watch),
              "counter", "drop")
        held = ipaddress.ip_network("10.244.40.0/26")
        started = time.monotonic()
        add(bgp, 1, str(held[1]), "own-held")
        answered = time.monotonic() - started
        bgp.wait_routes(2, {str(held): bgp.address(1)}, timeout=10)
        spread = time.monotonic() - started
        own_route = ("ip", "-4", "route", "show", "exact", str(held), "proto", "80")
        wait_for(lambda: "blackhole" in c.exec(1, *own_route).stdout, 10, "node 1's own blackhole route for its block",
                 interval=0.05)
        # The watch's copy of the commit was sent and dropped: what spread came from the commit.
        assert dropped(bgp, 1) > 0
        assert watch in connections(bgp, 1, port), "the watch moved to another connection while held"
        print(f"held watch: ADD answered in {answered * 1000:.0f} ms, route on node 2 in {spread * 1000:.0f} ms")
        c.nft(1, "delete", "table", "inet", HOLD_TABLE)
        later = ipaddress.ip_network("10.244.41.0/26")
        add(bgp, 1, str(later[1]), "own-later")
        bgp.wait_routes(2, {str(held): bgp.address(1), str(later): bgp.address(1)}, timeout=30)
