"""Shared pieces of the `tortie` plugin lab tests: a `netlab` lab with Tortie's pools, the plugins
in a per-lab CNI bin directory, the node agents, and read-only views of what the plugin left behind
(links in a node namespace, etcd keys, WorkloadEndpoints, IPAM usage).

Everything runs inside the lab's namespaces; the lab is torn down even when a test fails. Extra
sandboxes for raw plugin calls are named as the lab names its pods (`NAME-pHHHHHHHH`), so the lab's
teardown removes them even after a crash.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netctl.install_cmd import install_plugins
from netlab import netns as ip_netns
from netlab.agent import Agent
from netlab.cluster import clean_env
from netlab.cluster_lab import netctl
from netlab.cni import REFERENCE_PLUGINS, Attachment, PluginRun, exec_plugin, network_config, tortie_plugin
from netlab.etcd import ETCD, ETCDCTL
from netlab.lab import Lab, LabNode, Pod, PodError, unique_name

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
TORTIE = VENV_BIN / "tortie"  # the compiled front end unless install-deps found no Go toolchain
TORTIE_IPAM = VENV_BIN / "tortie-ipam"
NETCTL = VENV_BIN / "netctl"

NETWORK = "tnet"
POOL_V4 = "10.244.0.0/16"
POOL_V6 = "fd00:10:244::/48"
HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = "169.254.1.1"
MTU = 1450
AGENT_START_TIMEOUT = 30.0
WEP_PREFIX = "/tortie/resources/v1/workloadendpoints/"
HANDLE_PREFIX = "/tortie/ipam/v2/handle/"
BLOCK_PREFIX = "/tortie/ipam/v2/assignment/"


def require_lab(plugins: Sequence[str] = ()) -> None:
    """Skip the test unless this machine can build a lab: root, etcd-server, the reference ``plugins``."""
    if os.geteuid() != 0:
        pytest.skip("needs root: labs build network namespaces")
    missing = [p for p in plugins if not (REFERENCE_PLUGINS / p).exists()]
    if not ETCD.exists() or missing:
        pytest.skip(f"needs etcd-server and the reference CNI plugins {missing} (scripts/install-deps.sh)"
                    if plugins else "needs etcd-server (scripts/install-deps.sh)")


def resources_yaml(nodes: Sequence[LabNode]) -> str:
    """The two pools, and the Node resources each node's agent would register: written up front so
    that the in-process path (no agent yet) sees the same datastore and `ipam check` knows the nodes."""
    docs = [f"kind: Node\nmetadata: {{name: {n.name}}}\nspec: {{bgp: {{ipv4Address: {n.address}/24}}}}"
            for n in nodes]
    docs += [f"kind: IPPool\nmetadata: {{name: pool-v4}}\nspec: {{cidr: {POOL_V4}, blockSize: 26}}",
             f"kind: IPPool\nmetadata: {{name: pool-v6}}\nspec: {{cidr: '{POOL_V6}', blockSize: 122}}"]
    return "".join(f"---\napiVersion: tortie.dev/v1\n{doc}\n" for doc in docs)


def host_ifname(container_id: str, ifname: str = "eth0", network: str = NETWORK) -> str:
    """The host end the contract names: `tor` + 11 hex digits of SHA-1(network.containerID.ifname)."""
    return "tor" + hashlib.sha1(f"{network}.{container_id}.{ifname}".encode()).hexdigest()[:11]


@dataclass(frozen=True)
class DatastoreState:
    """Everything under /tortie/ at one etcd revision."""

    revision: int
    kvs: dict[str, bytes]

    def under(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.kvs.items() if k.startswith(prefix)}

    @property
    def handles(self) -> list[str]:
        return sorted(k[len(HANDLE_PREFIX):] for k in self.under(HANDLE_PREFIX))

    @property
    def endpoints(self) -> list[str]:
        return sorted(k[len(WEP_PREFIX):] for k in self.under(WEP_PREFIX))

    @property
    def allocations(self) -> dict[str, str]:
        """Allocated "block/ordinal" → handle, read straight from the IPAM blocks."""
        found = {}
        for value in self.under(BLOCK_PREFIX).values():
            block = json.loads(value)
            for ordinal, allocation in (block.get("allocations") or {}).items():
                found[f"{block['cidr']}/{ordinal}"] = str(allocation.get("handle"))
        return found


@dataclass(frozen=True)
class Sandbox:
    """A container namespace made for raw plugin calls."""

    name: str

    @property
    def path(self) -> str:
        return str(ip_netns.path(self.name))

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(ip_netns.exec_argv(self.name, argv), capture_output=True, text=True, check=check,
                              timeout=60)

    def links(self) -> list[str]:
        """The names of the namespace's links, sorted (a veth's "@peer" cut off)."""
        out = self.exec("ip", "-o", "link", "show").stdout
        return sorted(line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines())


@dataclass(frozen=True)
class Footprint:
    """What a plugin call can change: the etcd keys (and revision) and the node's `tor*` links."""

    datastore: DatastoreState
    links: tuple[str, ...]


class TortieLab:
    """A `netlab` lab set up for the `tortie` plugin: pools, a CNI bin dir, agents on demand."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.work = lab.work_dir
        self.bin_dir = self.work / "cnibin"
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for plugin in (TORTIE, TORTIE_IPAM):
            (self.bin_dir / plugin.name).symlink_to(plugin)
        self.cni_path = [self.bin_dir, REFERENCE_PLUGINS]
        self.env = lab.etcd_env()
        self._agents: dict[int, Agent] = {}

    @classmethod
    @contextlib.contextmanager
    def create(cls, nodes: int = 1, prefix: str = "tt", *, plugins: Sequence[str] = ()) -> Iterator[TortieLab]:
        """A new lab with the v4 and v6 pools applied; torn down on exit, even on failure. Skips
        the test without root, etcd or the reference CNI ``plugins`` it needs."""
        require_lab(plugins)
        with Lab(unique_name(prefix), nodes=nodes) as lab:
            tl = cls(lab)
            resources = tl.work / "resources.yaml"
            resources.write_text(resources_yaml(lab.nodes))
            tl.netctl(1, "apply", "-f", str(resources))
            yield tl

    # -- configuration --------------------------------------------------------------------------

    def use_front_end(self, kind: str) -> None:
        """Make the bin dir's `tortie` and `tortie-ipam` the compiled front end (the venv's, as
        install-deps installed it) or the Python relay (`install-cni --front-end python`)."""
        if kind == "compiled":
            if not TORTIE.read_bytes().startswith(b"\x7fELF"):
                if os.environ.get("CI") == "true":
                    raise AssertionError(f"{TORTIE} is not the compiled front end in CI")
                pytest.skip(f"{TORTIE} is the Python relay (no Go toolchain when install-deps ran)")
            sources = {p.name: p for p in (TORTIE, TORTIE_IPAM)}
        elif kind == "python":
            relay_dir = self.work / "python-relay"
            if not (relay_dir / "tortie").exists():
                install_plugins(relay_dir, "python")
            sources = {name: relay_dir / name for name in ("tortie", "tortie-ipam")}
        else:
            raise ValueError(f"unknown front end {kind!r}")
        for name, target in sources.items():
            link = self.bin_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(target)

    def node(self, k: int = 1) -> LabNode:
        return self.lab.node(k)

    def socket(self, node: int = 1) -> Path:
        return self.work / f"{self.node(node).name}.sock"

    def plugin(self, node: int = 1, *, ipv6: bool = True, **overrides: Any) -> dict[str, Any]:
        """The `tortie` entry of a conflist for node `node`; `overrides` replace or add keys
        (a value of None removes the key)."""
        entry = tortie_plugin(self.node(node).name, self.env, self.socket(node), mtu=MTU,
                              ipam={"assign_ipv4": "true", "assign_ipv6": "true" if ipv6 else "false"})
        for key, value in overrides.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        return entry

    def conflist(self, node: int = 1, *, version: str = "1.0.0", name: str = NETWORK,
                 chained: Sequence[Mapping[str, Any]] = (), ipv6: bool = True, **overrides: Any) -> dict[str, Any]:
        return {"cniVersion": version, "name": name,
                "plugins": [self.plugin(node, ipv6=ipv6, **overrides), *(dict(p) for p in chained)]}

    # -- the agent ------------------------------------------------------------------------------

    def agent(self, node: int = 1) -> Agent:
        """Node ``node``'s felix-agent (started or not), with the state directory of the lab's
        work directory (the MTU file; never the host's /run/tortie)."""
        if node not in self._agents:
            name = self.node(node).name
            self._agents[node] = Agent(self.lab, self.node(node), cni_socket=self.socket(node),
                                       state_dir=self.work / f"state-{name}", log=self.work / f"agent-{name}.log",
                                       env=clean_env(self.env))
        return self._agents[node]

    def agent_log(self, node: int = 1) -> Path:
        return self.agent(node).log

    def start_agent(self, node: int = 1, extra_args: Sequence[str] = (),
                    extra_env: Mapping[str, str] | None = None) -> int:
        """Start felix-agent in node `node`'s namespace (with `extra_args` added to its command
        line, `extra_env` to its environment); return once its CNI socket exists (its start-up
        cleanup runs before the socket is made)."""
        agent = self.agent(node)
        if agent.running():
            raise AssertionError(f"the agent of node {node} is already running")
        self.socket(node).unlink(missing_ok=True)  # a crashed agent's: its presence must mean this agent is ready
        pid = agent.start(extra_args, {**agent.env, **extra_env} if extra_env else None)
        try:
            agent.wait_socket(AGENT_START_TIMEOUT)
        except AssertionError:
            agent.stop()
            raise
        return pid

    def stop_agent(self, node: int = 1) -> None:
        self.agent(node).stop()

    def agent_pid(self, node: int = 1) -> int:
        pid = self.agent(node).pid
        assert pid is not None, f"the agent of node {node} is not running"
        return pid

    def agent_running(self, node: int = 1) -> bool:
        return self.agent(node).running()

    def use_agent(self, running: bool, node: int = 1) -> None:
        """Make the delegated path (agent running) or the in-process path (no agent) current."""
        if running and not self.agent_running(node):
            self.start_agent(node)
        elif not running:
            self.stop_agent(node)
            assert not self.socket(node).exists(), "the stopped agent left its socket behind"

    def remove_dataplane(self, node: int = 1) -> None:
        """Take the stopped agent's nftables table out of the node, as on a node whose agent never
        ran: with it in place (an agent stops leaving its dataplane), a pod the agent has not
        programmed is dropped as an unknown workload interface until the agent is back."""
        assert not self.agent_running(node)
        self.exec(node, "nft", "delete", "table", "inet", "tortie", check=False)

    def agent_output(self, node: int = 1) -> str:
        """What the agent logged since its last start."""
        return self.agent(node).output()

    # -- commands inside the lab ----------------------------------------------------------------

    def exec(self, node: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.exec(self.node(node).netns, *argv, check=check)

    def netctl(self, node: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`netctl ARGS` in node `node`'s namespace with the lab's datastore settings."""
        return netctl(self.lab, self.node(node).netns, self.env, *args, check=check)

    def etcdctl(self, *args: str) -> str:
        argv = [str(ETCDCTL), f"--endpoints={self.env['ETCD_ENDPOINTS']}", "--dial-timeout=3s",
                f"--cacert={self.env['ETCD_CA_CERT_FILE']}", f"--cert={self.env['ETCD_CERT_FILE']}",
                f"--key={self.env['ETCD_KEY_FILE']}", *args]
        return self.exec(1, "env", "ETCDCTL_API=3", *argv).stdout

    # -- observations ---------------------------------------------------------------------------

    def datastore(self) -> DatastoreState:
        doc = json.loads(self.etcdctl("get", "/tortie/", "--prefix", "-w", "json"))
        kvs = {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
               for kv in doc.get("kvs", [])}
        return DatastoreState(int(doc["header"]["revision"]), kvs)

    def count_handles(self) -> int:
        doc = json.loads(self.etcdctl("get", HANDLE_PREFIX, "--prefix", "--keys-only", "-w", "json"))
        return int(doc.get("count", 0))

    def endpoints(self) -> list[dict[str, Any]]:
        """Every WorkloadEndpoint as `netctl get wep -A -o json` prints it."""
        out = self.netctl(1, "get", "wep", "-A", "-o", "json").stdout.strip()
        if not out:
            return []
        doc = json.loads(out)
        items = doc.get("items", []) if isinstance(doc, dict) and doc.get("kind") == "List" else doc
        return list(items) if isinstance(items, list) else [items]

    def tor_links(self, node: int = 1) -> list[str]:
        out = self.exec(node, "ip", "-o", "link", "show").stdout
        names = (line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines())
        return sorted(name for name in names if name.startswith("tor"))

    def ipam_in_use(self) -> dict[str, int]:
        doc = json.loads(self.netctl(1, "ipam", "show", "-o", "json").stdout)
        return {p["name"]: int(p["inUse"]) for p in doc["pools"]}

    def ipam_check(self) -> subprocess.CompletedProcess[str]:
        return self.netctl(1, "ipam", "check", check=False)

    def footprint(self, node: int = 1) -> Footprint:
        return Footprint(self.datastore(), tuple(self.tor_links(node)))

    def assert_clean(self, node: int = 1) -> None:
        """No `tor*` link, no endpoint, no handle, no address in use, and `ipam check` clean."""
        assert self.tor_links(node) == []
        state = self.datastore()
        assert state.endpoints == []
        assert state.handles == []
        assert set(self.ipam_in_use().values()) == {0}
        checked = self.ipam_check()
        assert checked.returncode == 0, checked.stdout + checked.stderr

    # -- pods and raw calls ---------------------------------------------------------------------

    def add_pod(self, name: str, conflist: Mapping[str, Any] | None = None, *, node: int = 1,
                namespace: str = "default", labels: Mapping[str, str] | None = None) -> Pod:
        return self.lab.add_pod(node, name, conflist or self.conflist(node), namespace=namespace,
                                cni_path=self.cni_path, labels=labels)

    @contextlib.contextmanager
    def sandbox(self) -> Iterator[Sandbox]:
        """A fresh container namespace, named like the lab's pods so that the lab's teardown finds
        it even after a crash; removed on exit."""
        box = Sandbox(f"{self.lab.name}-p{secrets.token_hex(4)}")
        ip_netns.add(box.name)
        try:
            yield box
        finally:
            ip_netns.delete(box.name)

    @contextlib.contextmanager
    def added(self, count: int, config: Mapping[str, Any], *, node: int = 1
              ) -> Iterator[list[tuple[Sandbox, Attachment]]]:
        """``count`` fresh sandboxes, each with an attachment (a new container ID, eth0) ADDed with
        ``config`` from node ``node``: the pairs, in order. The sandboxes are removed on exit; their
        DELs are the test's."""
        with contextlib.ExitStack() as stack:
            boxes = [stack.enter_context(self.sandbox()) for _ in range(count)]
            attachments = [Attachment(secrets.token_hex(32), box.path, "eth0", {}) for box in boxes]
            for attachment in attachments:
                add = self.call("ADD", config, attachment, node=node)
                assert add.ok, add.output or add.stderr
            yield list(zip(boxes, attachments, strict=True))

    def call(self, command: str, config: Mapping[str, Any] | bytes, attachment: Attachment | None = None, *,
             node: int = 1, env: Mapping[str, str] | None = None, plugin: str = "tortie") -> PluginRun:
        """Exec a plugin of the bin dir from node `node`'s namespace exactly as a runtime does."""
        return exec_plugin(self.bin_dir / plugin, command, config, attachment, cni_path=self.cni_path,
                           in_netns=self.node(node).netns, extra_env=env)

    def call_for(self, pod: Pod, command: str, *, prev_result: bool = True, index: int = 0,
                 extra: Mapping[str, Any] | None = None) -> PluginRun:
        """CHECK/DEL/ADD for an existing pod's attachment, with its final ADD result as prevResult."""
        config = network_config(pod.conflist, index, prev_result=pod.result if prev_result else None, extra=extra)
        kind = str(pod.conflist["plugins"][index]["type"])
        binary = next(d / kind for d in self.cni_path if (d / kind).exists())
        return exec_plugin(binary, command, config, pod.attachment, cni_path=self.cni_path,
                           in_netns=pod.node.netns)

    def drop_without_del(self, pods: Sequence[Pod]) -> float:
        """What a runtime that never says DEL does: remove the pods' namespaces (the kernel takes
        their veths with them), all in one `ip -batch`, and forget the pods. Returns when
        (time.monotonic()) the removal started."""
        started = time.monotonic()
        batch = "".join(f"netns delete {pod.netns}\n" for pod in pods)
        subprocess.run(["ip", "-force", "-batch", "-"], input=batch, text=True, capture_output=True, check=True,
                       timeout=60)
        for pod in pods:
            self.lab._forget(pod)  # the namespace is gone already: only the lab's records
        return started

    def delete_pods(self) -> list[str]:
        """DEL every pod the lab still has; return the errors of those whose DEL failed (their
        namespace is removed all the same)."""
        errors = []
        for pod in list(self.lab.pods.values()):
            try:
                self.lab.delete_pod(pod)
            except (PodError, subprocess.SubprocessError) as e:
                errors.append(str(e))
                ip_netns.delete(pod.netns)
                self.lab.pods.pop(pod.container_id, None)
        return errors

    def reset(self, node: int = 1) -> None:
        """Back to an empty node after a test, whatever it left: pods deleted, then any `tor*`
        link, endpoint and handle removed and leaked addresses collected."""
        self.delete_pods()
        for link in self.tor_links(node):
            self.exec(node, "ip", "link", "del", link, check=False)
        state = self.datastore()
        if state.endpoints or state.handles:
            self.etcdctl("del", "--prefix", WEP_PREFIX)
            self.etcdctl("del", "--prefix", HANDLE_PREFIX)
        if state.allocations:
            self.netctl(node, "ipam", "gc", "--grace", "0")
