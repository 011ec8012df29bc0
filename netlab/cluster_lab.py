"""A multi-node lab with felix-agent on every node, for the dataplane and BGP lab tests and the
benchmarks: a `netlab` lab with an agent on every node (``netlab.agent``), pods made through the
real `tortie` plugin (delegated to the agent), and the observations the tests make — pings, TCP
connections to a server inside a pod, UDP datagrams seen by a listener on the fabric
(``netlab.probes``), the agents' health and metrics pages, routes and nftables state in a node
namespace.

Everything runs inside the lab's namespaces (servers included: pod and fabric namespaces are the
lab's own, so `Lab.start_process` starts and records them); `ClusterLab` tears the lab down on exit,
even when a test fails (set TORTIE_LAB_KEEP_LOGS to a directory to keep the logs). Nothing here
sleeps for a fixed time: `wait_for` polls. Must not decide what a test expects: it builds, probes
and reports.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from netlab.agent import Agent
from netlab.cni import REFERENCE_PLUGINS, tortie_plugin
from netlab.lab import GATEWAY, Lab, LabNode, Pod, PodError, unique_name
from netlab.probes import (
    FABRIC_LISTENER,
    HTTP_GET,
    TCP_CLIENT,
    TCP_SERVER,
    UDP_SEND,
    Check,
    HTTPAnswer,
    fabric_sources,
    parse_metrics,
)
from netlab.wait import wait_for

__all__ = ["Check", "ClusterLab", "fabric_sources", "unique_name"]

VENV_BIN = Path(sys.executable).parent  # the virtual environment's scripts, as netlab.cluster finds them
PYTHON = VENV_BIN / "python"
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


def netctl(lab: Lab, netns: str, env: Mapping[str, str], *args: str,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """``netctl ARGS`` in ``netns`` of ``lab`` with the datastore settings ``env``; with ``check``,
    an exit status other than 0 fails (AssertionError) with what netctl said."""
    done = lab.exec(netns, "env", *[f"{k}={v}" for k, v in env.items()], str(NETCTL), *args, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"netctl {' '.join(args)} exited {done.returncode}: "
                             f"{done.stderr.strip() or done.stdout.strip()}")
    return done


def copy_logs(work_dir: Path, keep: Path) -> None:
    """Copy a lab's directory to ``keep`` for a post-mortem: regular files and links only (the
    agents' CNI sockets and etcd's are not files ``copytree`` can copy)."""
    def sockets(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if not (Path(folder, n).is_dir() or Path(folder, n).is_file()
                                         or Path(folder, n).is_symlink())}

    shutil.copytree(work_dir, keep, symlinks=True, ignore=sockets, dirs_exist_ok=True)


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


class ClusterLab:
    """A lab of ``nodes`` nodes with the pools of ``pools`` (and then the YAML ``preamble``: BGP
    resources, Nodes) applied, and an agent on each of the nodes ``agents`` (default: every node;
    the others are free for a node that joins later, or for BIRD).

    Use it as a context manager (or call ``close()``): the lab, its agents, pods and servers are
    torn down on exit whatever happened."""

    def __init__(self, prefix: str, nodes: int, *, pools: str | None = None, agent_args: Sequence[str] = (),
                 agents: Iterable[int] | None = None, preamble: str = "") -> None:
        self.lab = Lab(unique_name(prefix), nodes=nodes)
        self.pools = pools_yaml() if pools is None else pools
        self.preamble = preamble
        self.agent_args = list(agent_args)
        self.initial_agents = list(range(1, nodes + 1) if agents is None else agents)
        self._agents: dict[int, Agent] = {}
        self._servers: dict[tuple[str, int], int] = {}  # (pod netns, port) → PID
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
            resources = "---\n".join(d for d in (self.pools, self.preamble) if d)
            if resources:
                self.apply(resources)
            for k in self.initial_agents:
                self.start_agent(k)
            for k in self.initial_agents:
                self.wait_ready(k)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Tear the lab down; first, with TORTIE_LAB_KEEP_LOGS set, copy its directory there (its
        logs, configurations and state for a post-mortem). A copy that fails does not stop the
        teardown: it is reported once the lab is gone."""
        keep = os.environ.get(KEEP_LOGS)
        try:
            if keep and self.lab.work_dir.exists():
                copy_logs(self.lab.work_dir, Path(keep) / self.lab.name)
        finally:
            self.lab.destroy()

    # -- nodes and agents -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.lab.name

    @property
    def agents(self) -> dict[int, int]:
        """Node index → PID of its felix-agent, for the agents started and not stopped."""
        return {k: a.pid for k, a in self._agents.items() if a.pid is not None}

    def node(self, k: int) -> LabNode:
        return self.lab.node(k)

    def node_dir(self, k: int) -> Path:
        return self.work / self.node(k).name

    def agent(self, k: int) -> Agent:
        """Node ``k``'s felix-agent (started or not): its socket, state directory and log in
        ``node_dir(k)``, the lab's ``agent_args`` on its command line."""
        if k not in self._agents:
            state = self.node_dir(k)
            self._agents[k] = Agent(self.lab, self.node(k), cni_socket=state / "cni.sock", state_dir=state,
                                    log=state / "agent.log", env=self.env, args=self.agent_args)
        return self._agents[k]

    def agent_log(self, k: int) -> Path:
        return self.agent(k).log

    def start_agent(self, k: int, *extra: str, env: Mapping[str, str] | None = None) -> int:
        """Start felix-agent on node ``k`` (with the lab's ``agent_args`` and ``extra``, and the
        lab's datastore settings or ``env``); return its PID without waiting for it to be ready
        (see ``wait_ready``)."""
        return self.agent(k).start(extra, env)

    def stop_agent(self, k: int) -> None:
        """SIGTERM the agent of node ``k`` and wait until it has exited (the dataplane stays)."""
        self.agent(k).stop()

    def kill_agent(self, k: int) -> None:
        """SIGKILL the agent of node ``k``, as a crash would, and wait until it is gone."""
        self.agent(k).kill()

    def agent_running(self, k: int) -> bool:
        return self.agent(k).running()

    def agent_output(self, k: int) -> str:
        """What node ``k``'s agent logged since its last start."""
        return self.agent(k).output()

    def http(self, k: int, path: str, port: int = HEALTH_PORT) -> HTTPAnswer:
        """GET ``http://127.0.0.1:<port><path>`` inside node ``k``'s namespace."""
        done = self.exec(k, str(PYTHON), "-c", HTTP_GET, f"http://127.0.0.1:{port}{path}", check=False)
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
        self.agent(k).wait_ready(lambda: self.readiness(k), timeout)

    # -- commands inside the lab ----------------------------------------------------------------

    def exec(self, k: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(self.node(k).netns, *argv, check=check)

    def netctl(self, *args: str, node: int = 1, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``netctl ARGS`` in a node's namespace with the lab's datastore settings."""
        return netctl(self.lab, self.node(node).netns, self.env, *args, check=check)

    def apply(self, text: str) -> None:
        """``netctl apply -f`` of the YAML ``text``."""
        self._files += 1
        path = self.work / f"apply-{self._files}.yaml"
        path.write_text(text)
        self.netctl("apply", "-f", str(path))

    @contextmanager
    def applied(self, text: str) -> Iterator[None]:
        """The resources of the YAML ``text`` in the datastore for the block, deleted after it."""
        self.apply(text := textwrap.dedent(text))
        try:
            yield
        finally:
            for doc in (d for d in yaml.safe_load_all(text) if d):  # a k8s policy: as netctl stores it
                meta, k8s = doc["metadata"], str(doc.get("apiVersion", "")).startswith("networking.k8s.io/")
                self.delete("NetworkPolicy" if k8s else doc["kind"], f"knp.default.{meta['name']}" if k8s
                            else meta["name"], meta.get("namespace", "default" if k8s else None))

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
        return {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [tortie_plugin(
            self.node(k).name, self.env, self.agent(k).cni_socket, mtu=POD_MTU,
            ipam={"assign_ipv4": "true", "assign_ipv6": "true"})]}

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
        self._servers[key] = self.lab.start_process(pod.netns, [str(PYTHON), "-c", TCP_SERVER, str(port)], log, {})
        wait_for(lambda: self.lab.exec(pod.netns, "ss", "-Hltn", f"sport = :{port}").stdout.strip(), 10,
                   f"the server on port {port} of pod {pod.name}", interval=0.05)

    def tcp(self, a: Pod, b: Pod | str, port: int, family: int = 4, timeout: float = CONNECT_TIMEOUT) -> str:
        """Connect from pod ``a`` to ``b`` (a pod, whose server is started on demand, or an address):
        the server's answer (``ok <source address it saw>``), or ``failed <why>``."""
        if isinstance(b, str):
            target = b
        else:
            self.serve_tcp(b, port)
            target = address_of(b, family)
        done = self.lab.exec(a.netns, str(PYTHON), "-c", TCP_CLIENT, target, str(port), f"{timeout:g}",
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

        wait_for(matches, timeout, what or "the expected traffic", interval=0.2, describe=wrong)

    # -- the fabric -----------------------------------------------------------------------------

    def fabric_listener(self, port: int) -> Path:
        """A UDP and TCP listener on the fabric's own address (198.18.0.1), outside every pool;
        returns its log, one line per datagram (``udp <source> <payload>``) or connection."""
        log = self.work / f"fabric-{port}.log"
        self.lab.start_process(self.lab.fabric, [str(PYTHON), "-u", "-c", FABRIC_LISTENER, FABRIC_HOST, str(port)],
                               log, {})
        # (the log begins with the command line, which holds the script: match the whole line)
        wait_for(lambda: log.exists() and "\nlistener ready\n" in log.read_text(), 10, "the fabric listener")
        return log

    def send_udp(self, pod: Pod, address: str, port: int, payload: str) -> None:
        self.lab.exec(pod.netns, str(PYTHON), "-c", UDP_SEND, address, str(port), payload)
