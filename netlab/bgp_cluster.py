"""The agent-level BGP lab, for the BGP lab tests and ``bench.bgp_bench``: a ``ClusterLab``
whose agents run the BGP speaker (``felix-agent --bgp``) over pools without encapsulation, started
on the nodes the test chooses, after the BGP resources it wants in place; what the tests observe —
``netctl node status -o json``, protocol-81 kernel routes, a long-running ping and its losses —;
BIRD 2 configurations (an external router, a route reflector); IPAM assignments made from inside a
node namespace (the datastore is only reachable there).

Built by composition: ``ClusterLab`` (``netlab.cluster_lab``) does the agents, pods and probes,
``Bird`` and ``kernel_routes`` (``netlab.bird``) the BIRD process and the route table. IPv4 only:
the lab's nodes have no IPv6 address, so no IPv6 session is made (``bgp.config``). Nothing here
sleeps for a fixed time: ``wait_for`` polls.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from netlab import netns as ip_netns
from netlab.bird import Bird, kernel_routes
from netlab.cluster_lab import POOL_V6, PYTHON, ClusterLab
from netlab.lab import Pod
from netlab.wait import wait_for

ASN = 64512
BIRD_ASN = 65001
HOLD = 9  # the agent's hold time (bgp.model.SpeakerConfig)
ORPHAN_GRACE = 3.0  # a killed agent's ExaBGP withdraws everything this long after (bgp.api_process)
CONVERGE = 30.0  # seconds a lab may take to bring sessions up and routes in
CLUSTER_ID = "224.0.0.1"
ESTABLISHED = "Established"
BGP_PROTO = 81
BIRD_PROTO = 12  # what `ip route` calls "proto bird"
CUT_TABLE = "bgpcut"  # the nftables table of BGPCluster.cut_bgp (Tortie's own is "tortie")


def bgp_pools(v4: str = "10.244.0.0/16", block_v4: int = 26, *, nat: bool = False) -> str:
    """An IPv4 and an IPv6 pool, neither encapsulated: routes between nodes come from BGP. (The
    IPv6 pool only keeps the CNI configuration's dual-stack request satisfiable: no node has an
    IPv6 address, so IPv6 is not routed between nodes.)"""
    return textwrap.dedent(f"""\
        apiVersion: tortie.dev/v1
        kind: IPPool
        metadata: {{name: pool-v4}}
        spec: {{cidr: {v4}, blockSize: {block_v4}, vxlanMode: Never, ipipMode: Never, natOutgoing: {str(nat).lower()}}}
        ---
        apiVersion: tortie.dev/v1
        kind: IPPool
        metadata: {{name: pool-v6}}
        spec: {{cidr: '{POOL_V6}', blockSize: 122, vxlanMode: Never, natOutgoing: false}}
        """)


def node_yaml(name: str, address: str, *, labels: Mapping[str, str] | None = None,
              cluster_id: str | None = None, asn: int | None = None) -> str:
    """A Node resource with its BGP address (what the agent would register) and what operators add."""
    bgp: dict[str, Any] = {"ipv4Address": f"{address}/24"}
    if cluster_id is not None:
        bgp["routeReflectorClusterID"] = cluster_id
    if asn is not None:
        bgp["asNumber"] = asn
    doc = {"apiVersion": "tortie.dev/v1", "kind": "Node",
           "metadata": {"name": name, "labels": dict(labels or {})}, "spec": {"bgp": bgp}}
    return json.dumps(doc) + "\n"


def bgp_configuration_yaml(*, mesh: bool = True, asn: int = ASN) -> str:
    return json.dumps({"apiVersion": "tortie.dev/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
                       "spec": {"asNumber": asn, "nodeToNodeMeshEnabled": mesh}}) + "\n"


def bgp_peer_yaml(name: str, **spec: Any) -> str:
    return json.dumps({"apiVersion": "tortie.dev/v1", "kind": "BGPPeer", "metadata": {"name": name},
                       "spec": spec}) + "\n"


def documents(*docs: str) -> str:
    return "---\n".join(docs)


class BGPCluster:
    """A ``ClusterLab`` of ``nodes`` nodes whose agents run with ``--bgp``: ``preamble`` (YAML:
    a BGPConfiguration, Nodes with labels or cluster IDs, BGPPeers) is applied with the pools,
    before any agent starts, and agents are started on ``agents`` (default: every node) only —
    the others are free for a node that joins later, or for BIRD. Torn down on exit, whatever
    happened."""

    def __init__(self, prefix: str, nodes: int, *, agents: Iterable[int] | None = None, pools: str | None = None,
                 preamble: str = "", agent_args: Sequence[str] = ()) -> None:
        self.cluster = ClusterLab(prefix, nodes, pools=pools if pools is not None else bgp_pools(),
                                  agent_args=["--bgp", *agent_args], agents=agents, preamble=preamble)
        self.lab = self.cluster.lab

    def __enter__(self) -> BGPCluster:
        self.cluster.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cluster.close()

    # -- what the tests look at -----------------------------------------------------------------

    def address(self, k: int) -> str:
        return self.lab.node_ip(k)

    def status(self, k: int) -> dict[str, Any]:
        """``netctl node status --node nK -o json`` (``running`` False when the agent is not)."""
        done = self.cluster.netctl("node", "status", "--node", f"n{k}", "-o", "json", check=False)
        if not done.stdout.strip():
            raise AssertionError(f"netctl node status for n{k} printed nothing: {done.stderr.strip()}")
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def sessions(self, k: int) -> dict[str, dict[str, Any]]:
        """Node ``k``'s sessions by peer address, as ``netctl node status`` shows them."""
        return {p["peerAddress"]: p for p in self.status(k)["peers"]}

    def established(self, k: int) -> dict[str, str]:
        """peer address -> since, of node ``k``'s Established sessions."""
        return {a: p["since"] for a, p in self.sessions(k).items() if p["state"] == ESTABLISHED}

    def wait_established(self, k: int, peers: Iterable[int | str], *, kind: str | None = None,
                         exactly: bool = True, timeout: float = CONVERGE) -> dict[str, dict[str, Any]]:
        """Until node ``k``'s sessions to ``peers`` (node indexes or addresses) are Established
        (of type ``kind`` if given) and, with ``exactly``, it has no other session."""
        want = {self.address(p) if isinstance(p, int) else p for p in peers}

        def done() -> dict[str, dict[str, Any]] | None:
            sessions = self.sessions(k)
            up = {a for a, s in sessions.items()
                  if s["state"] == ESTABLISHED and (kind is None or s["peerType"] == kind)}
            ok = want <= up and (not exactly or set(sessions) == want)
            return sessions if ok else None

        what = f"node {k}'s sessions to {sorted(want)} to be Established"
        found: dict[str, dict[str, Any]] | None = wait_for(
            done, timeout, what, interval=0.2, describe=lambda: json.dumps(self.status(k), indent=1))
        assert found is not None
        return found

    def wait_peers(self, k: int, peers: Iterable[int | str], timeout: float = CONVERGE) -> None:
        """Until node ``k``'s sessions (in any state) are to ``peers`` and no other."""
        want = {self.address(p) if isinstance(p, int) else p for p in peers}
        wait_for(lambda: set(self.sessions(k)) == want, timeout, f"node {k}'s sessions to be {sorted(want)}",
                   interval=0.2, describe=lambda: str(self.sessions(k)))

    def wait_down(self, k: int, peer: int | str, timeout: float) -> None:
        """Until node ``k``'s session to ``peer`` is not Established."""
        address = self.address(peer) if isinstance(peer, int) else peer
        wait_for(lambda: address not in self.established(k), timeout,
                   f"node {k}'s session to {address} to go down", interval=0.2,
                   describe=lambda: str(self.sessions(k)))

    def bgp_routes(self, k: int) -> dict[str, str]:
        """Node ``k``'s protocol-81 routes: destination -> gateway."""
        return kernel_routes(self.lab, self.lab.node(k).netns, BGP_PROTO)

    def wait_routes(self, k: int, want: Mapping[str, str], *, exactly: bool = False,
                    timeout: float = CONVERGE) -> None:
        """Until node ``k`` has the protocol-81 routes ``want`` (destination -> gateway)."""
        def done() -> bool:
            routes = self.bgp_routes(k)
            return routes == dict(want) if exactly else all(routes.get(d) == g for d, g in want.items())

        wait_for(done, timeout, f"node {k}'s BGP routes {dict(want)}", interval=0.1,
                   describe=lambda: f"routes: {self.bgp_routes(k)}\nsessions: {self.sessions(k)}")

    def wait_no_route(self, k: int, prefix: str, timeout: float) -> None:
        wait_for(lambda: prefix not in self.bgp_routes(k), timeout, f"{prefix} to leave node {k}'s kernel",
                   interval=0.05, describe=lambda: f"routes: {self.bgp_routes(k)}")

    # -- faults ---------------------------------------------------------------------------------

    def cut_bgp(self, k: int) -> None:
        """Drop every BGP packet in and out of node ``k`` (its own nftables table, nothing else):
        its peers hear nothing more from it, not even a TCP reset, as from a dead host."""
        rules = textwrap.dedent(f"""\
            table inet {CUT_TABLE} {{
                chain input {{ type filter hook input priority -300; tcp dport 179 drop; tcp sport 179 drop; }}
                chain output {{ type filter hook output priority -300; tcp dport 179 drop; tcp sport 179 drop; }}
            }}
            """)
        path = self.cluster.work / f"cut-n{k}.nft"
        path.write_text(rules)
        self.cluster.nft(k, "-f", str(path))

    def uncut_bgp(self, k: int) -> None:
        self.cluster.nft(k, "delete", "table", "inet", CUT_TABLE)

    # -- IPAM from inside a node ----------------------------------------------------------------

    def assign(self, k: int, handle: str, node: str, num_v4: int = 0, addresses: Sequence[str] = ()) -> list[str]:
        """``IPAM.assign`` run in node ``k``'s namespace for ``node``; the addresses it gave."""
        request = {"handle": handle, "node": node, "num_v4": num_v4, "addresses": list(addresses)}
        done = self.cluster.exec(k, "env", *[f"{a}={b}" for a, b in self.cluster.env.items()],
                                 str(PYTHON), "-c", _ASSIGN, json.dumps(request), check=False)
        if done.returncode != 0:
            raise AssertionError(f"IPAM assign {request} failed: {done.stderr.strip()[-2000:]}")
        out: list[str] = json.loads(done.stdout)
        return out


# Runs inside a node namespace: one IPAM assignment, printed as a JSON list of addresses.
_ASSIGN = """
import ipaddress, json, sys
from datastore.config import EtcdConfig
from datastore.etcd import EtcdClient
from ipam.allocator import IPAM, AssignRequest
r = json.loads(sys.argv[1])
with EtcdClient(EtcdConfig.from_env()) as client:
    got = IPAM(client).assign(AssignRequest(r["handle"], r["node"], num_v4=r["num_v4"],
                              addresses=[ipaddress.ip_address(a) for a in r["addresses"]]))
print(json.dumps([str(a.address) for a in got]))
"""


# -- a ping that runs across an event -------------------------------------------------------------


@dataclass
class PingRun:
    """``ping -O -i 0.05`` from a pod, left running (started and ended by the lab, by PID)."""

    cluster: BGPCluster
    pid: int
    log: Path

    @classmethod
    def start(cls, bgp: BGPCluster, src: Pod, dst: str, name: str) -> PingRun:
        log = bgp.cluster.work / f"ping-{name}.log"
        pid = bgp.lab.start_process(src.netns, ["ping", "-n", "-O", "-i", "0.05", "-W", "1", dst], log, {})
        return cls(bgp, pid, log)

    def replies(self) -> list[int]:
        text = self.log.read_text() if self.log.exists() else ""
        return [int(m[1]) for m in re.finditer(r"bytes from .*icmp_seq=(\d+)", text)]

    def wait_replies(self, more: int, timeout: float = 10.0) -> None:
        """Until ``more`` replies beyond those seen so far have come back."""
        base = len(self.replies())
        wait_for(lambda: len(self.replies()) >= base + more, timeout, f"{more} more ping replies",
                   interval=0.05, describe=lambda: self.log.read_text()[-1500:])

    def stop(self) -> tuple[int, list[int]]:
        """Stop it; return (requests up to the last reply, the sequence numbers never answered)."""
        self.cluster.lab.stop_process(self.pid)
        seen = self.replies()
        assert seen, f"no ping reply at all:\n{self.log.read_text()[-1500:]}"
        first, last = min(seen), max(seen)
        return last - first + 1, sorted(set(range(first, last + 1)) - set(seen))


# -- BIRD 2 ---------------------------------------------------------------------------------------


def bird_external_config(router_id: str, neighbors: Sequence[str], *, services: Sequence[str] = (),
                         bulk: Sequence[str] = (), asn: int = BIRD_ASN, peer_asn: int = ASN,
                         password: str | None = None, log: str = "all") -> str:
    """A top-of-rack router: eBGP to every Tortie node in ``neighbors`` (TCP-MD5 with
    ``password``); exports its static ``services`` (and ``bulk``, disabled until ``birdc enable
    bulk``); installs what it learns in its own kernel, so that it routes back to the pods."""
    lines = [
        f"log stderr {log};",
        f"router id {router_id};",
        "protocol device { scan time 10; }",
        "protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }",
        "protocol static services {",
        "  ipv4;",
        *[f"  route {s} blackhole;" for s in services],
        "}",
    ]
    if bulk:
        lines += ["protocol static bulk {", "  disabled;", "  ipv4;", *[f"  route {p} blackhole;" for p in bulk], "}"]
    lines += [
        "template bgp tortie {",
        f"  local {router_id} as {asn};",
        f"  hold time {HOLD};",
        "  graceful restart on;",
        *([f'  password "{password}";'] if password else []),
        "  ipv4 { import all; export where source = RTS_STATIC; };",
        "}",
    ]
    lines += [f"protocol bgp node{k} from tortie {{ neighbor {a} as {peer_asn}; }}" for k, a in enumerate(neighbors, 1)]
    return "\n".join(lines) + "\n"


def bird_reflector_config(router_id: str, clients: Sequence[str], *, asn: int = ASN, cluster_id: str = CLUSTER_ID,
                          log: str = "all") -> str:
    """BIRD as the route reflector of Tortie nodes (iBGP, same AS): reflects every client's
    routes to the other clients, next hops untouched (the nodes share one subnet)."""
    lines = [
        f"log stderr {log};",
        f"router id {router_id};",
        "protocol device { scan time 10; }",
        "template bgp reflected {",
        f"  local {router_id} as {asn};",
        f"  hold time {HOLD};",
        "  direct;  # the nodes share its subnet: next hops resolve on the link",
        "  rr client;",
        f"  rr cluster id {cluster_id};",
        "  ipv4 { import all; export all; };",
        "}",
    ]
    lines += [f"protocol bgp client{k} from reflected {{ neighbor {a} as {asn}; }}" for k, a in enumerate(clients, 1)]
    return "\n".join(lines) + "\n"


def start_bird(bgp: BGPCluster, k: int, config: str) -> Bird:
    """BIRD in lab node ``k``'s namespace (a node without an agent), with private paths."""
    bird = Bird(bgp.lab, k, bgp.cluster.work / "bird")
    bird.start(config)
    return bird


def processes(bgp: BGPCluster, k: int, name: str) -> list[int]:
    """The PIDs in node ``k``'s namespace whose command line mentions ``name``."""
    out = []
    for pid in ip_netns.pids(bgp.lab.node(k).netns):
        try:
            if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue  # gone meanwhile
    return out


def bird_established(bird: Bird) -> set[str]:
    """The names of BIRD's BGP protocols whose session is Established."""
    out = bird.birdc("show", "protocols")
    return {line.split()[0] for line in out.splitlines() if "BGP" in line and ESTABLISHED in line}
