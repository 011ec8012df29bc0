"""Who can reach whom in a ``netlab.cluster`` lab, by trying it, and why, by reading the policy.

``probe`` tries every pod to every other pod: one ICMP echo exchange, and a TCP connection to a
small server it starts inside each destination pod (and stops afterwards) when a port is given.
``explain`` says which policy and rule decides a packet from one pod to another, computed from
a one-shot listing of the datastore with the agent's own code: ``felix_agent.syncer.decode`` for
the values, ``felix_agent.calc.graph.compute`` for each endpoint's ordered policies, profiles and
IP sets, then the endpoint chains walked as ``felix_agent.dataplane.policy`` renders them (policies
in order, a Pass skips to the profiles, default deny once a policy selects the endpoint, then the
profiles, then drop). When the deciding rule matched an address through a network set (a
GlobalNetworkSet or NetworkSet whose nets the rule's selector put in its IP set), the verdict names
it. Drawing the matrix (a terminal table, an SVG picture) is ``netctl lab``'s.

Everything runs inside the lab's namespaces; the servers are recorded in the lab's directory so
that a killed run's servers are stopped by the next run (and ``lab down`` stops them in any case).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from datastore.keys import ROOT
from datastore.model import Resource, encode_fields
from datastore.policy import PORT_PROTOCOLS, PROTOCOLS, Rule
from felix_agent.calc.graph import Calculator
from felix_agent.calc.model import DesiredState, IPSet, RuleMatch
from felix_agent.calc.policy import NETWORK_LABEL, policy_id
from felix_agent.calc.snapshot import GLOBAL_NETWORK_SET, NETWORK_SET, Snapshot
from felix_agent.dataplane.policy import rule_families
from felix_agent.syncer import DEFAULT_PREFIXES, decode
from netlab import netns as ip_netns
from netlab.cluster import BIN, Cluster, PodInfo, clean_env
from netlab.etcd import ETCDCTL
from netlab.lab import LabError
from netlab.probes import TCP_CLIENT

EPHEMERAL_PORT = 49152  # the source port ``explain`` assumes for TCP (clients pick one at random)
CONNECT_TIMEOUT = 1.5
PROBE_WORKERS = 16
SERVERS_FILE = "matrix-servers.json"
PROTOCOL_NAMES = {number: name.lower() for name, number in PROTOCOLS.items()}

_SERVER = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=128)
while True:
    c, _ = s.accept()
    c.sendall(b"ok\\n")
    c.close()
"""


@dataclass(frozen=True)
class Probe:
    protocol: str  # "icmp" or "tcp"
    port: int | None = None

    def __str__(self) -> str:
        return self.protocol if self.port is None else f"{self.protocol}:{self.port}"


@dataclass
class Matrix:
    pods: list[str]
    probes: list[Probe]
    results: dict[tuple[Probe, str, str], bool]  # (probe, source pod, destination pod) → allowed

    def to_json(self) -> dict[str, object]:
        return {"pods": self.pods, "probes": [str(p) for p in self.probes],
                "results": {str(p): {a: {b: self.results[(p, a, b)] for b in self.pods if b != a} for a in self.pods}
                            for p in self.probes}}


def probes_for(port: int | None) -> list[Probe]:
    return [Probe("icmp")] + ([Probe("tcp", port)] if port is not None else [])


# -- trying it ----------------------------------------------------------------------------------


def probe(cluster: Cluster, port: int | None = None) -> Matrix:
    """Try every pod to every other pod; the servers for ``port`` are stopped before returning."""
    pods = cluster.pods
    if len(pods) < 2:
        raise LabError(f"lab {cluster.name!r} has {len(pods)} pod(s): a matrix needs two (--pods-per-node)")
    probes = probes_for(port)
    checks = [(p, a, b) for p in probes for a in pods for b in pods if a is not b]
    servers = _start_servers(cluster, port) if port is not None else []
    try:
        with ThreadPoolExecutor(PROBE_WORKERS) as pool:
            outcomes = list(pool.map(lambda check: _try(*check), checks))
    finally:
        _stop_servers(cluster, servers)
    return Matrix([p.name for p in pods], probes,
                  {(p, a.name, b.name): ok for (p, a, b), ok in zip(checks, outcomes, strict=True)})


def _try(p: Probe, a: PodInfo, b: PodInfo) -> bool:
    if p.port is None:  # two echo requests: allowed when either is answered
        argv = ["ping", "-q", "-n", "-c", "2", "-i", "0.2", "-W", "1", b.ip]
        return _run(a.netns, argv, 10).returncode == 0
    argv = [str(BIN / "python"), "-c", TCP_CLIENT, b.ip, str(p.port), f"{CONNECT_TIMEOUT:g}"]
    return _run(a.netns, argv, CONNECT_TIMEOUT + 10).stdout.strip() == "ok"


def _run(netns: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(ip_netns.exec_argv(netns, argv), capture_output=True, text=True, timeout=timeout,
                              env=clean_env())
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", "timed out")


def _start_servers(cluster: Cluster, port: int) -> list[tuple[int, int | None]]:
    _stop_servers(cluster, _recorded_servers(cluster))  # left by a run that was killed
    servers: list[tuple[int, int | None]] = []
    try:
        for pod in cluster.pods:
            log = cluster.work_dir / "matrix" / f"{pod.name}-{port}.log"
            proc = ip_netns.spawn(pod.netns, [str(BIN / "python"), "-c", _SERVER, str(port)], log, clean_env())
            servers.append((proc.pid, ip_netns.start_time(proc.pid)))
            _record_servers(cluster, servers)
        for pod in cluster.pods:
            _wait_listening(pod, port)
    except BaseException:
        _stop_servers(cluster, servers)
        raise
    return servers


def _wait_listening(pod: PodInfo, port: int, attempts: int = 200) -> None:
    for _ in range(attempts):
        if _run(pod.netns, ["ss", "-Hltn", f"sport = :{port}"], 10).stdout.strip():
            return
        time.sleep(0.05)
    raise LabError(f"the TCP server on port {port} of pod {pod.name} did not start")


def _stop_servers(cluster: Cluster, servers: list[tuple[int, int | None]]) -> None:
    ip_netns.stop([(pid, started) for pid, started in servers if started is not None])
    _record_servers(cluster, [])


def _recorded_servers(cluster: Cluster) -> list[tuple[int, int | None]]:
    try:
        return [(int(pid), started) for pid, started in json.loads((cluster.work_dir / SERVERS_FILE).read_text())]
    except (OSError, ValueError, TypeError):
        return []


def _record_servers(cluster: Cluster, servers: list[tuple[int, int | None]]) -> None:
    (cluster.work_dir / SERVERS_FILE).write_text(json.dumps(servers))


# -- explaining it ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    protocol: int
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.src).version

    @classmethod
    def of(cls, p: Probe, src: str, dst: str) -> Packet:
        if p.port is None:
            v4 = ipaddress.ip_address(src).version == 4
            return cls(src, dst, 1 if v4 else 58, icmp_type=8 if v4 else 128, icmp_code=0)
        return cls(src, dst, 6, EPHEMERAL_PORT, p.port)


@dataclass(frozen=True)
class Verdict:
    """What one endpoint's chain (one direction) decides, and which policy and rule decided it."""

    allowed: bool
    direction: str  # "ingress" or "egress"
    endpoint: str  # "pod4 (default/n2-tor…, on n2)"; ``evaluate`` gives the endpoint key
    reason: str
    policy: str | None = None  # the deciding policy's or profile's id, e.g. "np/default/web"
    rule: int | None = None
    network_sets: tuple[str, ...] = ()  # "GlobalNetworkSet <name>", "NetworkSet <ns>/<name>" the rule matched through


@dataclass(frozen=True)
class Explanation:
    src: str
    dst: str
    probe: Probe
    egress: Verdict  # the source's egress, on the source's node: the packet meets it first
    ingress: Verdict  # the destination's ingress, on the destination's node

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed

    @property
    def deciding(self) -> Verdict:
        """The verdict that decided: the first denial on the packet's way, else the ingress one."""
        return self.egress if not self.egress.allowed else self.ingress

    def lines(self) -> list[str]:
        return [f"{self.src} -> {self.dst} {self.probe}: {'ALLOWED' if self.allowed else 'DENIED'}",
                f"  ingress of {self.ingress.endpoint}: {self.ingress.reason}",
                f"  egress of {self.egress.endpoint}: {self.egress.reason}"]


def read_snapshot(cluster: Cluster) -> Snapshot:
    """Everything the agents watch, as they decode it, listed once with etcdctl from node 1."""
    node = cluster.nodes[0]
    env = cluster.env(node.name)
    argv = [str(ETCDCTL), f"--endpoints={env['ETCD_ENDPOINTS']}", "--dial-timeout=3s", "--command-timeout=20s",
            f"--cacert={env['ETCD_CA_CERT_FILE']}", f"--cert={env['ETCD_CERT_FILE']}", f"--key={env['ETCD_KEY_FILE']}",
            "get", "--prefix", ROOT, "-w", "json"]
    done = subprocess.run(ip_netns.exec_argv(node.netns, argv), capture_output=True, text=True, timeout=30,
                          env=clean_env({"ETCDCTL_API": "3"}))
    if done.returncode != 0:
        raise LabError(f"cannot list the lab's datastore: {done.stderr.strip() or done.stdout.strip()}")
    doc = json.loads(done.stdout)
    snapshot = Snapshot(revision=int(doc["header"]["revision"]))
    for kv in doc.get("kvs", []):
        key = base64.b64decode(kv["key"]).decode()
        if not key.startswith(DEFAULT_PREFIXES):
            continue
        revision = int(kv.get("mod_revision", 0))
        try:
            snapshot.apply(decode(key, base64.b64decode(kv.get("value", "")), revision), revision)
        except ValueError:
            continue  # as the syncer does: a value that does not decode is absent
    return snapshot


def explain(cluster: Cluster, a: str, b: str, port: int | None = None,
            snapshot: Snapshot | None = None) -> list[Explanation]:
    """Why pod ``a`` can or cannot reach pod ``b``, per probe (ICMP, and TCP on ``port``)."""
    src, dst = cluster.pod(a), cluster.pod(b)
    snap = snapshot or read_snapshot(cluster)
    src_key, dst_key = _endpoint_key(snap, src), _endpoint_key(snap, dst)
    src_calc, dst_calc = Calculator(src.node), Calculator(dst.node)
    src_state, dst_state = src_calc.compute(snap), dst_calc.compute(snap)
    explanations = []
    for p in probes_for(port):
        packet = Packet.of(p, src.ip, dst.ip)
        egress = evaluate(src_state, src_key, "egress", packet, snap, src_calc.set_sources)
        ingress = evaluate(dst_state, dst_key, "ingress", packet, snap, dst_calc.set_sources)
        explanations.append(Explanation(a, b, p, replace(egress, endpoint=f"{a} ({src_key} on {src.node})"),
                                        replace(ingress, endpoint=f"{b} ({dst_key} on {dst.node})")))
    return explanations


def _endpoint_key(snapshot: Snapshot, pod: PodInfo) -> str:
    for resource in snapshot.endpoints.values():
        if resource.spec.container_id == pod.container_id:
            return f"{resource.namespace or 'default'}/{resource.name}"
    raise LabError(f"pod {pod.name} has no WorkloadEndpoint in the datastore (was it deleted?)")


SetSources = Callable[[str, str], list[str]]  # (set id, address) → snapshot keys (Calculator.set_sources)


def evaluate(state: DesiredState, key: str, direction: str, packet: Packet, snapshot: Snapshot,
             sources: SetSources | None = None) -> Verdict:
    """Walk endpoint ``key``'s chain for ``direction`` as the dataplane renders it; with ``sources``
    (the calculator that computed ``state``), a verdict reached through a network set names it."""
    endpoint = next((e for e in state.endpoints if e.key == key), None)
    if endpoint is None:
        raise LabError(f"endpoint {key} is not on node {state.node} in the datastore")
    known = {p.id: p for p in state.policies}
    sets = {(s.id, s.version): s for s in state.ipsets}
    policies = endpoint.ingress_policies if direction == "ingress" else endpoint.egress_policies
    side = "destination" if direction == "ingress" else "source"

    def verdict(allowed: bool, reason: str, pid: str | None = None, rule: int | None = None) -> Verdict:
        if pid is None or rule is None or sources is None or pid not in known:
            return Verdict(allowed, direction, key, reason, pid, rule)
        rules = known[pid].ingress if direction == "ingress" else known[pid].egress
        deciding = next((r for r in rules if r.comment.rsplit(" ", 1)[-1] == str(rule)), None)
        named = _network_sets(deciding, packet, snapshot, sources) if deciding is not None else ()
        if named:
            reason += "; matched through " + ", ".join(named)
        return Verdict(allowed, direction, key, reason, pid, rule, named)

    passed = ""
    for pid in policies:
        if pid not in known:
            return verdict(False, f"denied: policy {pid} is missing (the dataplane fails closed)", pid)
        action, index = _walk(known[pid].ingress if direction == "ingress" else known[pid].egress, packet, sets)
        if action in ("Allow", "Deny"):
            what = f"by policy {pid}, {direction} rule {index}: {_describe(snapshot, pid, direction, index)}"
            return verdict(action == "Allow", f"{'allowed' if action == 'Allow' else 'denied'} {what}", pid, index)
        if action == "Pass":
            passed = f"policy {pid} passed it to the profiles ({direction} rule {index}); "
            break
    else:
        if policies:
            which = f"policy {policies[0]} selects" if len(policies) == 1 else f"policies {', '.join(policies)} select"
            return verdict(False, f"default deny: {which} the {side} for {direction} and no rule allowed the packet")
    prefix = passed or f"default: no policy selects the {side}; "
    for pid in endpoint.profiles:
        if pid not in known:
            return verdict(False, f"{prefix}denied: profile {pid} is missing (the dataplane fails closed)", pid)
        action, index = _walk(known[pid].ingress if direction == "ingress" else known[pid].egress, packet, sets)
        if action in ("Allow", "Deny"):
            what = f"by profile {pid}, {direction} rule {index}: {_describe(snapshot, pid, direction, index)}"
            return verdict(action == "Allow", f"{prefix}{'allowed' if action == 'Allow' else 'denied'} {what}",
                           pid, index)
    return verdict(False, f"{prefix}default deny: no profile allows the packet")


def _walk(rules: Iterable[RuleMatch], packet: Packet, sets: Mapping[tuple[str, int], IPSet]) -> tuple[str, int]:
    """The first deciding action (Allow, Deny, Pass) of a chain and the rule's index in its policy;
    ("", -1) when the chain returns without a verdict. Log rules log and go on."""
    for rule in rules:
        if rule.action != "Log" and matches(rule, packet, sets):
            return rule.action, int(rule.comment.rsplit(" ", 1)[-1])
    return "", -1


def matches(rule: RuleMatch, p: Packet, sets: Mapping[tuple[str, int], IPSet]) -> bool:
    """Whether ``rule`` matches packet ``p`` with the IP sets' current members (nft's semantics)."""
    v = p.version
    if v not in rule_families(rule):
        return False
    if rule.protocol is not None and p.protocol != rule.protocol:
        return False
    if rule.not_protocol is not None and p.protocol == rule.not_protocol:
        return False
    for addr, nets, not_nets, in_sets, not_sets in ((p.src, rule.src_nets, rule.src_not_nets, rule.src_sets,
                                                     rule.src_not_sets),
                                                    (p.dst, rule.dst_nets, rule.dst_not_nets, rule.dst_sets,
                                                     rule.dst_not_sets)):
        if nets and not _in_nets(addr, nets):
            return False
        if _in_nets(addr, not_nets):
            return False
        if not all(_in_nets(addr, _members(sets, s, v)) for s in in_sets):
            return False
        if any(_in_nets(addr, _members(sets, s, v)) for s in not_sets):
            return False
    ported = rule.src_ports or rule.src_not_ports or rule.dst_ports or rule.dst_not_ports
    if rule.protocol is None and ported and p.protocol not in PORT_PROTOCOLS:
        return False
    for addr, port, ports, not_ports, named in ((p.src, p.sport, rule.src_ports, rule.src_not_ports,
                                                 rule.src_named_port_sets),
                                                (p.dst, p.dport, rule.dst_ports, rule.dst_not_ports,
                                                 rule.dst_named_port_sets)):
        if not (ports or not_ports or named):
            continue
        if port is None:
            return False
        if any(lo <= port <= hi for lo, hi in not_ports):
            return False
        member = f"{addr},{PROTOCOL_NAMES.get(p.protocol, p.protocol)}:{port}"
        if (ports or named) and not (any(lo <= port <= hi for lo, hi in ports)
                                     or any(member in _members(sets, s, v) for s in named)):
            return False
    icmp = p.protocol == (1 if v == 4 else 58)
    if rule.icmp_type is not None and not (icmp and p.icmp_type == rule.icmp_type and
                                           rule.icmp_code in (None, p.icmp_code)):
        return False
    if rule.not_icmp_type is not None:
        if not icmp:
            return False
        if p.icmp_type == rule.not_icmp_type and rule.not_icmp_code in (None, p.icmp_code):
            return False
    return True


def _network_sets(rule: RuleMatch, p: Packet, snapshot: Snapshot, sources: SetSources) -> tuple[str, ...]:
    """The network sets that put the packet's source or destination into the rule's (or its
    notSelector's) IP sets, with the nets that hold the address."""
    found: list[str] = []
    for addr, set_ids in ((p.src, (*rule.src_sets, *rule.src_not_sets)), (p.dst, (*rule.dst_sets, *rule.dst_not_sets))):
        for set_id in set_ids:
            for key in sources(set_id, addr):
                for kind, label in ((GLOBAL_NETWORK_SET, "GlobalNetworkSet"), (NETWORK_SET, "NetworkSet")):
                    r = snapshot.tables[kind].get(key)
                    if r is None:
                        continue
                    name = f"{r.namespace}/{r.name}" if r.namespace else r.name
                    nets = [n for n in r.spec.nets if _in_nets(addr, [n])]
                    found.append(f"{label} {name} ({addr} in {', '.join(nets)})")
    return tuple(dict.fromkeys(found))


def _members(sets: Mapping[tuple[str, int], IPSet], set_id: str, version: int) -> frozenset[str]:
    found = sets.get((set_id, version))
    return found.members if found is not None else frozenset()


def _in_nets(addr: str, nets: Iterable[str]) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip in ipaddress.ip_network(n, strict=False) for n in nets
               if ipaddress.ip_network(n, strict=False).version == ip.version)


def _describe(snapshot: Snapshot, pid: str, direction: str, index: int) -> str:
    """The rule as its author wrote it (Calico's fields, as JSON), in a line."""
    stored = _stored(snapshot, pid)
    if stored is None:
        if pid.startswith("pro/net."):  # the network's synthesised profile (felix_agent.calc.graph)
            source = {"source": {"selector": f"{NETWORK_LABEL} == '{pid[len('pro/net.'):]}'"}}
            return json.dumps({"action": "Allow", **(source if direction == "ingress" else {})}) + " (synthesised)"
        return "(rule not found)"
    rules: list[Rule] = stored.spec.ingress if direction == "ingress" else stored.spec.egress
    if not 0 <= index < len(rules):
        return "(rule not found)"
    return json.dumps(encode_fields(rules[index]))


def _stored(snapshot: Snapshot, pid: str) -> Resource | None:
    tables = (snapshot.network_policies, snapshot.global_policies, snapshot.profiles)
    return next((r for table in tables for r in table.values() if policy_id(r) == pid), None)
