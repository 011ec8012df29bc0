"""Persistent multi-node labs for ``netctl lab``: a whole Tortie cluster on one machine.

A :class:`netlab.lab.Lab` (fabric, etcd with mutual TLS, node namespaces) plus, per node, a client
certificate from ``netctl.pki``, a ``Node`` resource and a felix-agent; the routing mode's default
pool (and BGP resources); K pods made through the real CNI plugins. It outlives the process that
built it: ``cluster.json`` records what ``status``, ``netctl lab exec|env`` and ``netlab.matrix``
need, and ``down`` removes everything from any process, also after a crash or a killed ``up``
(``netlab.lab.destroy_by_name`` reads ``lab.json``, where every namespace and process is recorded
as it is made). ``stop_agent`` and ``restart_agent`` stop one node's agent and start it again with
the command line ``up`` gave it, so that a user can watch what survives an agent's absence. Must
not change the root namespace: every command it runs runs inside one of the lab's namespaces; it
stops only processes the lab recorded or that live in its namespaces. Over 450 lines because the
whole ``netctl lab`` life cycle (up, agent stop and restart, status, down) shares ``cluster.json``'s
records; the agent's command line is ``netlab.agent``'s.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pki
from netlab import agent
from netlab import netns as ip_netns
from netlab.cni import REFERENCE_PLUGINS
from netlab.etcd import EtcdServer
from netlab.lab import (
    STATE_ROOT,
    UNDERLAY_LEN,
    Lab,
    LabError,
    PodError,
    Teardown,
    destroy_by_name,
    forget_process,
    record_process,
)

BIN = Path(sys.executable).parent  # the virtual environment's scripts: netctl, felix-agent, tortie
STATE_FILE = "cluster.json"
MODES = ("vxlan", "ipip", "bgp", "bgp-rr")
POOL = "default-ipv4"
POOL_CIDR = "10.244.0.0/16"
BLOCK_SIZE = 26
NETWORK = "tortie-net"
NAMESPACE = "default"
AS_NUMBER = 64512
RR_CLUSTER_ID = "224.0.0.1"
RR_LABEL = "route-reflector"
AGENT_READY_TIMEOUT = 120.0  # a healthy agent is ready in seconds; slow machines (a TCG VM) need more
BGP_TIMEOUT = 60.0
IPIP_VM = "/work/shared/tools/run_in_ipip_vm.sh"
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_proxy"}

# phase, steps done, steps in all, a note ("n/a: ..." when the phase does not apply)
Progress = Callable[[str, int, int, str], None]


@dataclass
class NodeInfo:
    name: str
    netns: str
    address: str  # on the fabric, without prefix length
    cert: str
    key: str
    state_dir: str  # the agent's state directory, CNI socket and log
    agent_pid: int | None = None
    agent_started: int | None = None  # start time of the PID (a reused PID is not the agent)

    @property
    def agent_log(self) -> Path:
        return Path(self.state_dir) / "agent.log"

    @property
    def cni_socket(self) -> Path:
        return Path(self.state_dir) / "cni.sock"

    def agent_process(self) -> int | None:
        """The PID of this node's felix-agent, None when none runs: the one ``up`` or
        ``restart_agent`` recorded while it still runs, else the process in the node's namespace
        that listens on the node's CNI socket (an agent restarted by hand with the same command
        line; matching command lines could name another lab's agent)."""
        if self.agent_pid is not None and ip_netns.start_time(self.agent_pid) == self.agent_started:
            return self.agent_pid
        return ip_netns.unix_listener(self.netns, self.cni_socket)

    def agent_running(self) -> bool:
        return self.agent_process() is not None


@dataclass
class PodInfo:
    name: str
    namespace: str
    node: str
    netns: str
    container_id: str
    addresses: list[str] = field(default_factory=list)  # CIDRs from the CNI result

    @property
    def ip(self) -> str:
        """The pod's first IPv4 address (what the matrix probes)."""
        return next(a.split("/")[0] for a in self.addresses if ":" not in a)


@dataclass
class Cluster:
    """What ``cluster.json`` holds."""

    name: str
    mode: str
    etcd_members: int
    etcd: dict[str, str]  # ETCD_ENDPOINTS and ETCD_CA_CERT_FILE; certificates are per node
    nodes: list[NodeInfo] = field(default_factory=list)
    pods: list[PodInfo] = field(default_factory=list)
    bgp_speaker: bool = False  # whether felix-agent runs a BGP speaker (it shows sessions)
    complete: bool = False  # set when ``up`` finished

    @property
    def bgp_note(self) -> str:
        """Why there are no BGP sessions to show ("" when there should be)."""
        if not self.mode.startswith("bgp"):
            return f"n/a: {self.mode} mode does not use BGP"
        if not self.bgp_speaker:
            return "BGP not available: felix-agent has no BGP speaker yet; the agents route pod blocks directly"
        return ""

    @property
    def work_dir(self) -> Path:
        return STATE_ROOT / self.name

    def save(self) -> None:
        path = self.work_dir / STATE_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, name: str) -> Cluster:
        work_dir = STATE_ROOT / name
        try:
            doc = json.loads((work_dir / STATE_FILE).read_text())
            return cls(**{**doc, "nodes": [NodeInfo(**n) for n in doc["nodes"]],
                          "pods": [PodInfo(**p) for p in doc["pods"]]})
        except FileNotFoundError:
            if work_dir.exists():
                raise LabError(f"lab {name!r} was not fully built (its 'lab up' stopped early): "
                               f"take it down with 'netctl lab down --name {name}'") from None
            raise LabError(f"there is no lab named {name!r}: start one with 'netctl lab up --name {name}'") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LabError(f"{work_dir / STATE_FILE} is unreadable ({e}): "
                           f"take the lab down with 'netctl lab down --name {name}'") from None

    def node(self, name: str) -> NodeInfo:
        found = next((n for n in self.nodes if n.name == name), None)
        if found is None:
            raise LabError(f"lab {self.name!r} has no node {name!r} (nodes: {', '.join(n.name for n in self.nodes)})")
        return found

    def pod(self, name: str) -> PodInfo:
        found = next((p for p in self.pods if p.name == name), None)
        if found is None:
            raise LabError(f"lab {self.name!r} has no pod {name!r} (pods: {', '.join(p.name for p in self.pods)})")
        return found

    def target(self, name: str) -> tuple[str, dict[str, str]]:
        """The namespace of node or pod ``name`` and the environment for a command there: on a node,
        the node's datastore settings, its NODENAME, and this environment's scripts (``netctl``)."""
        if any(n.name == name for n in self.nodes):
            path = f"{BIN}:{os.environ.get('PATH', ip_netns.DEFAULT_PATH)}"
            return self.node(name).netns, clean_env(self.env(name) | {"NODENAME": name, "PATH": path})
        if any(p.name == name for p in self.pods):
            return self.pod(name).netns, clean_env()
        raise LabError(f"lab {self.name!r} has no node or pod {name!r} (nodes: {', '.join(n.name for n in self.nodes)};"
                       f" pods: {', '.join(p.name for p in self.pods)})")

    def env(self, node: str) -> dict[str, str]:
        """The datastore settings (calicoctl's variables) for node ``node``'s certificate."""
        n = self.node(node)
        return {**self.etcd, "ETCD_CERT_FILE": n.cert, "ETCD_KEY_FILE": n.key}

    def netctl(self, *args: str, node: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``netctl ARGS`` inside a node's namespace (the first by default) with its datastore settings."""
        n = self.node(node) if node else self.nodes[0]
        return subprocess.run(ip_netns.exec_argv(n.netns, [str(BIN / "netctl"), *args]), capture_output=True,
                              text=True, env=clean_env() | self.env(n.name), timeout=timeout)


def up(name: str, nodes: int = 3, mode: str = "vxlan", etcd: int = 1, pods_per_node: int = 2,
       progress: Progress | None = None, namespaces: tuple[str, ...] = (NAMESPACE,),
       wireguard: bool = False) -> Cluster:
    """Build lab ``name`` and leave it running; on failure (or Ctrl-C) take down what was built."""
    report = progress or (lambda phase, done, total, note: None)
    if mode not in MODES:
        raise LabError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if etcd not in (1, 3):
        raise LabError(f"--etcd takes 1 or 3 members, not {etcd}")
    if not 0 <= pods_per_node <= 50:
        raise LabError(f"--pods-per-node takes 0 to 50, not {pods_per_node}")
    if mode == "ipip" and not ipip_available():
        raise LabError(f"--mode ipip needs the kernel's ipip module, which this kernel ({os.uname().release}) "
                       f"does not have; run it inside the VM, which has it: {IPIP_VM} '{BIN / 'netctl'} lab up "
                       f"--mode ipip && {BIN / 'netctl'} lab matrix && {BIN / 'netctl'} lab down'")
    if wireguard and not wireguard_available():
        raise LabError(f"--wireguard needs the kernel's wireguard module, which this kernel ({os.uname().release}) "
                       f"does not have; run it inside the VM, which has it: {IPIP_VM} '{BIN / 'netctl'} lab up "
                       f"--wireguard && {BIN / 'netctl'} lab matrix && {BIN / 'netctl'} lab down'")
    lab = Lab(name, nodes=nodes, etcd_members=etcd)
    report("etcd", 0, 1, f"fabric, {etcd} member(s) with mutual TLS")
    lab.create()
    try:
        report("etcd", 1, 1, f"fabric, {etcd} member(s) with mutual TLS")
        env = lab.etcd_env()
        cluster = Cluster(name, mode, etcd, {k: env[k] for k in ("ETCD_ENDPOINTS", "ETCD_CA_CERT_FILE")},
                          bgp_speaker=mode.startswith("bgp") and bgp_speaker_available())
        _issue_certificates(lab, cluster, Path(env["ETCD_CA_CERT_FILE"]), report)
        wireguard_doc = ("---\napiVersion: tortie.dev/v1\nkind: FelixConfiguration\nmetadata: {name: default}\n"
                         "spec: {wireguardEnabled: true}\n") if wireguard else ""
        (cluster.work_dir / "resources.yaml").write_text(resources(cluster) + wireguard_doc)
        done = cluster.netctl("apply", "-f", str(cluster.work_dir / "resources.yaml"))
        if done.returncode != 0:
            raise LabError(f"netctl apply of the lab's resources failed: {done.stderr.strip()}")
        _start_agents(lab, cluster, report)
        _wait_bgp(cluster, report)
        _add_pods(lab, cluster, pods_per_node, report, namespaces)
        cluster.complete = True
        cluster.save()
    except BaseException:
        lab.destroy()
        raise
    # The lab outlives this process: drop the exit-time teardown that Lab and EtcdServer arranged.
    atexit.unregister(lab.destroy)
    if isinstance(lab.etcd, EtcdServer):
        atexit.unregister(lab.etcd.stop)
    return cluster


def _issue_certificates(lab: Lab, cluster: Cluster, ca_cert: Path, report: Progress) -> None:
    """One client certificate per node, signed by the lab's etcd CA, for its agent and plugins."""
    pki_dir = cluster.work_dir / "pki"
    total = len(lab.nodes)
    report("certificates", 0, total, "a client certificate per node")
    for k, node in enumerate(lab.nodes, 1):
        cert, key = pki.issue(pki_dir, node.name, ca_cert=ca_cert, ca_key=ca_cert.with_name("ca-key.pem"),
                              profile="client", cn=node.name)
        cluster.nodes.append(NodeInfo(node.name, node.netns, node.address, str(cert), str(key),
                                      str(cluster.work_dir / "nodes" / node.name)))
        report("certificates", k, total, "a client certificate per node")
    cluster.save()


def resources(cluster: Cluster) -> str:
    """The mode's default pool, the Node resources and, for BGP modes, the BGP configuration (YAML)."""
    ipip, vxlan = {"vxlan": ("Never", "Always"), "ipip": ("Always", "Never")}.get(cluster.mode, ("Never", "Never"))
    docs = [f"kind: IPPool\nmetadata: {{name: {POOL}}}\n"
            f"spec: {{cidr: {POOL_CIDR}, blockSize: {BLOCK_SIZE}, ipipMode: {ipip}, vxlanMode: {vxlan}, "
            f"natOutgoing: true}}\n"]
    rr = cluster.mode == "bgp-rr"
    for k, node in enumerate(cluster.nodes):
        reflector = rr and k == 0
        labels = f", labels: {{{RR_LABEL}: 'true'}}" if reflector else ""
        cluster_id = f", routeReflectorClusterID: {RR_CLUSTER_ID}" if reflector else ""
        docs.append(f"kind: Node\nmetadata: {{name: {node.name}{labels}}}\n"
                    f"spec: {{bgp: {{ipv4Address: {node.address}/{UNDERLAY_LEN}{cluster_id}}}}}\n")
    if cluster.mode.startswith("bgp"):
        docs.append(f"kind: BGPConfiguration\nmetadata: {{name: default}}\n"
                    f"spec: {{asNumber: {AS_NUMBER}, nodeToNodeMeshEnabled: {str(not rr).lower()}}}\n")
    if rr:
        docs.append(f"kind: BGPPeer\nmetadata: {{name: peer-with-route-reflectors}}\n"
                    f"spec: {{nodeSelector: all(), peerSelector: {RR_LABEL} == 'true'}}\n")
    return "---\n".join("apiVersion: tortie.dev/v1\n" + doc for doc in docs)


def agent_argv(cluster: Cluster, node: NodeInfo) -> list[str]:
    """The felix-agent command line of ``node`` (``up`` and ``restart_agent`` give it the same)."""
    return agent.agent_argv(node.name, node.address, cni_socket=node.cni_socket, state_dir=node.state_dir,
                            extra=["--bgp"] if cluster.bgp_speaker else [])


def _start_agents(lab: Lab, cluster: Cluster, report: Progress) -> None:
    """A felix-agent per node, all started at once; then wait until every one is ready."""
    report("nodes", 0, len(cluster.nodes), "felix-agent ready")
    for k, node in enumerate(cluster.nodes, 1):
        Path(node.state_dir).mkdir(parents=True, exist_ok=True)
        node.agent_pid = lab.start_process(lab.node(k).netns, agent_argv(cluster, node), node.agent_log,
                                           cluster.env(node.name))
        node.agent_started = ip_netns.start_time(node.agent_pid)
    cluster.save()
    _wait_ready(cluster.nodes, report)


def _wait_ready(nodes: list[NodeInfo], report: Progress) -> None:
    """Until every node's agent answers ``/readiness`` with 200; LabError when one exits or is late."""
    total = len(nodes)
    deadline = time.monotonic() + AGENT_READY_TIMEOUT
    waiting = list(nodes)
    while waiting:
        for node in list(waiting):
            if not node.agent_running():
                raise LabError(f"felix-agent of node {node.name} exited while starting: {_last_line(node.agent_log)}")
            if readiness(node) == 200:
                waiting.remove(node)
                report("nodes", total - len(waiting), total, "felix-agent ready")
        if waiting and time.monotonic() > deadline:
            raise LabError(f"felix-agent of node {waiting[0].name} not ready after {AGENT_READY_TIMEOUT:g} s: "
                           f"{_last_line(waiting[0].agent_log)}")
        time.sleep(0.1)


def stop_agent(name: str, node: str) -> int | None:
    """Stop the felix-agent of ``node`` in lab ``name`` by its PID (SIGTERM, on which the agent
    leaves the dataplane in place; SIGKILL after a grace); return that PID, None when none ran."""
    cluster = Cluster.load(name)
    pid = _stop_agent(cluster, cluster.node(node))
    cluster.save()
    return pid


def _stop_agent(cluster: Cluster, node: NodeInfo) -> int | None:
    pid = node.agent_process()
    if pid is not None:
        ip_netns.stop([(pid, ip_netns.start_time(pid))])
        forget_process(cluster.name, pid)
    node.agent_pid = node.agent_started = None
    return pid


def restart_agent(name: str, node: str, progress: Progress | None = None) -> int:
    """Stop the felix-agent of ``node`` when one runs, start it again with the command line ``up``
    gave it, and wait until it is ready; return its PID. An agent that does not become ready is
    stopped again."""
    report = progress or (lambda phase, done, total, note: None)
    cluster = Cluster.load(name)
    info = cluster.node(node)
    if info.netns not in ip_netns.names():
        raise LabError(f"the namespace {info.netns} of node {node} is gone: 'netctl lab down --name {name}'")
    _stop_agent(cluster, info)
    argv = agent_argv(cluster, info)
    proc = ip_netns.spawn(info.netns, argv, info.agent_log, cluster.env(info.name))
    try:
        record_process(name, proc.pid, info.netns, argv)
        info.agent_pid, info.agent_started = proc.pid, ip_netns.start_time(proc.pid)
        cluster.save()
        report("nodes", 0, 1, "felix-agent ready")
        _wait_ready([info], report)
    except BaseException:
        ip_netns.stop([(proc.pid, None if proc.poll() is None else info.agent_started)])
        forget_process(name, proc.pid)
        info.agent_pid = info.agent_started = None
        cluster.save()
        raise
    return proc.pid


def _wait_bgp(cluster: Cluster, report: Progress) -> None:
    if cluster.bgp_note:
        report("bgp sessions", 0, 0, cluster.bgp_note)
        return
    n = len(cluster.nodes)
    # Full mesh: every node peers with every other; with a reflector (node 1), the others peer with it only.
    expected = n * (n - 1) if cluster.mode == "bgp" else 2 * (n - 1)
    report("bgp sessions", 0, expected, "Established")
    deadline = time.monotonic() + BGP_TIMEOUT
    while True:
        up_count = sum(s["state"] == "Established" for node in cluster.nodes for s in bgp_sessions(cluster, node.name))
        report("bgp sessions", min(up_count, expected), expected, "Established")
        if up_count >= expected:
            return
        if time.monotonic() > deadline:
            raise LabError(f"only {up_count} of {expected} BGP sessions Established after {BGP_TIMEOUT:g} s "
                           f"(see 'netctl lab exec n1 -- netctl node status')")
        time.sleep(0.5)


def _add_pods(lab: Lab, cluster: Cluster, per_node: int, report: Progress,
              namespaces: tuple[str, ...] = (NAMESPACE,)) -> None:
    """Pods spread over the nodes, and over ``namespaces`` in turn (pod1 in the first, ...)."""
    bin_dir = cluster.work_dir / "cni" / "bin"
    bin_dir.mkdir(parents=True)
    for plugin in ("tortie", "tortie-ipam"):
        (bin_dir / plugin).symlink_to(BIN / plugin)
    total = per_node * len(cluster.nodes)
    report("pods", 0, total, "through the tortie CNI plugin")
    for k, node in enumerate(cluster.nodes, 1):
        for j in range(1, per_node + 1):
            index = (k - 1) * per_node + j
            name, namespace = f"pod{index}", namespaces[(index - 1) % len(namespaces)]
            try:
                pod = lab.add_pod(k, name, conflist(cluster, node), namespace=namespace,
                                  cni_path=[bin_dir, REFERENCE_PLUGINS])
            except PodError as e:
                raise LabError(f"{e} (agent log: {_last_line(node.agent_log)})") from None
            cluster.pods.append(PodInfo(name, namespace, node.name, pod.netns, pod.container_id, pod.addresses))
            cluster.save()
            report("pods", len(cluster.pods), total, "through the tortie CNI plugin")


def conflist(cluster: Cluster, node: NodeInfo) -> dict[str, Any]:
    """The node's CNI network configuration (CONTRACT.md), as a runtime on it would have it."""
    env = cluster.env(node.name)
    return {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [{
        "type": "tortie", "nodename": node.name,
        "etcd_endpoints": env["ETCD_ENDPOINTS"], "etcd_ca_cert_file": env["ETCD_CA_CERT_FILE"],
        "etcd_cert_file": env["ETCD_CERT_FILE"], "etcd_key_file": env["ETCD_KEY_FILE"],
        "agent_socket": str(node.cni_socket),
        "ipam": {"type": "tortie-ipam", "assign_ipv4": "true", "assign_ipv6": "false", "ipv4_pools": [POOL]}}]}


# -- looking at a running lab -------------------------------------------------------------------


def status(name: str) -> dict[str, Any]:
    """Nodes and their agents' readiness, BGP sessions, pools and their usage, pods (JSON-able)."""
    cluster = Cluster.load(name)
    nodes = []
    for n in cluster.nodes:
        pid = n.agent_process()  # the true state: also an agent restarted by hand, none after a kill
        nodes.append({"name": n.name, "address": n.address, "netns": n.netns, "agentPid": pid,
                      "agentRunning": pid is not None, "ready": pid is not None and readiness(n) == 200})
    done = cluster.netctl("ipam", "show", "-o", "json")
    try:
        pools, pools_error = list(json.loads(done.stdout)["pools"]), ""
    except (ValueError, KeyError, TypeError):
        pools, pools_error = [], done.stderr.strip() or "netctl ipam show printed nothing"
    bgp: dict[str, Any] = {"available": cluster.bgp_speaker, "note": cluster.bgp_note, "sessions": {}}
    if cluster.mode.startswith("bgp") and cluster.bgp_speaker:
        bgp["sessions"] = {n.name: bgp_sessions(cluster, n.name) for n in cluster.nodes}
    return {"name": cluster.name, "mode": cluster.mode, "complete": cluster.complete,
            "etcd": {"members": cluster.etcd_members, "endpoints": cluster.etcd["ETCD_ENDPOINTS"].split(",")},
            "nodes": nodes, "bgp": bgp, "pools": pools, "poolsError": pools_error,
            "pods": [asdict(p) for p in cluster.pods], "workDir": str(cluster.work_dir)}


def bgp_sessions(cluster: Cluster, node: str) -> list[dict[str, str]]:
    """``netctl node status -o json``'s peers for ``node`` (none when its agent reports nothing)."""
    done = cluster.netctl("node", "status", "--node", node, "-o", "json")
    try:
        return list(json.loads(done.stdout).get("peers", []))
    except (ValueError, AttributeError):
        return []


def readiness(node: NodeInfo, timeout: float = 1.0) -> int:
    """The HTTP status of the node's agent's ``/readiness`` (0 when nothing answers), asked from
    inside the node's namespace."""
    from kernel.netns import netns

    try:
        with netns(str(ip_netns.path(node.netns))):
            conn = http.client.HTTPConnection("127.0.0.1", 9099, timeout=timeout)
            try:
                conn.request("GET", "/readiness")
                return conn.getresponse().status
            finally:
                conn.close()
    except (OSError, http.client.HTTPException):
        return 0


def down(name: str) -> Teardown:
    """Remove lab ``name``: its processes, namespaces (and so every interface in them) and files."""
    report = destroy_by_name(name)
    work_dir = STATE_ROOT / name
    if work_dir.exists():  # the lab's own directory, left when lab.json was missing or unreadable
        shutil.rmtree(work_dir)
    left = [ns for ns in ip_netns.names() if ns in report.namespaces]
    if left:
        raise LabError(f"could not delete the namespaces {', '.join(left)}")
    return report


# -- helpers ------------------------------------------------------------------------------------


def ipip_available() -> bool:
    """Whether this kernel has the ipip module (loaded, or loadable: ``modprobe -n`` only checks)."""
    if Path("/sys/module/ipip").exists():
        return True
    with contextlib.suppress(OSError):
        return subprocess.run(["modprobe", "-n", "ipip"], capture_output=True).returncode == 0
    return False


def wireguard_available() -> bool:
    """Whether this kernel has the wireguard module (loaded, or loadable)."""
    if Path("/sys/module/wireguard").exists():
        return True
    with contextlib.suppress(OSError):
        return subprocess.run(["modprobe", "-n", "wireguard"], capture_output=True).returncode == 0
    return False


def bgp_speaker_available() -> bool:
    """Whether felix-agent can run a BGP speaker (``--bgp``, since the speaker was integrated)."""
    try:
        done = subprocess.run([str(BIN / "felix-agent"), "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--bgp" in done.stdout


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without datastore settings (a lab sets its own) and without proxy
    variables (gRPC honours them, and no proxy is reachable from inside a lab)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("ETCD_", "ETCDCTL_")) and k.lower() not in _PROXY_VARIABLES} | dict(extra or {})


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][-300:] if lines else "empty log"
