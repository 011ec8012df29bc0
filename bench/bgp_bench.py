"""The BGP benchmark: how fast routes spread between Tortie nodes (felix-agent with ExaBGP), and how
fast a node takes a large table from an external router, each beside BIRD 2 doing the same job in
the same lab, in the same run.

One run builds one ``netlab`` lab (etcd, 22 node namespaces on one fabric) and measures, in order:

1. convergence, 10-node mesh: a block is claimed for a node as production claims one, by a
   ``tortie-ipam`` ADD relayed to the node's agent (``IP=`` an address in a free block: the agent's
   own IPAM claims it; the commit's time comes from the agent's trace), and the clock stops when
   the block's route (protocol 81) is in the kernel of every other node; the origin rotates over
   the nodes. A second series claims through a separate process inside a node namespace
   (``IPAM.assign``: the origin's agent then learns of the block from its watch, like the others).
   Beside it, 10 BIRD nodes in an iBGP full mesh: a static route is
   enabled on one (``birdc enable``) and the clock stops when it is in every other BIRD node's
   kernel (``proto bird``);
2. the same with the mesh off and 2 route reflectors (Tortie: ``routeReflectorClusterID`` on n1
   and n2 and a BGPPeer ``nodeSelector: all()``, ``peerSelector: rr == 'true'``; BIRD: two
   reflectors of one cluster, the other eight their clients); claims on clients only;
3. scale: a BIRD router announces 10,000 /32 routes (eBGP) to one Tortie node; the time until
   the last is in that node's kernel, and the CPU the agent and its ExaBGP (with the API relay)
   used meanwhile (``/proc/<pid>/stat``); then the time to withdraw them. Beside it, the same
   router and the same routes to a BIRD node. The router sends its table once, untimed, to a
   third BIRD first (``warm_source``): its first transfer is slower, whoever receives it.

Kernel routes are timed by ``ip monitor route`` in each namespace (the same monotonic clock).
It prints a table and writes it as JSON under ``bench/results/``. Run it as root, from the
repository root, with ``.venv/bin/python -m bench.bgp_bench [--quick]``. It never asserts a time;
it stops with an error if what it measured did not happen (a route that never came).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import ipaddress
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.prerequisites import require
from bench.report import Figure, figure_table, finish

REPO = Path(__file__).resolve().parents[1]

TORTIE = list(range(1, 11))  # n1..n10: felix-agent --bgp
SOURCE = 11  # BIRD, the external router of part 3
BIRD_NODE = 12  # BIRD in place of a Tortie node, part 3
BIRD_MESH = list(range(13, 23))  # 10 BIRD nodes, parts 1 and 2
WARM_SINK = 13  # part 3: a BIRD that takes the external router's first table, untimed
NODES = 22
POOL = "10.244.0.0/16"  # Tortie's blocks (/26)
BIRD_BLOCKS = "10.250"  # BIRD's "blocks": 10.250.x.y/26
BULK_NET = "10.100"  # part 3's routes: 10.100.x.y/32
ASN, SOURCE_ASN = 64512, 65001
CLUSTER_ID = "224.0.0.1"
CLAIM_TIMEOUT = 60.0
BULK_TIMEOUT = 300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")




class BenchFailure(RuntimeError):
    """Something that was measured did not happen: the figures would mean nothing."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- watching kernel routes ---------------------------------------------------------------------


class RouteWatch:
    """Route notifications of one namespace, read in a thread: when each route of protocol
    ``proto`` ("81", or "bird") was last added and deleted (monotonic time). All watches of a run
    share one condition, notified per batch of events.

    An rtnetlink socket of our own with a large receive buffer (``SO_RCVBUFFORCE``), not ``ip
    monitor``: BIRD deletes 10,000 routes in ~0.1 s, which overflowed the monitor's 1 MiB buffer
    (ENOBUFS, events lost, a wait that never ends)."""

    GROUP_IPV4_ROUTE = 0x40  # RTMGRP_IPV4_ROUTE
    RTM_NEWROUTE, RTM_DELROUTE = 24, 25
    PROTOCOLS = {"bird": 12}

    def __init__(self, netns: str, proto: str, changed: threading.Condition) -> None:
        from kernel.netns import netns as entered

        self.netns, self.proto, self.changed = netns, proto, changed
        self.added: dict[str, float] = {}
        self.deleted: dict[str, float] = {}
        self.lost = False
        self._number = self.PROTOCOLS.get(proto) or int(proto)
        with entered(f"/run/netns/{netns}"):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root)
        self._sock.bind((0, self.GROUP_IPV4_ROUTE))
        self._sock.settimeout(0.2)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"watch-{netns}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing:
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as e:  # ENOBUFS: events were lost; the figures would be wrong
                if self._closing:
                    return
                self.lost = True
                log(f"  route watch of {self.netns} lost events: {e}")
                continue
            now = time.monotonic()
            events = list(self._parse(data))
            if events:
                with self.changed:
                    for deleted, dst in events:
                        (self.deleted if deleted else self.added)[dst] = now
                    self.changed.notify_all()

    def _parse(self, data: bytes) -> Iterable[tuple[bool, str]]:
        offset = 0
        while offset + 28 <= len(data):
            length, kind = int.from_bytes(data[offset:offset + 4], "little"), data[offset + 4]
            if length < 16:
                return
            if kind in (self.RTM_NEWROUTE, self.RTM_DELROUTE) and data[offset + 21] == self._number:
                dst_len, dst = data[offset + 17], "0.0.0.0"
                a = offset + 28
                while a + 4 <= offset + length:
                    a_len, a_type = int.from_bytes(data[a:a + 2], "little"), int.from_bytes(data[a + 2:a + 4], "little")
                    if a_len < 4:
                        break
                    if a_type == 1 and a_len == 8:  # RTA_DST, IPv4
                        dst = str(ipaddress.IPv4Address(data[a + 4:a + 8]))
                    a += (a_len + 3) & ~3
                yield kind == self.RTM_DELROUTE, f"{dst}/{dst_len}"
            offset += (length + 3) & ~3

    def close(self) -> None:
        self._closing = True
        self._thread.join(5)
        self._sock.close()


def wait_changed(changed: threading.Condition, ready: Callable[[], float | None], timeout: float, what: str) -> float:
    """Wait (on the watches' condition) until ``ready()`` returns a time; return it."""
    deadline = time.monotonic() + timeout
    with changed:
        while (found := ready()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchFailure(f"timed out after {timeout:g} s waiting for {what}")
            changed.wait(min(left, 1.0))
    return found


# ---- claiming blocks from inside a node namespace -----------------------------------------------


def serve_claims(socket_path: str) -> int:
    """The claimer (``python -m bench.bgp_bench claimer SOCKET``), run inside a node namespace:
    one JSON request per connection, ``{"node", "address"}``; it assigns the address to a new
    handle for that node (claiming the block it is in) and answers with the monotonic times
    before and after the call, and when the transaction that created the block was sent (``tb``)
    and returned (``tc``). The commit itself lies in between: ``tc`` is late by however long this
    process waited for a core once etcd answered (the 10 agents wake on the same commit: the trace
    saw the origin's agent with the block 3-6 ms before ``tc``), ``tb`` early by the round trip."""
    from datastore import keys
    from datastore.config import EtcdConfig
    from datastore.etcd import EtcdClient
    from datastore.kv import Create
    from ipam.allocator import IPAM, AssignRequest

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with EtcdClient(EtcdConfig.from_env()) as client:
        committed: list[tuple[float, float]] = []
        commit = client.commit
        blocks = keys.block_key(ipaddress.ip_network(POOL)).rsplit("/", 1)[0] + "/"

        def timed_commit(ops: Any) -> int:
            sent = time.monotonic()
            revision = commit(ops)
            if any(isinstance(op, Create) and op.key.startswith(blocks) for op in ops):
                committed.append((sent, time.monotonic()))
            return revision

        client.commit = timed_commit  # type: ignore[method-assign]
        ipam = IPAM(client)
        ipam.pools()  # the connection is up before the first timed call
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        binding = socket_path + ".new"
        server.bind(binding)
        server.listen(4)
        os.rename(binding, socket_path)  # appears only once it accepts
        server.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                request = json.loads(conn.makefile("rb").readline())
                committed.clear()
                t0 = time.monotonic()
                try:
                    ipam.assign(AssignRequest(f"bench-{secrets.token_hex(6)}", request["node"], num_v4=0,
                                              addresses=[ipaddress.ip_address(request["address"])]))
                    t1 = time.monotonic()
                    if not committed:
                        raise RuntimeError("no block was created: the address's block existed already")
                    answer: dict[str, Any] = {"t0": t0, "t1": t1, "tb": committed[0][0], "tc": committed[0][1]}
                except Exception as e:  # the benchmark wants to see it, not a dead claimer
                    answer = {"error": f"{type(e).__name__}: {e}"}
                conn.sendall(json.dumps(answer).encode() + b"\n")
    return 0


def claim(socket_path: Path, node: str, address: str) -> tuple[float, float, float, float]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path))
        sock.sendall(json.dumps({"node": node, "address": address}).encode() + b"\n")
        answer = json.loads(sock.makefile("rb").readline())
    if "error" in answer:
        raise BenchFailure(f"claiming the block of {address} for {node} failed: {answer['error']}")
    return answer["t0"], answer["t1"], answer["tc"], answer["tb"]


def claim_through_agent(plugin: Path, socket_path: Path, etcd_env: dict[str, str], node: str, address: str
                        ) -> tuple[float, float, float, float]:
    """The production path of a node's claim: ``tortie-ipam`` ADD exec'd as a runtime would (the
    compiled front end, which relays it to the node's agent over its CNI socket; ``IP=`` in
    CNI_ARGS names the address, whose free block the agent's IPAM claims for the node). Returns
    the times before the exec and after the plugin's exit; the commit's are left NaN, for
    :func:`commit_from_trace`. An agent without the ``commit`` steps (an older one) has its
    ``datastore`` step stand for the commit and for its send."""
    conf = {"cniVersion": "1.0.0", "name": "bgp-bench", "type": "tortie-ipam", "nodename": node,
            "etcd_endpoints": etcd_env["ETCD_ENDPOINTS"], "etcd_ca_cert_file": etcd_env["ETCD_CA_CERT_FILE"],
            "etcd_cert_file": etcd_env["ETCD_CERT_FILE"], "etcd_key_file": etcd_env["ETCD_KEY_FILE"],
            "agent_socket": str(socket_path),
            "ipam": {"type": "tortie-ipam", "assign_ipv4": "true", "assign_ipv6": "false"}}
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": "ADD",
               "CNI_CONTAINERID": f"bench-{secrets.token_hex(6)}", "CNI_NETNS": "/var/run/netns/bgp-bench-none",
               "CNI_IFNAME": "eth0", "CNI_ARGS": f"IgnoreUnknown=1;IP={address}", "CNI_PATH": str(plugin.parent)}
    data = json.dumps(conf).encode()
    t0 = time.monotonic()
    done = subprocess.run([str(plugin)], input=data, env=environ, capture_output=True, timeout=30, check=False)
    t1 = time.monotonic()
    if done.returncode != 0:
        raise BenchFailure(f"tortie-ipam ADD of {address} on {node} failed: {done.stdout.decode()[:300]} "
                           f"{done.stderr.decode()[:300]}")
    ips = [ip["address"].split("/")[0] for ip in json.loads(done.stdout).get("ips", [])]
    if ips != [address]:
        raise BenchFailure(f"tortie-ipam ADD on {node} asked for {address}, got {ips}")
    return t0, t1, math.nan, math.nan  # the commit's times: commit_from_trace, once the route is everywhere


def commit_from_trace(trace_file: Path, prefix: str, t0: float, t1: float) -> tuple[float, float]:
    """The commit of a claim through the agent, read from the origin's trace once the route has
    spread (its watch may deliver the block after the plugin exited): the commit lies before
    each of its sightings, its return to the agent's IPAM (``commit``) and the origin's announce
    being decided (``datastore``, from that return or from the watch, which often comes first:
    the two answers race for the agent's GIL). And the transaction's send (``commit_sent``)."""
    first = traced(trace_file, prefix, t0)
    tc = min((first[step] for step in ("commit", "datastore") if step in first), default=t1)
    return tc, first.get("commit_sent", tc)


def traced(trace_file: Path, prefix: str, after: float) -> dict[str, float]:
    """Step -> the first time it was traced for ``prefix`` after ``after``, in one read of the file."""
    first: dict[str, float] = {}
    for when, step, which in trace_lines(trace_file):
        if which == prefix and when >= after:
            first.setdefault(step, when)
    return first


def trace_lines(path: Path) -> Iterable[tuple[float, str, str]]:
    """A ``bgp.trace`` file's lines: (monotonic time, step, prefix); none when there is no file."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        when, step, prefix = line.split()
        yield float(when), step, prefix


def block(base: str, j: int) -> str:
    """The j-th /26 of ``base``.0.0/16."""
    return f"{base}.{j // 4}.{(j % 4) * 64}/26"


# ---- convergence --------------------------------------------------------------------------------


@dataclass
class Convergence:
    """One series of claims: per claim, the time until the route was in every other node's kernel
    (``last``), in the first one (``first``), and what the trigger (IPAM call, birdc) took; all from
    the trigger's start. ``committed``: to every other node from the commit of the block in etcd
    (Tortie; BIRD has no such moment, its figure is from the start of ``birdc enable``)."""

    last: list[float] = field(default_factory=list)
    committed: list[float] = field(default_factory=list)
    # to every other node from when the commit was sent (Tortie): the commit is between the two
    commit_sent: list[float] = field(default_factory=list)
    commit_times: list[float] = field(default_factory=list)  # tc - t0: where in the call the commit was
    first: list[float] = field(default_factory=list)
    trigger: list[float] = field(default_factory=list)
    origin: list[float] = field(default_factory=list)  # Tortie: the origin's own blackhole (protocol 80)
    claims: list[tuple[str, int, float]] = field(default_factory=list)  # (prefix, origin, commit time)
    seen: list[dict[int, float]] = field(default_factory=list)  # per claim: node -> route in its kernel
    own: list[bool] = field(default_factory=list)  # per claim: its origin took it in at its commit (trace)


def converge(origins: Sequence[int], watches: dict[int, RouteWatch], changed: threading.Condition,
             prefixes: Iterable[str], trigger: Callable[[int, str], tuple[float, float, float, float]],
             own: dict[int, RouteWatch] | None = None,
             commit: Callable[[int, str, float, float], tuple[float, float]] | None = None) -> Convergence:
    """For each prefix (origin node rotating over ``origins``): ``trigger(origin, prefix)`` (which
    returns when it started and ended, and when the block's commit returned and was sent), then wait until every
    other watched node has the route and, with ``own``, until the origin has its own route
    (Tortie's agent programs a blackhole for its block in the same pass as it announces it: when
    its agent had taken the claim in). ``commit(origin, prefix, t0, t1)``: the commit's return and send,
    when the trigger could not tell them (a claim through the agent: its trace)."""
    out = Convergence()
    for i, prefix in enumerate(prefixes):
        origin = origins[i % len(origins)]
        others = [w for k, w in watches.items() if k != origin]
        t0, t1, tc, tb = trigger(origin, prefix)

        def everywhere(others: list[RouteWatch] = others, prefix: str = prefix, t0: float = t0) -> float | None:
            seen = [w.added.get(prefix) for w in others]
            return max(seen) if all(s is not None and s >= t0 for s in seen) else None  # type: ignore[type-var]

        last = wait_changed(changed, everywhere, CLAIM_TIMEOUT, f"{prefix} in the kernel of every node")
        if commit is not None:  # known only now (read from a trace)
            tc, tb = commit(origin, prefix, t0, t1)
        out.last.append(last - t0)
        out.committed.append(last - tc)
        out.commit_sent.append(last - tb)
        out.commit_times.append(tc - t0)
        out.first.append(min(w.added[prefix] for w in others) - t0)
        out.trigger.append(t1 - t0)
        out.claims.append((prefix, origin, tc))
        out.seen.append({k: w.added[prefix] for k, w in watches.items() if k != origin})
        if own is not None:
            watch = own[origin]
            seen = wait_changed(changed, lambda w=watch, p=prefix, t0=t0: (  # type: ignore[misc]
                w.added[p] if w.added.get(p, -1.0) >= t0 else None), CLAIM_TIMEOUT, f"{prefix} on its own node")
            out.origin.append(seen - t0)
    return out


def convergence_figures(label: str, tortie: Convergence, bird: Convergence, reference_label: str | None = None
                        ) -> list[Figure]:
    """Tortie from the commit of the block (the target's figure) and from the start of the claim
    call, each divided by BIRD's from the start of ``birdc enable``. With ``reference_label``,
    BIRD's figures are those already given under that label (a second Tortie series of the run)."""
    figures = []
    for stat, fn in (("p50", statistics.median), ("max", max)):
        b = fn(bird.last) * 1000
        reference = f"{reference_label or label}: BIRD, enable → every node {stat}"
        if reference_label is None:
            figures.append(Figure(reference, b, "ms"))
        t = fn(tortie.committed) * 1000
        figures.append(Figure(f"{label}: Tortie, commit → every node {stat}", t, "ms", reference,
                              t / b if b else None))
        t = fn(tortie.commit_sent) * 1000  # the bound on the other side: the commit is between
        figures.append(Figure(f"{label}: Tortie, commit sent → every node {stat}", t, "ms", reference,
                              t / b if b else None))
        t = fn(tortie.last) * 1000
        figures.append(Figure(f"{label}: Tortie, claim start → every node {stat}", t, "ms", reference,
                              t / b if b else None))
    # Where the time goes, from the commit: the origin's agent has taken the block in (its own
    # blackhole), the first other node has the route, every other node has it.
    since_commit = [f - c for f, c in zip(tortie.first, tortie.commit_times, strict=True)]
    figures.append(Figure(f"{label}: Tortie, commit → first node p50", statistics.median(since_commit) * 1000, "ms"))
    if tortie.origin:
        own = [o - c for o, c in zip(tortie.origin, tortie.commit_times, strict=True)]
        figures.append(Figure(f"{label}: Tortie, commit → origin agent's own blackhole p50",
                              statistics.median(own) * 1000, "ms"))
    figures.append(Figure(f"{label}: Tortie, claim start → block commit p50 (included above)",
                          statistics.median(tortie.commit_times) * 1000, "ms"))
    figures.append(Figure(f"{label}: Tortie, IPAM claim call p50 (included)",
                          statistics.median(tortie.trigger) * 1000, "ms"))
    if reference_label is None:
        figures.append(Figure(f"{label}: BIRD, birdc enable p50 (included)", statistics.median(bird.trigger) * 1000,
                              "ms"))
    return figures


def read_traces(directory: Path) -> dict[int, dict[tuple[str, str], list[float]]]:
    """``bgp.trace`` files: node -> (step, prefix) -> times."""
    out: dict[int, dict[tuple[str, str], list[float]]] = {}
    for path in directory.glob("n*.trace"):
        steps: dict[tuple[str, str], list[float]] = {}
        for when, step, prefix in trace_lines(path):
            steps.setdefault((step, prefix), []).append(when)
        out[int(path.stem[1:])] = steps
    return out


STEPS = (
    ("commit → origin agent has it", "commit", "datastore"),
    ("origin agent: → command in ExaBGP's pipe", "datastore", "sent"),
    ("pipe → first node's agent reads the UPDATE (2 ExaBGPs, TCP)", "sent", "read first"),
    ("pipe → last node's agent reads it", "sent", "read last"),
    ("agent: read → parsed (per node)", "read", "parsed"),
    ("agent: parsed → kernel write sent (per node)", "parsed", "write"),
    ("agent: kernel write sent → acked (per node)", "write", "kernel"),
    ("kernel write acked → route event seen (per node)", "kernel", "seen"),
)


def trace_figures(label: str, tortie: Convergence, traces: dict[int, dict[tuple[str, str], list[float]]]
                  ) -> list[Figure]:
    """Where the time from the commit to every node goes, step by step (``bgp.trace``): p50 over
    the claims (over the claims and nodes for the per-node steps). Each time is the first of its
    step after the commit."""
    spans: dict[str, list[float]] = {name: [] for name, _, _ in STEPS}
    for (prefix, origin, tc), seen in zip(tortie.claims, tortie.seen, strict=True):
        def first(k: int, step: str, after: float = tc, p: str = prefix) -> float | None:
            times = [t for t in traces.get(k, {}).get((step, p), []) if t >= after - 0.5]
            return min(times) if times else None
        at: dict[str, float | None] = {"commit": tc, "datastore": first(origin, "datastore"),
                                       "sent": first(origin, "sent")}
        per_node = {k: {"read": first(k, "read"), "parsed": first(k, "parsed"), "write": first(k, "write"),
                        "kernel": first(k, "kernel"), "seen": s} for k, s in seen.items()}
        reads = [n["read"] for n in per_node.values() if n["read"] is not None]
        at["read first"], at["read last"] = (min(reads), max(reads)) if reads else (None, None)
        for name, a, b in STEPS:
            if a in at:
                start, end = at[a], at.get(b)
                if start is not None and end is not None:
                    spans[name].append(end - start)
            else:
                for n in per_node.values():
                    start, end = n[a], n[b]
                    if start is not None and end is not None:
                        spans[name].append(end - start)
    return [Figure(f"{label}: Tortie trace, {name} p50", statistics.median(v) * 1000, "ms")
            for name, v in spans.items() if v]


# ---- CPU ----------------------------------------------------------------------------------------


def cluster_cpu(c: Any) -> dict[str, float]:
    """CPU seconds so far of every Tortie node's agent, and of their ExaBGPs with API processes."""
    agents = [c.agents[k] for k in TORTIE]
    threads = thread_cpu(agents)
    return {"agents": sum(map(cpu_seconds, agents)),
            "ExaBGPs and API processes": sum(cpu_seconds(p) for a in agents for p in descendants(a)),
            **{f"agents' {name} threads": threads.get(name, 0.0) for name in AGENT_THREADS}}


# The agents' threads whose CPU per claim the table shows (felix_agent.thread_names gives them
# their names in the kernel): the watch and its hand-over to the calculation and BGP's exports;
# the reader of ExaBGP's output, which writes learned routes to the kernel; the dataplane loop.
AGENT_THREADS = ("syncer", "bgp-api", "dataplane")


def thread_cpu(pids: Iterable[int]) -> dict[str, float]:
    """CPU seconds so far of the live threads of ``pids``, by kernel thread name, summed."""
    out: dict[str, float] = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def priorities(c: Any) -> str:
    """The nice values the agents and their ExaBGPs (and API processes) run at (``--bgp-nice``)."""
    agents = [c.agents[k] for k in TORTIE]
    agent = sorted({n for a in agents if (n := nice_of(a)) is not None})
    children = sorted({n for a in agents for p in descendants(a) if (n := nice_of(p)) is not None})
    return f"agents at nice {agent}, their ExaBGPs and API processes at {children} (felix-agent --bgp-nice)"


def nice_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier]
        out += children
        frontier = children
    return out


# ---- BIRD configurations ------------------------------------------------------------------------

LOG = "log stderr { warning, error, fatal, bug };"


def bird_address(k: int) -> str:
    return f"198.18.0.{10 + k}"


def statics(claims: dict[int, str]) -> list[str]:
    return [f"protocol static c{i} {{ disabled; ipv4; route {p} blackhole; }}" for i, p in sorted(claims.items())]


def bird_mesh_config(k: int, members: Sequence[int], claims: dict[int, str]) -> str:
    me = bird_address(k)
    lines = [LOG, f"router id {me};", "protocol device { scan time 10; }",
             "protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }", *statics(claims),
             "template bgp mesh {", f"  local {me} as {ASN};", "  direct;", "  hold time 9;",
             "  ipv4 { import all; export where source = RTS_STATIC; };", "}"]
    lines += [f"protocol bgp p{j} from mesh {{ neighbor {bird_address(j)} as {ASN}; }}" for j in members if j != k]
    return "\n".join(lines) + "\n"


def bird_rr_config(k: int, members: Sequence[int], reflectors: Sequence[int], claims: dict[int, str]) -> str:
    me = bird_address(k)
    lines = [LOG, f"router id {me};", "protocol device { scan time 10; }",
             "protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }", *statics(claims),
             "template bgp inner {", f"  local {me} as {ASN};", "  direct;", "  hold time 9;"]
    if k in reflectors:
        lines += ["  ipv4 { import all; export all; };", "}",
                  "template bgp outer from inner {", "  rr client;", f"  rr cluster id {CLUSTER_ID};", "}"]
        lines += [f"protocol bgp p{j} from {'inner' if j in reflectors else 'outer'} "
                  f"{{ neighbor {bird_address(j)} as {ASN}; }}" for j in members if j != k]
    else:
        lines += ["  ipv4 { import all; export where source = RTS_STATIC; };", "}"]
        lines += [f"protocol bgp p{j} from inner {{ neighbor {bird_address(j)} as {ASN}; }}" for j in reflectors]
    return "\n".join(lines) + "\n"


def bulk_routes(count: int) -> list[str]:
    return [f"{BULK_NET}.{i // 250}.{i % 250 + 1}/32" for i in range(count)]


def source_config(routes: Sequence[str]) -> str:
    """The external router: eBGP to Tortie node n3 (``tortie``) and to the BIRD node
    (``birdnode``, disabled at first); 10,000 static routes in ``bulk``, disabled at first."""
    me = bird_address(SOURCE)
    return "\n".join([
        LOG, f"router id {me};", "protocol device { scan time 10; }",
        "protocol static bulk {", "  disabled;", "  ipv4;", *[f"  route {p} blackhole;" for p in routes], "}",
        "template bgp feed {", f"  local {me} as {SOURCE_ASN};", "  hold time 9;",
        "  ipv4 { import none; export where source = RTS_STATIC; };", "}",
        f"protocol bgp tortie from feed {{ neighbor {bird_address(3)} as {ASN}; }}",
        f"protocol bgp birdnode from feed {{ disabled; neighbor {bird_address(BIRD_NODE)} as {ASN}; }}",
        f"protocol bgp warmup from feed {{ disabled; neighbor {bird_address(WARM_SINK)} as {ASN}; }}",
    ]) + "\n"


def receiving_bird_config(index: int) -> str:
    """A BIRD at ``bird_address(index)`` that takes what the external router sends into its own
    kernel, as a node does: the measured one (``BIRD_NODE``) and the warm-up's sink (``WARM_SINK``)."""
    me = bird_address(index)
    return "\n".join([
        LOG, f"router id {me};", "protocol device { scan time 10; }",
        "protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }",
        f"protocol bgp upstream {{ local {me} as {ASN}; neighbor {bird_address(SOURCE)} as {SOURCE_ASN}; "
        "hold time 9; ipv4 { import all; export none; }; }",
    ]) + "\n"


# ---- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    claims: int
    routes: int


FULL = Scale(claims=50, routes=10_000)
QUICK = Scale(claims=10, routes=10_000)


def run(scale: Scale, quick: bool, trace: bool = False, bgp_nice: int | None = None,
        bird_nice: int = 0) -> dict[str, Any]:
    # Imported here: the claimer (run inside a node) needs none of it.
    from netlab.bgp_cluster import (
        BGPCluster,
        bgp_configuration_yaml,
        bgp_peer_yaml,
        bgp_pools,
        bird_established,
        documents,
        node_yaml,
    )
    from netlab.bgp_cluster import (
        start_bird as start_bird_plain,
    )
    from netlab.bird import Bird

    started = time.perf_counter()
    info = machine()
    log(f"BGP benchmark ({'quick' if quick else 'full'}) on {info['nproc']} CPUs, "
        f"load {' '.join(f'{x:.2f}' for x in info['loadavg_start'])}")
    figures: list[Figure] = []
    checks: list[str] = []
    phases: dict[str, float] = {}
    changed = threading.Condition()
    watches: list[RouteWatch] = []

    def phase(name: str, since: float) -> None:
        phases[name] = round(time.perf_counter() - since, 1)
        log(f"  ({phases[name]} s)")

    def start_bird(*args: Any, **kwargs: Any) -> Bird:
        """BIRD at ``--bird-nice`` (default 0: as deployed), to compare like with like."""
        bird = start_bird_plain(*args, **kwargs)
        if bird_nice and bird.pid is not None:
            os.setpriority(os.PRIO_PROCESS, bird.pid, bird_nice)
        return bird

    trace_dir = Path(tempfile.mkdtemp(prefix="tortie-bgp-trace-"))
    # Always traced: the commit's time of a claim through the agent is a trace step of the origin's
    # (a few buffered lines per claim and node); --trace adds the per-step figures to the table.
    agent_args = ["--bgp-trace", str(trace_dir)] + (["--bgp-nice", str(bgp_nice)] if bgp_nice is not None else [])
    with BGPCluster("bgpb", NODES, agents=TORTIE, pools=bgp_pools(POOL, 26), agent_args=agent_args) as bgp:
        try:
            c, lab = bgp.cluster, bgp.lab
            t = time.perf_counter()
            log("part 1: 10-node mesh")
            mesh_claims = {i: block(BIRD_BLOCKS, i) for i in range(scale.claims)}
            rr_claims = {scale.claims + i: block(BIRD_BLOCKS, scale.claims + i) for i in range(scale.claims)}
            by_origin: dict[int, dict[int, str]] = {k: {} for k in BIRD_MESH}
            for i, prefix in mesh_claims.items():
                by_origin[BIRD_MESH[i % len(BIRD_MESH)]][i] = prefix
            clients = BIRD_MESH[2:]
            for n, (i, prefix) in enumerate(rr_claims.items()):
                by_origin[clients[n % len(clients)]][i] = prefix
            birds: dict[int, Bird] = {}
            for k in BIRD_MESH:
                birds[k] = start_bird(bgp, k, bird_mesh_config(k, BIRD_MESH, by_origin[k]))
            claimer = c.work / "claimer.sock"
            env = {**c.env, "PYTHONPATH": str(REPO), "HOME": "/root"}
            lab.start_process(c.node(1).netns, [sys.executable, "-m", "bench.bgp_bench", "claimer", str(claimer)],
                              c.work / "claimer.log", env)
            bgp_watch = {k: RouteWatch(c.node(k).netns, "81", changed) for k in TORTIE}
            own_watch = {k: RouteWatch(c.node(k).netns, "80", changed) for k in TORTIE}
            bird_watch = {k: RouteWatch(c.node(k).netns, "bird", changed) for k in BIRD_MESH}
            watches += [*bgp_watch.values(), *own_watch.values(), *bird_watch.values()]
            for k in TORTIE:
                bgp.wait_established(k, [j for j in TORTIE if j != k], timeout=120)
            for k in BIRD_MESH:
                wait_for_bird(birds[k], len(BIRD_MESH) - 1, bird_established)
            wait_path(claimer)
            log(f"  sessions up: Tortie {len(TORTIE) * (len(TORTIE) - 1) // 2}, "
                f"BIRD {len(BIRD_MESH) * (len(BIRD_MESH) - 1) // 2}")

            def claimer_claim(origin: int, prefix: str) -> tuple[float, float, float, float]:
                return claim(claimer, f"n{origin}", str(ipaddress.ip_network(prefix)[1]))

            traced_commits = [0]  # claims whose commit the origin's agent traced (a check)

            def tortie_claim(origin: int, prefix: str) -> tuple[float, float, float, float]:
                return claim_through_agent(c.bin_dir / "tortie-ipam", c.agent(origin).cni_socket, c.env,
                                           f"n{origin}", str(ipaddress.ip_network(prefix)[1]))

            def agent_commit(origin: int, prefix: str, t0: float, t1: float) -> tuple[float, float]:
                tc, tb = commit_from_trace(trace_dir / f"n{origin}.trace", prefix, t0, t1)
                traced_commits[0] += tc != t1
                return tc, tb

            def bird_claim(origin: int, prefix: str) -> tuple[float, float, float, float]:
                i = next(i for i, p in by_origin[origin].items() if p == prefix)
                t0 = time.monotonic()
                birds[origin].birdc("enable", f"c{i}")
                return t0, time.monotonic(), t0, t0

            cpu_before = cluster_cpu(c)
            checks.append(f"priority: {priorities(c)}; BIRD at nice {bird_nice}")
            agent_blocks = [block("10.244", 512 + i) for i in range(scale.claims)]
            claimer_blocks = [block("10.244", 640 + i) for i in range(scale.claims)]
            tortie_mesh = converge(TORTIE, bgp_watch, changed, agent_blocks, tortie_claim, own_watch, agent_commit)
            cpu_after = cluster_cpu(c)
            bird_mesh = converge(BIRD_MESH, bird_watch, changed, list(mesh_claims.values()), bird_claim)
            # The same, claimed by a separate process in n1 (IPAM.assign): the origin's agent then
            # learns of its block from its watch, like the 9 others (the figure before the agent path).
            claimer_mesh = converge(TORTIE, bgp_watch, changed, claimer_blocks, claimer_claim, own_watch)
            figures += convergence_figures("mesh, 10 nodes", tortie_mesh, bird_mesh)
            figures += convergence_figures("mesh, 10 nodes, claimer process", claimer_mesh, bird_mesh, "mesh, 10 nodes")
            # The CPU the 10 nodes spend per claim, on 2 shared cores: what competes with the
            # UPDATE's way (every agent takes the new block in from its watch; every ExaBGP
            # decodes the UPDATE and writes its JSON).
            for what in ("agents", "ExaBGPs and API processes", *(f"agents' {n} threads" for n in AGENT_THREADS)):
                figures.append(Figure(f"mesh, 10 nodes: Tortie CPU per claim, all 10 {what}",
                                      (cpu_after[what] - cpu_before[what]) / scale.claims * 1000, "CPU ms"))
            if trace:
                figures += trace_figures("mesh, 10 nodes", tortie_mesh, read_traces(trace_dir))
                figures += trace_figures("mesh, 10 nodes, claimer process", claimer_mesh, read_traces(trace_dir))
            traces = read_traces(trace_dir)
            tortie_mesh.own = [any(t >= tc - 0.5 for t in traces.get(o, {}).get(("own", p), []))
                               for p, o, tc in tortie_mesh.claims]
            own = sum(tortie_mesh.own)
            checks.append(f"mesh: claims through the agent (tortie-ipam ADD); commit time traced by "
                          f"the origin's agent for {traced_commits[0]} of {scale.claims} (any other: the plugin's "
                          f"exit); taken in by the origin at its commit for {own} (the others: its watch was first)")
            # The same run split by which of the origin's two sightings of the commit won.
            for which, flag in (("taken in at the commit", True), ("taken in from the watch", False)):
                times = [c for c, o in zip(tortie_mesh.committed, tortie_mesh.own, strict=True) if o is flag]
                if times:
                    figures.append(Figure(f"mesh, 10 nodes: Tortie, commit → every node p50, {which} "
                                          f"({len(times)} claims)", statistics.median(times) * 1000, "ms"))
            checks.append(f"mesh: {scale.claims} Tortie blocks and {scale.claims} BIRD routes reached all 9 "
                          "other nodes' kernels")
            phase("mesh", t)

            t = time.perf_counter()
            log("part 2: mesh off, 2 route reflectors")
            c.apply(documents(
                bgp_configuration_yaml(mesh=False),
                *[node_yaml(f"n{k}", bgp.address(k), labels={"rr": "true"}, cluster_id=CLUSTER_ID) for k in (1, 2)],
                bgp_peer_yaml("to-reflectors", nodeSelector="all()", peerSelector="rr == 'true'")))
            for k in BIRD_MESH:
                birds[k].stop()
                birds[k] = start_bird_again(bgp, k, bird_rr_config(k, BIRD_MESH, BIRD_MESH[:2], by_origin[k]),
                                            start_bird)
            for k in TORTIE:
                want = [j for j in TORTIE if j != k] if k in (1, 2) else [1, 2]
                bgp.wait_established(k, want, timeout=120)
            for k in BIRD_MESH:
                wait_for_bird(birds[k], len(BIRD_MESH) - 1 if k in BIRD_MESH[:2] else 2, bird_established)
            for k in TORTIE:  # the blocks of part 1 came back through the reflectors
                bgp.wait_routes(k, {p: bgp.address(TORTIE[i % len(TORTIE)]) for blocks in (agent_blocks, claimer_blocks)
                                    for i, p in enumerate(blocks) if TORTIE[i % len(TORTIE)] != k}, timeout=120)
            tortie_rr = converge(TORTIE[2:], bgp_watch, changed,
                                 [block("10.244", 768 + i) for i in range(scale.claims)], tortie_claim, own_watch,
                                 agent_commit)
            bird_rr = converge(clients, bird_watch, changed, list(rr_claims.values()), bird_claim)
            figures += convergence_figures("2 reflectors", tortie_rr, bird_rr)
            if trace:
                figures += trace_figures("2 reflectors", tortie_rr, read_traces(trace_dir))
            checks.append(f"reflectors: {scale.claims} claims on clients reached all 9 other nodes' kernels, "
                          "both speakers")
            phase("reflectors", t)
            for w in watches:
                w.close()
            watches.clear()
            for k in BIRD_MESH:
                birds[k].stop()

            t = time.perf_counter()
            log(f"part 3: {scale.routes} routes from an external router")
            routes = bulk_routes(scale.routes)
            source = start_bird(bgp, SOURCE, source_config(routes))
            sink = start_bird_again(bgp, WARM_SINK, receiving_bird_config(WARM_SINK), start_bird)
            warm_source(source, sink, len(routes))  # n3 has no BGPPeer yet: no session to it
            sink.stop()
            bird_node = start_bird(bgp, BIRD_NODE, receiving_bird_config(BIRD_NODE))
            c.apply(bgp_peer_yaml("bench-tor", node="n3", peerIP=bird_address(SOURCE), asNumber=SOURCE_ASN))
            bgp.wait_established(3, [bird_address(SOURCE)], exactly=False, timeout=60)
            agent = c.agents[3]
            tortie_bulk = bulk_transfer(c.node(3).netns, "81", source, routes, changed,
                                        {"agent": lambda: cpu_seconds(agent),
                                         "ExaBGP and its API relay": lambda: sum(map(cpu_seconds, descendants(agent)))})
            source.birdc("disable", "tortie")
            source.birdc("enable", "birdnode")
            wait_for_bird(bird_node, 1, bird_established)
            assert bird_node.pid is not None
            bird_pid = bird_node.pid
            bird_bulk = bulk_transfer(c.node(BIRD_NODE).netns, "bird", source, routes, changed,
                                      {"BIRD": lambda: cpu_seconds(bird_pid)})
            n = scale.routes
            figures += [
                Figure(f"{n} routes: BIRD node, all in the kernel", bird_bulk["install"], "s"),
                Figure(f"{n} routes: Tortie node, all in the kernel", tortie_bulk["install"], "s",
                       f"{n} routes: BIRD node, all in the kernel",
                       ratio(tortie_bulk["install"], bird_bulk["install"])),
                Figure(f"{n} routes: BIRD CPU while installing", bird_bulk["cpu install BIRD"], "CPU s"),
                Figure(f"{n} routes: Tortie agent CPU while installing", tortie_bulk["cpu install agent"], "CPU s",
                       f"{n} routes: BIRD CPU while installing",
                       ratio(tortie_bulk["cpu install agent"], bird_bulk["cpu install BIRD"])),
                Figure(f"{n} routes: Tortie ExaBGP+relay CPU while installing",
                       tortie_bulk["cpu install ExaBGP and its API relay"], "CPU s",
                       f"{n} routes: BIRD CPU while installing",
                       ratio(tortie_bulk["cpu install ExaBGP and its API relay"], bird_bulk["cpu install BIRD"])),
                Figure(f"{n} routes: BIRD node, all withdrawn", bird_bulk["withdraw"], "s"),
                Figure(f"{n} routes: Tortie node, all withdrawn", tortie_bulk["withdraw"], "s",
                       f"{n} routes: BIRD node, all withdrawn", ratio(tortie_bulk["withdraw"], bird_bulk["withdraw"])),
                Figure(f"{n} routes: Tortie agent CPU while withdrawing", tortie_bulk["cpu withdraw agent"], "CPU s"),
                Figure(f"{n} routes: Tortie ExaBGP+relay CPU while withdrawing",
                       tortie_bulk["cpu withdraw ExaBGP and its API relay"], "CPU s"),
                Figure(f"{n} routes: BIRD CPU while withdrawing", bird_bulk["cpu withdraw BIRD"], "CPU s"),
            ]
            checks.append(f"scale: {n} routes counted in the kernel of the Tortie node and of the BIRD node "
                          "(ip route), then none")
            phase("scale", t)
        finally:
            for w in watches:
                w.close()
            shutil.rmtree(trace_dir, ignore_errors=True)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    raw = {"mesh": {"tortie": asdict(tortie_mesh), "bird": asdict(bird_mesh), "claimer": asdict(claimer_mesh)},
           "reflectors": {"tortie": asdict(tortie_rr), "bird": asdict(bird_rr)},
           "scale": {"tortie": tortie_bulk, "bird": bird_bulk}}
    return {"benchmark": "bgp", "mode": "quick" if quick else "full", "machine": info, "scale": asdict(scale),
            "figures": [asdict(f) for f in figures], "checks": checks, "phase_seconds": phases, "raw": raw,
            "seconds": round(time.perf_counter() - started, 1)}


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def start_bird_again(bgp: Any, k: int, config: str, start: Callable[..., Any]) -> Any:
    """BIRD restarted in node ``k`` with ``config`` (its old control socket removed first)."""
    (bgp.cluster.work / "bird" / f"bird{k}" / "bird.ctl").unlink(missing_ok=True)
    return start(bgp, k, config)


def wait_for_bird(bird: Any, sessions: int, established: Callable[[Any], set[str]], timeout: float = 60) -> None:
    from netlab.wait import wait_for

    wait_for(lambda: len(established(bird)) >= sessions, timeout, f"BIRD in {bird.netns} to have {sessions} sessions",
             interval=0.2, describe=lambda: bird.birdc("show", "protocols"))


def wait_path(path: Path, timeout: float = 30) -> None:
    from netlab.wait import wait_for

    wait_for(path.exists, timeout, f"{path} to appear")


def warm_source(source: Any, sink: Any, count: int, timeout: float = 60) -> None:
    """The external router sends its table once, untimed, to a BIRD that is neither measured
    node and puts it in its kernel (``receiving_bird_config(WARM_SINK)``), then withdraws it. The first transfer
    took ~0.2 s longer than the later ones whichever node it fed (``bench.bgp_bulk
    --bird-first``), and part 3 always gave it to Tortie. Filling the router's table without a
    session warmed part of it; a sink without a kernel protocol more; one that writes its kernel
    (the machine's first 10,000 routes in a while) all but Tortie's own first table."""
    from netlab.bgp_cluster import bird_established
    from netlab.wait import wait_for

    def routes() -> str:
        return str(sink.birdc("show", "route", "count"))

    source.birdc("enable", "warmup")
    wait_for_bird(sink, 1, bird_established, timeout)
    source.birdc("enable", "bulk")
    wait_for(lambda: f"{count} of {count} routes" in routes(), timeout, "the warm-up sink's table", 0.1,
             describe=routes)
    source.birdc("disable", "bulk")
    wait_for(lambda: "0 of 0 routes" in routes(), timeout, "the warm-up sink's table to empty", 0.1,
             describe=routes)
    source.birdc("disable", "warmup")


def kernel_count(netns: str, proto: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "-4", "route", "show", "proto", proto], capture_output=True,
                         text=True, check=True).stdout
    return len(out.splitlines())


def bulk_transfer(netns: str, proto: str, source: Any, routes: Sequence[str], changed: threading.Condition,
                  cpu: dict[str, Callable[[], float]]) -> dict[str, float]:
    """``birdc enable bulk`` on the source: seconds until every route is in ``netns``'s kernel, and
    the CPU seconds of each of ``cpu`` meanwhile; then the same for ``disable bulk``."""
    wanted = set(routes)
    before = kernel_count(netns, proto)
    watch = RouteWatch(netns, proto, changed)
    out: dict[str, float] = {}
    try:
        for verb, key in (("enable", "install"), ("disable", "withdraw")):
            table = watch.deleted if verb == "disable" else watch.added
            cpu0 = {name: read() for name, read in cpu.items()}
            t0 = time.monotonic()
            source.birdc(verb, "bulk")

            def complete(table: dict[str, float] = table, t0: float = t0) -> float | None:
                if watch.lost:
                    raise BenchFailure(f"the route watch of {netns} lost events: no figure")
                if len(table) < len(wanted):
                    return None
                times = [table.get(p) for p in wanted]
                return max(times) if all(x is not None and x >= t0 for x in times) else None  # type: ignore[type-var]

            done = wait_changed(changed, complete, BULK_TIMEOUT, f"{len(wanted)} routes to be {verb}d in {netns}")
            out[key] = done - t0
            for name, read in cpu.items():
                out[f"cpu {key} {name}"] = read() - cpu0[name]
            count = kernel_count(netns, proto)
            expected = before + len(wanted) if verb == "enable" else before
            if count != expected:
                raise BenchFailure(f"{netns}: {count} protocol-{proto} routes in the kernel after {verb}, "
                                   f"not {expected}")
            table.clear()
            log(f"  {netns}: {len(wanted)} routes {verb}d in {out[key]:.2f} s")
    finally:
        watch.close()
    return out


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    bird = subprocess.run(["bird", "--version"], capture_output=True, text=True)
    try:
        exabgp = "ExaBGP " + importlib.metadata.version("exabgp")
    except importlib.metadata.PackageNotFoundError:
        exabgp = "ExaBGP (version unknown)"
    return {"host": platform.node(), "kernel": platform.release(), "nproc": len(os.sched_getaffinity(0)),
            "cpu": cpu, "python": platform.python_version(),
            "bird": (bird.stdout + bird.stderr).strip().removeprefix("BIRD version "),
            "exabgp": exabgp,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}




def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds the with-blocks: the lab is torn down


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["claimer"] and len(argv) == 2:
        return serve_claims(argv[1])
    parser = argparse.ArgumentParser(prog="python -m bench.bgp_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.claims} claims per series instead of "
                        f"{FULL.claims}")
    parser.add_argument("--trace", action="store_true", help="agents write per-step timestamps (bgp.trace): "
                        "the table shows where the time from the commit goes (adds a little work to the agents)")
    parser.add_argument("--bgp-nice", type=int, metavar="N", help="the agents' --bgp-nice (default: theirs, 0)")
    parser.add_argument("--bird-nice", type=int, metavar="N", default=0,
                        help="BIRD's nice value (default 0, as deployed; -5 gives it ExaBGP's)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        log("the BGP benchmark builds network namespaces: run it as root")
        return 1
    require("BGP benchmark", "ip", "etcd", "bird", "birdc")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = run(QUICK if args.quick else FULL, args.quick, args.trace, args.bgp_nice, args.bird_nice)
    except KeyboardInterrupt:
        log("interrupted; the lab is torn down")
        return 130
    except (BenchFailure, AssertionError) as e:  # AssertionError: a lab helper's wait ran out
        log(f"benchmark failed: {e}")
        return 1
    figures = [Figure(**f) for f in report["figures"]]
    m = report["machine"]
    finish(report, "bgp",
           f"BGP benchmark, {report['mode']} run, {m['date']}: {m['host']}, {m['nproc']} CPUs ({m['cpu']}), "
           f"kernel {m['kernel']}, Python {m['python']}, BIRD {m['bird']}, {m['exabgp']}",
           f"convergence over {report['scale']['claims']} claims per series; scale {report['scale']['routes']} routes",
           figure_table(figures, unit_width=6, ratio_heading="ratio to BIRD", name_reference=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
