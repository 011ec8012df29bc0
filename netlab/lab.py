"""Multi-node labs on one machine: a fabric bridge, node and etcd namespaces, pods made through
real CNI plugins, and the processes the tests and `netctl lab` run inside them.

A lab named NAME owns the namespaces `NAME-fabric`, `NAME-etcdK`, `NAME-nK` and `NAME-pHHHHHHHH`
(pods) and the directory `/run/tortie-lab/NAME` (or the one it is given). The underlay is
198.18.0.0/24 (inside the benchmarking range 198.18.0.0/15): etcd members from .2, nodes from .11.
Every namespace and process is written to `lab.json` before or as it is made, so `destroy()`, the
`atexit` safety net or, after a crash, `destroy_by_name()` can take it all down again. Must not
change the root namespace, send traffic out of its own namespaces, or stop a process it did not
start. Over 450 lines because `EtcdCluster` lives beside `Lab`: its members are the lab's recorded
processes in the lab's namespaces, started and stopped through it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from netlab import netns as ip_netns
from netlab.cni import Attachment, PluginRun, exec_plugin, network_config
from netlab.etcd import ETCD, ETCDCTL, EtcdServer, make_pki

STATE_ROOT = Path("/run/tortie-lab")
STATE_FILE = "lab.json"
BRIDGE = "br0"
UNDERLAY_PREFIX = "198.18.0."
UNDERLAY_LEN = 24
GATEWAY = UNDERLAY_PREFIX + "1"  # the fabric bridge's own address: the nodes' default route
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_START_TIMEOUT = 20.0
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,11}")
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_proxy"}


class LabError(RuntimeError):
    """The lab could not be built or used as asked; the message says what to do about it."""


class PodError(LabError):
    """A CNI plugin failed for a pod; `code` is the CNI error code when the plugin gave one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LabNode:
    name: str
    netns: str
    address: str  # on eth0, prefix length UNDERLAY_LEN


@dataclass
class Pod:
    """One attachment, kept as a runtime keeps it between ADD and DEL."""

    name: str
    node: LabNode
    netns: str
    container_id: str
    namespace: str
    attachment: Attachment = field(repr=False)
    conflist: Mapping[str, Any] = field(repr=False)
    cni_path: tuple[Path, ...] = field(repr=False)
    result: dict[str, Any] = field(default_factory=dict)  # the final ADD result
    addresses: list[str] = field(default_factory=list)  # CIDRs from the result, e.g. 10.1.0.5/24

    @property
    def ips(self) -> list[str]:
        """The addresses without their prefix length (what one pings)."""
        return [cidr.split("/")[0] for cidr in self.addresses]


@dataclass
class _Process:
    pid: int
    started: int | None  # start time, so that a reused PID is never signalled
    netns: str
    argv: list[str]


@dataclass
class _State:
    """What `lab.json` holds: enough to tear the lab down without its Python object."""

    name: str
    namespaces: list[str] = field(default_factory=list)
    processes: list[_Process] = field(default_factory=list)

    def save(self, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(work_dir / STATE_FILE, json.dumps(asdict(self), indent=1) + "\n")
        _write_atomic(work_dir / "pids", "".join(f"{p.pid}\n" for p in self.processes))

    @classmethod
    def load(cls, work_dir: Path) -> _State | None:
        try:
            doc = json.loads((work_dir / STATE_FILE).read_text())
            return cls(doc["name"], list(doc["namespaces"]), [_Process(**p) for p in doc["processes"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass
class Teardown:
    """What a teardown found and removed."""

    namespaces: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)


class Lab:
    """A fabric bridge with `nodes` node namespaces and `etcd_members` (0, 1 or 3) etcd members."""

    def __init__(self, name: str, work_dir: Path | None = None, *, nodes: int = 3, etcd_members: int = 1) -> None:
        _check_name(name)
        if not 1 <= nodes <= 200:
            raise LabError(f"a lab has 1 to 200 nodes, not {nodes}")
        if etcd_members not in (0, 1, 3, 5):
            raise LabError(f"a lab has 0, 1, 3 or 5 etcd members, not {etcd_members}")
        self.name = name
        self.work_dir = Path(work_dir) if work_dir else STATE_ROOT / name
        self.fabric = f"{name}-fabric"
        self.nodes = [LabNode(f"n{k}", f"{name}-n{k}", f"{UNDERLAY_PREFIX}{10 + k}") for k in range(1, nodes + 1)]
        self.etcd_members = [LabNode(f"etcd{k}", f"{name}-etcd{k}", f"{UNDERLAY_PREFIX}{1 + k}")
                           for k in range(1, etcd_members + 1)]
        self.etcd: EtcdServer | EtcdCluster | None = None
        self.pods: dict[str, Pod] = {}  # by container ID
        self._state = _State(name)
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._claimed = False  # set once create() has checked that nothing of this name exists

    # -- building -------------------------------------------------------------------------------

    def create(self) -> Lab:
        """Build the fabric, the etcd members and the nodes; on any failure tear down what was made."""
        existing = _own_namespaces(self.name)
        if existing or (self.work_dir / STATE_FILE).exists():
            raise LabError(f"lab {self.name!r} already exists ({', '.join(existing) or self.work_dir}): "
                           f"tear it down with 'netctl lab down --name {self.name}'")
        if self.work_dir.exists() and any(self.work_dir.iterdir()):
            raise LabError(f"work directory {self.work_dir} is not empty: give an empty or new one")
        self._claimed = True
        atexit.register(self.destroy)
        try:
            self._state.save(self.work_dir)
            self._add_netns(self.fabric)
            ip_netns.sysctl(self.fabric, **{"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.forwarding": "0"})
            ip_netns.add_bridge(self.fabric, BRIDGE)
            # The fabric is the nodes' upstream router (it does not forward): hosts have a default
            # route, and proxy ARP for a pod's 169.254.1.1 gateway only answers when one exists.
            ip_netns.add_address(self.fabric, BRIDGE, f"{GATEWAY}/{UNDERLAY_LEN}")
            for k, member in enumerate(self.etcd_members, 1):
                self._plug(member, f"e{k}")
            for k, node in enumerate(self.nodes, 1):
                self._plug(node, f"v{k}")
                ip_netns.sysctl(node.netns, **{"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
                ip_netns.ip("-n", node.netns, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
            self._start_etcd()
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        self._state.namespaces.append(name)  # recorded first: a crash right after still finds it
        self._state.save(self.work_dir)
        ip_netns.add(name)

    def _plug(self, node: LabNode, fabric_link: str) -> None:
        """A namespace for `node` with eth0 on the fabric bridge (`fabric_link` is the bridge port)."""
        self._add_netns(node.netns)
        ip_netns.add_veth(self.fabric, fabric_link, node.netns, "eth0")
        ip_netns.attach(self.fabric, fabric_link, BRIDGE)
        ip_netns.add_address(node.netns, "eth0", f"{node.address}/{UNDERLAY_LEN}")

    def _start_etcd(self) -> None:
        if len(self.etcd_members) == 1:
            member = self.etcd_members[0]
            server = EtcdServer(self.work_dir / member.name, name=member.name, host=member.address,
                                client_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT, netns=member.netns)
            self.etcd = server
            server.start(ETCD_START_TIMEOUT)
            assert server.pid is not None
            self._record(server.pid, member.netns, [str(ETCD)])
        elif self.etcd_members:
            self.etcd = EtcdCluster(self, self.etcd_members, self.work_dir / "etcd")
            self.etcd.start()

    # -- using ----------------------------------------------------------------------------------

    def node(self, k: int) -> LabNode:
        """Node `k`, counting from 1."""
        if not 1 <= k <= len(self.nodes):
            raise LabError(f"lab {self.name!r} has nodes 1 to {len(self.nodes)}, not {k}")
        return self.nodes[k - 1]

    def node_ip(self, k: int) -> str:
        return self.node(k).address

    def etcd_env(self) -> dict[str, str]:
        """ETCD_ENDPOINTS (every member) and the client certificate, valid in any node namespace."""
        if self.etcd is None:
            raise LabError(f"lab {self.name!r} has no etcd: create it with etcd_members=1 or 3")
        return self.etcd.env()

    def exec(self, netns: str, *argv: str, check: bool = True,
             timeout: float | None = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside one of this lab's namespaces and return its output."""
        self._check_own(netns)
        return subprocess.run(ip_netns.exec_argv(netns, argv), capture_output=True, text=True,
                              check=check, timeout=timeout)

    def ping(self, from_netns: str, address: str, count: int = 1, timeout: float = 2) -> bool:
        """Whether `count` echo requests from `from_netns` to `address` are all answered."""
        done = self.exec(from_netns, "ping", "-q", "-n", "-i", "0.2", "-c", str(count), "-W", f"{timeout:g}",
                         address, check=False, timeout=count * 0.2 + timeout + 5)
        return done.returncode == 0

    # -- processes ------------------------------------------------------------------------------

    def start_process(self, netns: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> int:
        """Start a long-running `argv` inside one of this lab's namespaces; return its PID."""
        self._check_own(netns)
        proc = ip_netns.spawn(netns, argv, log_path, env)
        self._children[proc.pid] = proc
        self._record(proc.pid, netns, list(argv))
        return proc.pid

    def stop_process(self, pid: int) -> None:
        """SIGTERM a process this lab started, SIGKILL it after 5 s; gone already is fine."""
        record = next((p for p in self._state.processes if p.pid == pid), None)
        if record is None:
            raise LabError(f"process {pid} was not started by lab {self.name!r}: not stopping it")
        child = self._children.pop(pid, None)
        # An unreaped child cannot have its PID reused, so it needs no start-time check.
        ip_netns.stop([(pid, None if child is not None and child.poll() is None else record.started)])
        if child is not None:
            child.poll()
        self._state.processes.remove(record)
        self._state.save(self.work_dir)

    def process_running(self, pid: int) -> bool:
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        return any(p.pid == pid and ip_netns.start_time(pid) == p.started for p in self._state.processes)

    def _record(self, pid: int, netns: str, argv: list[str]) -> None:
        self._state.processes.append(_Process(pid, ip_netns.start_time(pid), netns, argv))
        self._state.save(self.work_dir)

    def _check_own(self, netns: str) -> None:
        if netns not in self._state.namespaces:
            raise LabError(f"{netns!r} is not a namespace of lab {self.name!r}")

    # -- pods -----------------------------------------------------------------------------------

    def add_pod(self, node: int, name: str, conflist: Mapping[str, Any], *, namespace: str = "default",
                cni_path: Sequence[Path], labels: Mapping[str, str] | None = None) -> Pod:
        """Create a pod namespace and run the conflist's plugins on it from node `node`'s namespace,
        as a runtime does; on failure run DEL in reverse, remove the namespace and raise PodError."""
        container_id = secrets.token_hex(32)
        pod_netns = f"{self.name}-p{container_id[:8]}"
        cni_args = {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": name,
                    "K8S_POD_INFRA_CONTAINER_ID": container_id}
        if labels:
            conflist = {**conflist, "plugins": [_with_labels(p, labels) for p in conflist["plugins"]]}
        pod = Pod(name, self.node(node), pod_netns, container_id, namespace,
                  Attachment(container_id, str(ip_netns.path(pod_netns)), "eth0", cni_args),
                  conflist, tuple(Path(p) for p in cni_path))
        self.pods[container_id] = pod
        try:
            self._add_netns(pod_netns)
            result: dict[str, Any] = {}
            for index in range(len(conflist["plugins"])):
                run = self._run_plugin(pod, index, "ADD", result or None)
                if not run.ok:
                    raise _plugin_error(pod, index, "ADD", run)
                result = run.output or {}
        except BaseException:
            # As a runtime does: DEL every plugin, newest first, without a result to go by.
            for index in reversed(range(len(conflist["plugins"]))):
                with contextlib.suppress(PodError, OSError, subprocess.TimeoutExpired):
                    self._run_plugin(pod, index, "DEL", None)
            self._forget(pod)
            raise
        pod.result = result
        pod.addresses = [ip["address"] for ip in result.get("ips", [])]
        return pod

    def delete_pod(self, pod: Pod) -> None:
        """DEL in reverse order with the final ADD result as prevResult, then remove the namespace.
        A failing DEL raises PodError and keeps the pod, so that it can be retried."""
        for index in reversed(range(len(pod.conflist["plugins"]))):
            run = self._run_plugin(pod, index, "DEL", pod.result)
            if not run.ok:
                raise _plugin_error(pod, index, "DEL", run)
        self._forget(pod)

    def _run_plugin(self, pod: Pod, index: int, command: str, prev_result: Mapping[str, Any] | None) -> PluginRun:
        kind = str(pod.conflist["plugins"][index]["type"])
        binary = next((d / kind for d in pod.cni_path if (d / kind).is_file()), None)
        if binary is None:
            dirs = ":".join(map(str, pod.cni_path))
            raise PodError(f"CNI plugin {kind!r} is not in the CNI path {dirs}", code=None)
        config = network_config(pod.conflist, index, prev_result=prev_result)
        return exec_plugin(binary, command, config, pod.attachment, cni_path=pod.cni_path, in_netns=pod.node.netns)

    def _forget(self, pod: Pod) -> None:
        ip_netns.delete(pod.netns)
        self.pods.pop(pod.container_id, None)
        if pod.netns in self._state.namespaces:
            self._state.namespaces.remove(pod.netns)
            self._state.save(self.work_dir)

    # -- tearing down ---------------------------------------------------------------------------

    def destroy(self) -> Teardown:
        """Stop every process, delete every namespace, remove the work directory. Idempotent."""
        if not self._claimed:
            return Teardown()
        if isinstance(self.etcd, EtcdServer):
            self.etcd.stop()  # reaps its child; its record below is then already gone
        recorded = [p.pid for p in self._state.processes]
        for pid in recorded:
            with contextlib.suppress(ip_netns.NetnsError):
                self.stop_process(pid)
        report = _teardown(self.name, self._state)
        report.pids[:0] = recorded
        self.pods.clear()
        self._state = _State(self.name)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self._claimed = False
        atexit.unregister(self.destroy)  # only now: an interrupted destroy runs again at exit
        return report

    def __enter__(self) -> Lab:
        return self.create()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()


class EtcdCluster:
    """An etcd cluster of several members, one per namespace, with mutual TLS between peers and
    for clients. (`EtcdServer` starts a single-member cluster only.) Its processes are the lab's,
    started and stopped through it."""

    def __init__(self, lab: Lab, members: Sequence[LabNode], work_dir: Path) -> None:
        self.lab = lab
        self.members = list(members)
        self.work_dir = work_dir
        self.pki_dir = work_dir / "pki"
        self.ca_cert = self.pki_dir / "ca.pem"
        self.client_cert = self.pki_dir / "client.pem"
        self.client_key = self.pki_dir / "client-key.pem"
        self.pids: dict[int, int] = {}  # member index (from 1) → PID

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{m.address}:{ETCD_CLIENT_PORT}" for m in self.members]

    def env(self) -> dict[str, str]:
        return {"ETCD_ENDPOINTS": ",".join(self.endpoints), "ETCD_CA_CERT_FILE": str(self.ca_cert),
                "ETCD_CERT_FILE": str(self.client_cert), "ETCD_KEY_FILE": str(self.client_key)}

    def start(self, timeout: float = ETCD_START_TIMEOUT) -> None:
        """Start every member at once (a new cluster needs a quorum to become healthy) and wait."""
        self._make_pki()
        for k in range(1, len(self.members) + 1):
            self.start_member(k, wait=False)
        self.wait_healthy(self.endpoints, timeout)

    def start_member(self, k: int, *, wait: bool = True) -> None:
        """(Re)start member `k`; a restart rejoins with the data it has."""
        member = self.members[k - 1]
        if k in self.pids and self.lab.process_running(self.pids[k]):
            return
        self.pids[k] = self.lab.start_process(member.netns, [str(ETCD), *self._flags(member)],
                                              self.work_dir / f"{member.name}.log", _clean_env())
        if wait:
            self.wait_healthy([self.endpoints[k - 1]], ETCD_START_TIMEOUT)

    def stop_member(self, k: int) -> None:
        pid = self.pids.pop(k, None)
        if pid is not None:
            self.lab.stop_process(pid)

    def etcdctl(self, *args: str, endpoints: Sequence[str] | None = None, timeout: float = 10.0) -> str:
        """Run `etcdctl ARGS` as the lab's client, from the first member's namespace."""
        argv = [str(ETCDCTL), f"--endpoints={','.join(endpoints or self.endpoints)}", "--dial-timeout=2s",
                f"--command-timeout={max(1, int(timeout) - 2)}s", f"--cacert={self.ca_cert}",
                f"--cert={self.client_cert}", f"--key={self.client_key}", *args]
        done = subprocess.run(ip_netns.exec_argv(self.members[0].netns, argv), capture_output=True, text=True,
                              env=_clean_env() | {"ETCDCTL_API": "3"}, timeout=timeout + 2)
        if done.returncode != 0:
            raise LabError(f"etcdctl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def wait_healthy(self, endpoints: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for k, pid in self.pids.items():
                if not self.lab.process_running(pid):
                    log = self.work_dir / f"{self.members[k - 1].name}.log"
                    raise LabError(f"etcd member {k} exited while starting; see {log}")
            try:
                self.etcdctl("endpoint", "health", endpoints=endpoints, timeout=3.0)
                return
            except (LabError, subprocess.TimeoutExpired) as e:
                if time.monotonic() > deadline:
                    raise LabError(f"etcd cluster not healthy after {timeout:.0f} s: {e}") from None
            time.sleep(0.1)

    def _flags(self, member: LabNode) -> list[str]:
        cert, key = self.pki_dir / f"{member.name}.pem", self.pki_dir / f"{member.name}-key.pem"
        client_url = f"https://{member.address}:{ETCD_CLIENT_PORT}"
        peer_url = f"https://{member.address}:{ETCD_PEER_PORT}"
        cluster = ",".join(f"{m.name}=https://{m.address}:{ETCD_PEER_PORT}" for m in self.members)
        return [f"--name={member.name}", f"--data-dir={self.work_dir / (member.name + '.data')}",
                f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster={cluster}", "--initial-cluster-state=new",
                f"--initial-cluster-token={self.lab.name}-etcd", "--logger=zap", "--log-outputs=stderr",
                "--client-cert-auth", f"--trusted-ca-file={self.ca_cert}", f"--cert-file={cert}",
                f"--key-file={key}", "--peer-client-cert-auth", f"--peer-trusted-ca-file={self.ca_cert}",
                f"--peer-cert-file={cert}", f"--peer-key-file={key}"]

    def _make_pki(self) -> None:
        make_pki(self.pki_dir, f"{self.lab.name}-etcd-ca",
                 {m.name: (m.name, [m.address, "127.0.0.1"]) for m in self.members})


def record_process(name: str, pid: int, netns: str, argv: Sequence[str], state_root: Path = STATE_ROOT) -> None:
    """Add a process started without the lab's Python object (`netctl lab restart`) to lab `name`'s
    record, so that its teardown stops it like the ones the lab started itself."""
    state = _State.load(state_root / name)
    if state is None:
        raise LabError(f"lab {name!r} has no readable {state_root / name / STATE_FILE}")
    if netns not in state.namespaces:
        raise LabError(f"{netns!r} is not a namespace of lab {name!r}")
    state.processes.append(_Process(pid, ip_netns.start_time(pid), netns, list(argv)))
    state.save(state_root / name)


def forget_process(name: str, pid: int, state_root: Path = STATE_ROOT) -> None:
    """Drop a stopped process from lab `name`'s record (none recorded with that PID is fine)."""
    state = _State.load(state_root / name)
    if state is not None and any(p.pid == pid for p in state.processes):
        state.processes = [p for p in state.processes if p.pid != pid]
        state.save(state_root / name)


def destroy_by_name(name: str, state_root: Path = STATE_ROOT) -> Teardown:
    """Tear down lab `name` without its Python object (after a crash): the processes and
    namespaces in `state_root/name/lab.json`, any namespace named as this lab names its own, and
    the work directory."""
    _check_name(name)
    work_dir = state_root / name
    state = _State.load(work_dir)
    processes = [(p.pid, p.started) for p in state.processes] if state else []
    ip_netns.stop(processes)
    report = _teardown(name, state or _State(name))
    report.pids[:0] = [pid for pid, _ in processes]
    if state is not None or (work_dir.is_dir() and not any(work_dir.iterdir())):
        shutil.rmtree(work_dir, ignore_errors=True)
    return report


def _teardown(name: str, state: _State) -> Teardown:
    """Stop what still runs inside the lab's namespaces, then delete them, newest first."""
    found = list(dict.fromkeys([*reversed(state.namespaces), *_own_namespaces(name)]))
    # Processes the lab did not record (a plugin's daemon, one started with `exec`) live only in
    # the lab's namespaces: their PIDs are read from there, so nothing outside is touched.
    stray = [(pid, started) for ns in found for pid in ip_netns.pids(ns)
             if (started := ip_netns.start_time(pid)) is not None]
    ip_netns.stop(stray)
    existing = set(ip_netns.names())
    for ns in found:
        ip_netns.delete(ns)
    return Teardown([ns for ns in found if ns in existing], [pid for pid, _ in stray])


def _own_namespaces(name: str) -> list[str]:
    """This lab's namespaces by their exact name pattern: lab `a` never takes lab `a-b`'s."""
    own = re.compile(rf"{re.escape(name)}-(fabric|etcd\d+|n\d+|p[0-9a-f]{{8}})")
    return [ns for ns in ip_netns.names() if own.fullmatch(ns)]


def unique_name(prefix: str) -> str:
    """A lab name no other lab has: ``prefix`` and 6 hex digits (lab names have at most 12 characters)."""
    return f"{prefix}{secrets.token_hex(3)}"


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise LabError(f"invalid lab name {name!r}: use 1 to 12 of a-z, 0-9 and '-', not starting with '-'")


def _with_labels(plugin: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """The plugin's configuration with `args.cni.labels` (the CNI conventions) set."""
    args = dict(plugin.get("args") or {})
    args["cni"] = {**(args.get("cni") or {}), "labels": [{"key": k, "value": v} for k, v in labels.items()]}
    return {**plugin, "args": args}


def _plugin_error(pod: Pod, index: int, command: str, run: PluginRun) -> PodError:
    kind = pod.conflist["plugins"][index]["type"]
    out = run.output or {}
    reason = out.get("msg") or run.stderr.strip() or run.stdout.strip() or f"exit status {run.returncode}"
    details = f" ({out['details']})" if out.get("details") else ""
    return PodError(f"{command} of pod {pod.namespace}/{pod.name} failed in plugin {kind!r}: {reason}{details}",
                    code=run.code)


def _clean_env() -> dict[str, str]:
    # etcd reads ETCD_* variables as flags, and gRPC honours proxy variables even on the fabric.
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("ETCD_", "ETCDCTL_")) and k.lower() not in _PROXY_VARIABLES}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
