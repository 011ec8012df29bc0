"""A multi-node lab with felix-agent on every node, for the dataplane and BGP lab tests and the
benchmarks: a `netlab` lab with an agent on every
node, pods made through the real `tortie` plugin (delegated to the agent), and the observations the
tests make — pings, TCP connections to a server inside a pod, UDP datagrams seen by a listener on
the fabric, the agents' health and metrics pages, routes and nftables state in a node namespace.

Everything runs inside the lab's namespaces (servers included: pod and fabric namespaces are the
lab's own, so `Lab.start_process` starts and records them); `ClusterLab` tears the lab down on exit,
even when a test fails (set TORTIE_LAB_KEEP_LOGS to a directory to keep the logs). Nothing here
sleeps for a fixed time: `wait_until` polls. Over 450 lines, moved as it was from the lab tests:
it becomes part of `netlab.cluster` when the lab harnesses are made one (issue 12).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from netlab.cni import REFERENCE_PLUGINS
from netlab.lab import GATEWAY, Lab, LabNode, Pod, PodError

VENV_BIN = Path(sys.executable).parent  # the virtual environment's scripts, as netlab.cluster finds them
PYTHON = VENV_BIN / "python"
FELIX_AGENT = VENV_BIN / "felix-agent"
NETCTL = VENV_BIN / "netctl"
TORTIE = VENV_BIN / "tortie"
TORTIE_IPAM = VENV_BIN / "tortie-ipam"

NETWORK = "tnet"
POOL_V4 = "10.244.0.0/16"
POOL_V6 = "fd00:10:244::/48"
BLOCK_V4 = 26
BLOCK_V6 = 122
POD_MTU = 1400
FABRIC_HOST = GATEWAY  # 198.18.0.1: on the fabric, outside every pool, every node's default route
HEALTH_PORT = 9099
METRICS_PORT = 9091
AGENT_READY_TIMEOUT = 30.0
KEEP_LOGS = "TORTIE_LAB_KEEP_LOGS"  # a directory: each lab's agent, server and etcd logs are copied there
CONNECT_TIMEOUT = 1.0  # a dropped SYN costs this much; the lab answers in milliseconds otherwise

T = TypeVar("T")


def unique_name(prefix: str) -> str:
    """A lab name: the prefix and 6 hex digits (lab names have at most 12 characters)."""
    return f"{prefix}{secrets.token_hex(3)}"


def wait_until(condition: Callable[[], T], timeout: float, what: str = "the condition",
               interval: float = 0.1, describe: Callable[[], str] | None = None) -> T:
    """Poll ``condition()`` until it returns something true and return that; fail naming ``what``
    (and what ``describe()`` says about the state then) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last value {value!r}{detail}")
        time.sleep(interval)


def pools_yaml(*, vxlan: str = "Always", nat_v4: bool = True, nat_v6: bool = False) -> str:
    """The lab's two pools (IPv4 and IPv6), VXLAN-encapsulated."""
    return textwrap.dedent(f"""\
        apiVersion: tortie.dev/v1
        kind: IPPool
        metadata: {{name: pool-v4}}
        spec: {{cidr: {POOL_V4}, blockSize: {BLOCK_V4}, vxlanMode: {vxlan}, natOutgoing: {str(nat_v4).lower()}}}
        ---
        apiVersion: tortie.dev/v1
        kind: IPPool
        metadata: {{name: pool-v6}}
        spec: {{cidr: '{POOL_V6}', blockSize: {BLOCK_V6}, vxlanMode: {vxlan}, natOutgoing: {str(nat_v6).lower()}}}
        """)


def v4(pod: Pod) -> str:
    return next(ip for ip in pod.ips if ipaddress.ip_address(ip).version == 4)


def v6(pod: Pod) -> str:
    return next(ip for ip in pod.ips if ipaddress.ip_address(ip).version == 6)


def address_of(pod: Pod, family: int) -> str:
    return v4(pod) if family == 4 else v6(pod)


def block_of(address: str) -> str:
    """The IPAM block (as the pools above size them) holding ``address``."""
    size = BLOCK_V4 if ipaddress.ip_address(address).version == 4 else BLOCK_V6
    return str(ipaddress.ip_network(f"{address}/{size}", strict=False))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → ``{'name{labels}': value}`` (labels kept verbatim)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# A TCP server for a pod: dual-stack, answers every connection with "ok <peer address>".
_TCP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(128)
while True:
    c, peer = s.accept()
    try:
        c.sendall(("ok " + peer[0].removeprefix("::ffff:") + "\\n").encode())
    except OSError:
        pass
    c.close()
"""

# A TCP client: prints what the server answered, or nothing when the connection fails.
_TCP_CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(s.recv(128).decode().strip())
except OSError as e:
    print("failed", type(e).__name__)
"""

# A listener on the fabric: prints the source of every UDP datagram and TCP connection it sees.
_FABRIC_LISTENER = """
import selectors, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((host, port))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((host, port))
tcp.listen(16)
sel = selectors.DefaultSelector()
sel.register(udp, selectors.EVENT_READ)
sel.register(tcp, selectors.EVENT_READ)
print("listener ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is udp:
            data, peer = udp.recvfrom(2048)
            print("udp", peer[0], data.decode(errors="replace"), flush=True)
        else:
            c, peer = tcp.accept()
            print("tcp", peer[0], flush=True)
            c.sendall(b"ok\\n")
            c.close()
"""

_UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""

_HTTP_GET = """
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=3)
    code, body = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read().decode()
except OSError as e:
    code, body = 0, str(e)
print(code)
sys.stdout.write(body)
"""


@dataclass(frozen=True)
class HTTPAnswer:
    status: int  # 0 when nothing answered
    body: str


class ClusterLab:
    """A lab of ``nodes`` nodes with the pools of ``pools`` applied and an agent per node.

    Use it as a context manager (or call ``close()``): the lab, its agents, pods and servers are
    torn down on exit whatever happened."""

    def __init__(self, prefix: str, nodes: int, *, pools: str | None = None,
                 agent_args: Sequence[str] = ()) -> None:
        self.lab = Lab(unique_name(prefix), nodes=nodes)
        self.pools = pools_yaml() if pools is None else pools
        self.agent_args = list(agent_args)
        self.agents: dict[int, int] = {}  # node index → PID of its felix-agent
        self._servers: dict[tuple[str, int], int] = {}  # (pod netns, port) → PID
        self._log_offsets: dict[int, int] = {}
        self._files = 0

    # -- building and tearing down --------------------------------------------------------------

    def __enter__(self) -> ClusterLab:
        self.lab.create()
        try:
            self.work = self.lab.work_dir / "cluster"
            self.bin_dir = self.work / "cnibin"
            self.bin_dir.mkdir(parents=True)
            for plugin in (TORTIE, TORTIE_IPAM):
                (self.bin_dir / plugin.name).symlink_to(plugin)
            self.cni_path = [self.bin_dir, REFERENCE_PLUGINS]
            self.env = self.lab.etcd_env()
            if self.pools:
                self.apply(self.pools)
            for k in range(1, len(self.lab.nodes) + 1):
                self.start_agent(k)
            for k in self.agents:
                self.wait_ready(k)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        keep = os.environ.get(KEEP_LOGS)
        if keep and self.lab.work_dir.exists():  # for post-mortems: the lab's directory goes with it
            shutil.copytree(self.lab.work_dir, Path(keep) / self.lab.name, symlinks=True, dirs_exist_ok=True)
        self.lab.destroy()

    # -- nodes and agents -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.lab.name

    def node(self, k: int) -> LabNode:
        return self.lab.node(k)

    def node_dir(self, k: int) -> Path:
        return self.work / self.node(k).name

    def agent_log(self, k: int) -> Path:
        return self.node_dir(k) / "agent.log"

    def start_agent(self, k: int, *extra: str, env: Mapping[str, str] | None = None) -> int:
        """Start felix-agent on node ``k`` (with the lab's ``agent_args`` and ``extra``, and the
        lab's datastore settings or ``env``); return its PID without waiting for it to be ready
        (see ``wait_ready``)."""
        if k in self.agents and self.lab.process_running(self.agents[k]):
            raise AssertionError(f"the agent of node {k} is already running")
        node, state = self.node(k), self.node_dir(k)
        state.mkdir(parents=True, exist_ok=True)
        log = self.agent_log(k)
        self._log_offsets[k] = log.stat().st_size if log.exists() else 0
        argv = [str(FELIX_AGENT), "--nodename", node.name, "--node-ip", f"{node.address}/24",
                "--cni-socket", str(state / "cni.sock"), "--state-dir", str(state), "--log-level", "info",
                *self.agent_args, *extra]
        pid = self.lab.start_process(node.netns, argv, log, self.env if env is None else env)
        self.agents[k] = pid
        return pid

    def stop_agent(self, k: int) -> None:
        """SIGTERM the agent of node ``k`` and wait until it has exited (the dataplane stays)."""
        self.lab.stop_process(self.agents.pop(k))

    def kill_agent(self, k: int) -> None:
        """SIGKILL the agent of node ``k``, as a crash would, and wait until it is gone."""
        pid = self.agents.pop(k)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self.lab.process_running(pid), 10, f"agent {pid} to die")
        self.lab.stop_process(pid)  # reaps it and forgets it; it is gone already

    def agent_running(self, k: int) -> bool:
        return k in self.agents and self.lab.process_running(self.agents[k])

    def agent_output(self, k: int) -> str:
        """What node ``k``'s agent logged since its last start."""
        log = self.agent_log(k)
        if not log.exists():
            return ""
        with log.open("rb") as f:
            f.seek(self._log_offsets.get(k, 0))
            return f.read().decode(errors="replace")

    def http(self, k: int, path: str, port: int = HEALTH_PORT) -> HTTPAnswer:
        """GET ``http://127.0.0.1:<port><path>`` inside node ``k``'s namespace."""
        done = self.exec(k, str(PYTHON), "-c", _HTTP_GET, f"http://127.0.0.1:{port}{path}", check=False)
        status, _, body = done.stdout.partition("\n")
        return HTTPAnswer(int(status) if status.strip().isdigit() else 0, body)

    def readiness(self, k: int) -> int:
        return self.http(k, "/readiness").status

    def liveness(self, k: int) -> int:
        return self.http(k, "/liveness").status

    def metrics(self, k: int) -> dict[str, float]:
        answer = self.http(k, "/metrics", METRICS_PORT)
        if answer.status != 200:
            raise AssertionError(f"node {k}'s /metrics answered {answer.status}: {answer.body}")
        return parse_metrics(answer.body)

    def wait_ready(self, k: int, timeout: float = AGENT_READY_TIMEOUT) -> None:
        pid = self.agents[k]

        def ready() -> bool:
            if not self.lab.process_running(pid):
                raise AssertionError(f"felix-agent of node {k} exited:\n{self.agent_output(k)[-4000:]}")
            return self.readiness(k) == 200

        wait_until(ready, timeout, f"node {k}'s agent to become ready", interval=0.1,
                   describe=lambda: self.agent_output(k)[-4000:])

    # -- commands inside the lab ----------------------------------------------------------------

    def exec(self, k: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(self.node(k).netns, *argv, check=check)

    def netctl(self, *args: str, node: int = 1, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``netctl ARGS`` in a node's namespace with the lab's datastore settings."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        done = self.lab.exec(self.node(node).netns, "env", *env, str(NETCTL), *args, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"netctl {' '.join(args)} exited {done.returncode}: "
                                 f"{done.stderr.strip() or done.stdout.strip()}")
        return done

    def apply(self, text: str) -> None:
        """``netctl apply -f`` of the YAML ``text``."""
        self._files += 1
        path = self.work / f"apply-{self._files}.yaml"
        path.write_text(text)
        self.netctl("apply", "-f", str(path))

    def delete(self, kind: str, name: str, namespace: str | None = None, *, missing_ok: bool = True) -> None:
        args = ["delete", kind, name, *(["-n", namespace] if namespace else [])]
        done = self.netctl(*args, check=False)
        if done.returncode != 0 and not (missing_ok and "not found" in (done.stderr + done.stdout).lower()):
            raise AssertionError(f"netctl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")

    def get_yaml(self, kind: str, name: str, namespace: str | None = None) -> str:
        return self.netctl("get", kind, name, *(["-n", namespace] if namespace else []), "-o", "yaml").stdout

    def routes(self, k: int, family: int = 4) -> str:
        return self.exec(k, "ip", f"-{family}", "route", "show", "table", "main").stdout

    def route_to(self, k: int, prefix: str) -> str:
        """The main-table route for exactly ``prefix`` on node ``k`` ("" when there is none)."""
        family = ipaddress.ip_network(prefix).version
        return self.exec(k, "ip", f"-{family}", "route", "show", "exact", prefix).stdout.strip()

    def nft(self, k: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec(k, "nft", *args, check=check)

    # -- pods -----------------------------------------------------------------------------------

    def conflist(self, k: int) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [{
            "type": "tortie", "nodename": self.node(k).name, "mtu": POD_MTU,
            "etcd_endpoints": self.env["ETCD_ENDPOINTS"], "etcd_ca_cert_file": self.env["ETCD_CA_CERT_FILE"],
            "etcd_cert_file": self.env["ETCD_CERT_FILE"], "etcd_key_file": self.env["ETCD_KEY_FILE"],
            "agent_socket": str(self.node_dir(k) / "cni.sock"),
            "ipam": {"type": "tortie-ipam", "assign_ipv4": "true", "assign_ipv6": "true"}}]}

    def add_pod(self, k: int, name: str, *, namespace: str = "default",
                labels: Mapping[str, str] | None = None) -> Pod:
        """A pod on node ``k`` through the real plugin; ADD answers once its policy is programmed."""
        try:
            return self.lab.add_pod(k, name, self.conflist(k), namespace=namespace, cni_path=self.cni_path,
                                    labels=labels)
        except PodError as e:
            raise AssertionError(f"ADD of {namespace}/{name} on node {k} failed: {e}\n"
                                 f"{self.agent_output(k)[-3000:]}") from None

    def delete_pod(self, pod: Pod) -> None:
        for key in [key for key in self._servers if key[0] == pod.netns]:
            self.lab.stop_process(self._servers.pop(key))
        self.lab.delete_pod(pod)

    def endpoint_name(self, pod: Pod) -> str:
        """The WorkloadEndpoint's name (``<node>-<host interface>``), from the datastore."""
        out = self.netctl("get", "wep", "-n", pod.namespace, "-o", "json").stdout
        doc = json.loads(out) if out.strip() else []
        items = doc.get("items", [doc]) if isinstance(doc, dict) else doc
        for item in items:
            if item["spec"]["containerID"] == pod.container_id:
                return str(item["metadata"]["name"])
        raise AssertionError(f"no WorkloadEndpoint for pod {pod.namespace}/{pod.name}")

    def edit_endpoint(self, pod: Pod, change: Callable[[dict[str, Any]], None]) -> None:
        """Change the pod's WorkloadEndpoint as an operator would: ``netctl get -o yaml``, edit the
        document (``change`` edits it in place), ``netctl apply`` it back."""
        import yaml

        name = self.endpoint_name(pod)
        doc = yaml.safe_load(self.get_yaml("wep", name, pod.namespace))
        change(doc)
        self.apply(yaml.safe_dump(doc))

    def set_labels(self, pod: Pod, labels: Mapping[str, str | None]) -> None:
        """Change the labels of the pod's WorkloadEndpoint (None removes one)."""
        def relabel(doc: dict[str, Any]) -> None:
            current = doc["metadata"].setdefault("labels", {})
            for key, value in labels.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value

        self.edit_endpoint(pod, relabel)

    def rule_handles(self, k: int) -> dict[str, list[str]]:
        """Every chain of node ``k``'s ``inet tortie`` table → its rules with their kernel handles
        (a rule rewritten gets a new handle; set elements changing leave them alone)."""
        out = self.nft(k, "-a", "list", "table", "inet", "tortie").stdout
        chains: dict[str, list[str]] = {}
        chain = None
        for line in (raw.strip() for raw in out.splitlines()):
            if m := re.match(r"chain (\S+) \{", line):
                chain = m[1]
                chains[chain] = []
            elif line.startswith("}"):
                chain = None
            elif chain is not None and "# handle" in line:
                chains[chain].append(line)
        return chains

    # -- traffic --------------------------------------------------------------------------------

    def can_ping(self, a: Pod, b: Pod | str, family: int = 4, timeout: float = 1.0) -> bool:
        """Whether one echo request from pod ``a`` to ``b`` (a pod or an address) is answered."""
        target = b if isinstance(b, str) else address_of(b, family)
        return self.lab.ping(a.netns, target, count=1, timeout=timeout)

    def serve_tcp(self, pod: Pod, port: int) -> None:
        """A TCP server on ``port`` of every address of ``pod``, kept until the pod or lab goes."""
        key = (pod.netns, port)
        if key in self._servers:
            return
        log = self.work / "servers" / f"{pod.netns}-{port}.log"
        self._servers[key] = self.lab.start_process(pod.netns, [str(PYTHON), "-c", _TCP_SERVER, str(port)], log, {})
        wait_until(lambda: self.lab.exec(pod.netns, "ss", "-Hltn", f"sport = :{port}").stdout.strip(), 10,
                   f"the server on port {port} of pod {pod.name}", interval=0.05)

    def tcp(self, a: Pod, b: Pod | str, port: int, family: int = 4, timeout: float = CONNECT_TIMEOUT) -> str:
        """Connect from pod ``a`` to ``b`` (a pod, whose server is started on demand, or an address):
        the server's answer (``ok <source address it saw>``), or ``failed <why>``."""
        if isinstance(b, str):
            target = b
        else:
            self.serve_tcp(b, port)
            target = address_of(b, family)
        done = self.lab.exec(a.netns, str(PYTHON), "-c", _TCP_CLIENT, target, str(port), f"{timeout:g}",
                             timeout=timeout + 30)
        return done.stdout.strip()

    def can_tcp(self, a: Pod, b: Pod | str, port: int, family: int = 4, timeout: float = CONNECT_TIMEOUT) -> bool:
        return self.tcp(a, b, port, family, timeout).startswith("ok")

    def reach(self, checks: Iterable[Check]) -> dict[Check, bool]:
        """Run every check at once (a dropped packet costs a timeout; there is no reason to wait for
        them one after the other) and return which passed."""
        checks = list(dict.fromkeys(checks))
        for check in checks:  # servers first: starting one is not part of the race
            if check.port is not None and not isinstance(check.dst, str):
                self.serve_tcp(check.dst, check.port)

        def run(check: Check) -> bool:
            if check.port is None:
                return self.can_ping(check.src, check.dst, check.family)
            return self.can_tcp(check.src, check.dst, check.port, check.family)

        with ThreadPoolExecutor(max_workers=min(16, max(1, len(checks)))) as pool:
            return dict(zip(checks, pool.map(run, checks), strict=True))

    def expect(self, expected: Mapping[Check, bool], timeout: float = 15.0, what: str = "") -> None:
        """Wait until every check gives its expected result (the agents apply asynchronously),
        failing with the checks that still disagree."""
        last: dict[Check, bool] = {}

        def matches() -> bool:
            nonlocal last
            last = self.reach(expected)
            return last == dict(expected)

        def wrong() -> str:
            return "\n".join(f"  {c}: expected {'pass' if want else 'drop'}, got {'pass' if last[c] else 'drop'}"
                             for c, want in expected.items() if last.get(c) != want)

        wait_until(matches, timeout, what or "the expected traffic", interval=0.2, describe=wrong)

    # -- the fabric -----------------------------------------------------------------------------

    def fabric_listener(self, port: int) -> Path:
        """A UDP and TCP listener on the fabric's own address (198.18.0.1), outside every pool;
        returns its log, one line per datagram (``udp <source> <payload>``) or connection."""
        log = self.work / f"fabric-{port}.log"
        self.lab.start_process(self.lab.fabric, [str(PYTHON), "-u", "-c", _FABRIC_LISTENER, FABRIC_HOST, str(port)],
                               log, {})
        # (the log begins with the command line, which holds the script: match the whole line)
        wait_until(lambda: log.exists() and "\nlistener ready\n" in log.read_text(), 10, "the fabric listener")
        return log

    def send_udp(self, pod: Pod, address: str, port: int, payload: str) -> None:
        self.lab.exec(pod.netns, str(PYTHON), "-c", _UDP_SEND, address, str(port), payload)


@dataclass(frozen=True, eq=False)  # compared by identity: a Pod is not hashable
class Check:
    """One probe: ping (``port`` None) or a TCP connection from ``src`` to ``dst``."""

    src: Pod
    dst: Pod | str
    port: int | None = None
    family: int = 4

    def __str__(self) -> str:
        dst = self.dst if isinstance(self.dst, str) else f"{self.dst.namespace}/{self.dst.name}"
        what = "ping" if self.port is None else f"tcp:{self.port}"
        return f"{self.src.namespace}/{self.src.name} -> {dst} {what} (IPv{self.family})"


def fabric_sources(log: Path, payload: str) -> list[str]:
    """The source addresses the fabric listener saw for datagrams carrying ``payload``."""
    if not log.exists():
        return []
    return [m[1] for m in re.finditer(rf"^udp (\S+) {re.escape(payload)}$", log.read_text(), re.M)]
