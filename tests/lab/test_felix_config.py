"""Issue 14, item 4 (and item 6 for this kind): FelixConfiguration on a two-node VXLAN lab.

The agents run without --log-level, so that FelixConfiguration's logSeverityScreen is theirs to
take. One lab for the module; each test removes the FelixConfigurations it made. What is observed:
the agent's log and PID, the kernel's device MTU, the MTU file the CNI plugin reads, the port the
health page answers on, pings between pods, and connections to the CNI socket across a re-exec.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.cluster_lab import ClusterLab, v4
from netlab.lab import Pod
from netlab.wait import wait_for

pytestmark = pytest.mark.lab

NODES = (1, 2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces and runs etcd and felix-agent")
    with ClusterLab("fcf", 2, agents=[]) as lab:
        for k in NODES:
            lab.agent(k).log_level = None  # FelixConfiguration decides
            lab.start_agent(k)
        for k in NODES:
            lab.wait_ready(k)
        yield lab


@pytest.fixture(scope="module")
def pods(cluster: ClusterLab) -> dict[int, Pod]:
    return {k: cluster.add_pod(k, f"pod{k}") for k in NODES}


def felixconfig(name: str, **spec: object) -> str:
    return json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
                       "metadata": {"name": name}, "spec": spec})


def node_config(cluster: ClusterLab, k: int) -> str:
    return f"node.{cluster.node(k).name}"


def _delete(cluster: ClusterLab, name: str) -> None:
    """Delete FelixConfiguration ``name`` if it exists."""
    cluster.netctl("delete", "felixconfiguration", name, check=False)


def vxlan_mtu(cluster: ClusterLab, k: int) -> int:
    out = cluster.exec(k, "ip", "-o", "link", "show", "vxlan.tortie").stdout
    found = re.search(r" mtu (\d+)", out)
    assert found, out
    return int(found[1])


def mtu_file(cluster: ClusterLab, k: int) -> int:
    return int((cluster.node_dir(k) / "mtu").read_text())


def test_log_level_applied_live(cluster: ClusterLab) -> None:
    pid = cluster.agents[1]
    assert " DEBUG " not in cluster.agent_output(1)
    try:
        cluster.apply(felixconfig("default", logSeverityScreen="Debug"))
        # Every apply logs its timing at debug: the change's own apply is the first one seen.
        wait_for(lambda: " DEBUG " in cluster.agent_output(1), 15, "debug lines in node 1's log")
        assert "logSeverityScreen = 'Debug' (from FelixConfiguration default), was 'Info': applied live" \
            in cluster.agent_output(1)
        cluster.apply(felixconfig("default", logSeverityScreen="Info"))
        wait_for(lambda: "logSeverityScreen = 'Info'" in cluster.agent_output(1), 15, "the level back to Info")
        back = len(cluster.agent_output(1))
        # Another change makes another apply: at Info it logs no debug line any more.
        cluster.apply(felixconfig("default", logSeverityScreen="Info", routeRefreshInterval="30s"))
        wait_for(lambda: "routeRefreshInterval = '30s'" in cluster.agent_output(1), 15, "the next change")
        assert " DEBUG " not in cluster.agent_output(1)[back:]
        assert cluster.agents[1] == pid and cluster.agent_running(1)
    finally:
        _delete(cluster, "default")


def test_mtu_change_applied_live_with_node_override_over_default(cluster: ClusterLab) -> None:
    pids = dict(cluster.agents)
    auto = {k: vxlan_mtu(cluster, k) for k in NODES}
    assert auto == {1: 1450, 2: 1450} and mtu_file(cluster, 1) == 1450  # fabric 1500 - VXLAN's 50
    try:
        cluster.apply(felixconfig("default", vxlanMTU=1400) + "\n---\n"
                      + felixconfig(node_config(cluster, 2), vxlanMTU=1350))
        for k, want in ((1, 1400), (2, 1350)):  # node 2's own resource beats the default
            wait_for(lambda k=k, want=want: vxlan_mtu(cluster, k) == want, 15, f"vxlan.tortie MTU {want} on {k}")
            wait_for(lambda k=k, want=want: mtu_file(cluster, k) == want, 15, f"the MTU file at {want} on {k}")
        assert "vxlanMTU = 1350 (from FelixConfiguration node." in cluster.agent_output(2)
        assert "beats FelixConfiguration default), was 0: applied live" in cluster.agent_output(2)
        assert cluster.agents == pids
    finally:
        _delete(cluster, node_config(cluster, 2))
        _delete(cluster, "default")
    for k in NODES:
        wait_for(lambda k=k: vxlan_mtu(cluster, k) == 1450 and mtu_file(cluster, k) == 1450, 15,
                 f"node {k}'s MTU back to the underlay's")


def test_env_beats_node_and_default_and_the_start_up_line_says_so(cluster: ClusterLab) -> None:
    try:
        cluster.apply(felixconfig("default", vxlanMTU=1400) + "\n---\n"
                      + felixconfig(node_config(cluster, 1), vxlanMTU=1350))
        wait_for(lambda: vxlan_mtu(cluster, 1) == 1350, 15, "node 1's own MTU")
        cluster.stop_agent(1)
        cluster.start_agent(1, env={**cluster.env, "FELIX_VXLANMTU": "1300"})
        cluster.wait_ready(1)
        wait_for(lambda: vxlan_mtu(cluster, 1) == 1300, 15, "the environment's MTU on node 1")
        assert (f"felix configuration: vxlanMTU = 1300 (from env FELIX_VXLANMTU; beats FelixConfiguration "
                f"{node_config(cluster, 1)}, FelixConfiguration default)") in cluster.agent_output(1)
        assert mtu_file(cluster, 1) == 1300
    finally:
        _delete(cluster, node_config(cluster, 1))
        _delete(cluster, "default")
        if cluster.agent_running(1):
            cluster.stop_agent(1)
        cluster.start_agent(1)  # without the variable again
        cluster.wait_ready(1)
    wait_for(lambda: vxlan_mtu(cluster, 1) == 1450, 15, "node 1's MTU back to the underlay's")


def block_of(address: str) -> str:
    return str(ipaddress.ip_network(f"{address}/26", strict=False))


def test_refresh_intervals_applied_live(cluster: ClusterLab, pods: dict[int, Pod]) -> None:
    """The agents start with Calico's periods (90 s routes, 180 s nftables): set to 1 s live, an
    out-of-band deletion of a route and of the whole table is repaired within seconds."""
    pid = cluster.agents[1]
    try:
        cluster.apply(felixconfig("default", routeRefreshInterval="1s", nftablesRefreshInterval="1s"))
        wait_for(lambda: "nftablesRefreshInterval = '1s'" in cluster.agent_output(1), 15, "the change on node 1")
        block = block_of(v4(pods[2]))
        route = cluster.route_to(1, block)
        assert "vxlan.tortie" in route
        cluster.exec(1, "ip", "route", "del", block)
        wait_for(lambda: cluster.route_to(1, block) == route, 10, "the route resync to restore the route",
                 interval=0.2)
        cluster.nft(1, "delete", "table", "inet", "tortie")
        wait_for(lambda: cluster.nft(1, "list", "table", "inet", "tortie", check=False).returncode == 0, 10,
                 "the nftables resync to restore the table", interval=0.2)
        assert cluster.agents[1] == pid
    finally:
        _delete(cluster, "default")
    wait_for(lambda: cluster.can_ping(pods[1], pods[2]), 10, "pod1 to reach pod2")


def _replies(out: Path) -> list[int]:
    return [int(n) for n in re.findall(r"icmp_seq=(\d+) ttl=", out.read_text())]


def _handover_gap(output: str) -> float:
    """Seconds from the old image's last accept (it stops to re-execute) to the new one's first."""
    def at(words: str) -> float:
        found = re.search(r"^\S+ (\d+):(\d+):(\d+),(\d+) .*" + re.escape(words), output, re.M)
        assert found, words
        h, m, sec, ms = (int(g) for g in found.groups())
        return h * 3600 + m * 60 + sec + ms / 1000

    return at("adopted its listening socket") - at("to re-execute")


class SocketProbe:
    """Connects to a CNI socket every few milliseconds until stopped; counts the refusals."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tries = 0
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                try:
                    s.connect(str(self.path))
                except OSError as e:
                    self.refused.append(f"{time.monotonic():.3f} {e}")
                self.tries += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_port_change_re_executes_the_agent_without_losing_a_ping(cluster: ClusterLab,
                                                                   pods: dict[int, Pod]) -> None:
    pid = cluster.agents[1]
    out = cluster.work / "reexec-ping.log"
    ping = cluster.lab.start_process(pods[2].netns, ["ping", "-n", "-i", "0.01", "-W", "1", v4(pods[1])], out, {})
    probe = None
    try:
        wait_for(lambda: len(_replies(out)) >= 20, 10, "the ping to get going")
        probe = SocketProbe(cluster.agent(1).cni_socket)
        before = cluster.agent_output(1).count("felix-agent started on node")
        cluster.apply(felixconfig(node_config(cluster, 1), healthPort=9199))
        # An ADD sent while the agent re-executes: queued on the handed-over socket, then served.
        during: list[Pod] = []
        adding = threading.Thread(target=lambda: during.append(cluster.add_pod(1, "during-reexec")))
        adding.start()
        wait_for(lambda: cluster.agent_output(1).count("felix-agent started on node") > before, 30,
                 "node 1's agent to start again", describe=lambda: cluster.agent_output(1)[-3000:])
        # Same PID, a new process image: it bound the new port, adopted the CNI socket, and a pod
        # can be added on the node.
        assert cluster.agents[1] == pid and cluster.agent_running(1)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"felix-agent" in f.read()
        output = cluster.agent_output(1)
        assert "healthPort = 9199 (from FelixConfiguration node." in output and "needs a restart" in output
        assert f"re-executing felix-agent (pid {pid})" in output
        assert "adopted its listening socket" in output
        wait_for(lambda: cluster.http(1, "/readiness", port=9199).status == 200, 30, "readiness on port 9199")
        assert cluster.http(1, "/liveness").status == 0  # nothing listens on 9099 any more
        probe.stop()
        assert probe.tries > 0 and probe.refused == [], probe.refused[:5]
        print(f"CNI socket not accepting for {_handover_gap(output):.2f} s across the re-exec; "
              f"{probe.tries} connects, none refused")
        adding.join(60)
        assert during, "the ADD sent during the re-exec failed"
        late = cluster.add_pod(1, "after-reexec")
        for new in (during[0], late):  # a fresh pod's first echo may go to its neighbour resolution
            wait_for(lambda new=new: cluster.can_ping(new, pods[2]), 10, f"{new.name} to reach pod2")
        last = max(_replies(out))
        wait_for(lambda: max(_replies(out)) >= last + 100, 15, "100 more replies after the re-exec")
    finally:
        if probe is not None:
            probe.stop()
        cluster.lab.stop_process(ping)
    replies = _replies(out)
    missing = sorted(set(range(min(replies), max(replies) + 1)) - set(replies))
    assert not missing, f"{len(missing)} of {max(replies)} pings lost across the re-exec: {missing[:20]}"
    # Back to the default port: one more re-exec, then the lab's own readiness check works again.
    _delete(cluster, node_config(cluster, 1))
    wait_for(lambda: cluster.readiness(1) == 200, 30, "readiness on port 9099 again")
    assert cluster.agents[1] == pid


def test_a_port_set_while_the_agent_was_down_re_executes_before_serving(cluster: ClusterLab) -> None:
    """No cached configuration (a first start), a healthPort in the datastore: the agent re-executes
    once, right after reading it, before its CNI socket or dataplane, and answers on that port."""
    name = node_config(cluster, 2)
    cluster.stop_agent(2)
    try:
        (cluster.node_dir(2) / "felixconfig.json").unlink(missing_ok=True)
        cluster.apply(felixconfig(name, healthPort=9299))
        pid = cluster.start_agent(2)
        wait_for(lambda: cluster.http(2, "/readiness", port=9299).status == 200, 30, "readiness on 9299",
                 describe=lambda: cluster.agent_output(2)[-3000:])
        output = cluster.agent_output(2)
        assert cluster.agents[2] == pid and output.count("re-executing felix-agent") == 1
        assert output.index("re-executing felix-agent") < output.index("CNI service listening")
        assert output.count("felix-agent started on node") == 1
    finally:
        _delete(cluster, name)
    wait_for(lambda: cluster.readiness(2) == 200, 30, "readiness on 9099 again")


def test_netctl_get_apply_delete_and_one_line_errors(cluster: ClusterLab) -> None:
    name = node_config(cluster, 2)
    try:
        cluster.apply(felixconfig(name, logSeverityScreen="Warning", nftablesRefreshInterval="2m",
                                  ipipMTU=1480))
        doc = json.loads(cluster.netctl("get", "felixconfig", name, "-o", "json").stdout)
        assert doc["spec"] == {"logSeverityScreen": "Warning", "nftablesRefreshInterval": "2m", "ipipMTU": 1480}
        assert "logSeverityScreen: Warning" in cluster.get_yaml("FelixConfiguration", name)
        assert name in cluster.netctl("get", "felixconfigurations").stdout
        bad = cluster.work / "bad-felixconfig.yaml"
        for spec, words in (({"vxlanMTU": 100}, "vxlanMTU 100"),
                            ({"routeRefreshInterval": "often"}, "routeRefreshInterval 'often'"),
                            ({"logSeverityScreen": "Loud"}, "logSeverityScreen 'Loud'"),
                            ({"healthPort": 99999}, "healthPort 99999"),
                            ({"vxlanMtu": 1400}, "vxlanMtu")):
            bad.write_text(felixconfig(name, **spec))
            done = cluster.netctl("apply", "-f", str(bad), check=False)
            assert done.returncode == 1 and words in done.stderr, (spec, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        # Nothing changed by the refused documents.
        again = json.loads(cluster.netctl("get", "felixconfig", name, "-o", "json").stdout)
        assert again["spec"] == doc["spec"]
        cluster.delete("felixconfig", name, missing_ok=False)
        gone = cluster.netctl("get", "felixconfig", name, check=False)
        assert gone.returncode == 1 and "does not exist" in gone.stderr
    finally:
        cluster.netctl("delete", "felixconfig", name, check=False)
