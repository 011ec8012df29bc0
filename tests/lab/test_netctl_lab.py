"""`netctl lab`: a persistent multi-node lab driven through the CLI, as a newcomer uses it.

Every command runs as its own `netctl` process, so the lab must survive the process that built it
and be found again from its state files. Each lab has a unique name and is taken down at the end of
its test even when the test fails; every check of "no trace left" looks only at the lab's own names.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import textwrap
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab import netns as ip_netns
from netlab.cluster import Cluster, bgp_speaker_available, conflist, ipip_available
from netlab.cni import REFERENCE_PLUGINS, Attachment, exec_plugin, network_config
from netlab.etcd import ETCD
from netlab.lab import STATE_ROOT, destroy_by_name

pytestmark = pytest.mark.lab

NETCTL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "netctl"
POLICY = textwrap.dedent("""\
    apiVersion: tortie.dev/v1
    kind: NetworkPolicy
    metadata: {name: pod4-web, namespace: default}
    spec:
      selector: tortie.dev/name == 'pod4'
      ingress:
      - action: Allow
        protocol: TCP
        source: {selector: tortie.dev/name == 'pod1'}
        destination: {ports: [80]}
    """)


@pytest.fixture(scope="module", autouse=True)
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: netctl lab makes network namespaces")
    if not ETCD.exists():
        pytest.skip(f"{ETCD} is missing: install etcd-server (scripts/install-deps.sh)")


@pytest.fixture
def lab_names() -> Iterator[Callable[..., str]]:
    """Hands out unique lab names and takes every one of those labs down afterwards."""
    names: list[str] = []

    def make(suffix: str = "") -> str:
        name = (names[0] if suffix else f"lt{secrets.token_hex(3)}") + suffix
        names.append(name)
        return name

    yield make
    for name in names:
        destroy_by_name(name)


def netctl(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(NETCTL), *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"netctl {' '.join(args)} exited {done.returncode}:\n{done.stderr}{done.stdout}")
    return done


def status(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(netctl("lab", "status", "--name", name, "-o", "json").stdout)
    return doc


def matrix(name: str, *extra: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(netctl("lab", "matrix", "--name", name, "-o", "json", *extra).stdout)
    return doc


def all_allowed(doc: dict[str, Any]) -> bool:
    return all(ok for per_source in doc["results"].values() for row in per_source.values() for ok in row.values())


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last value {value!r}")
        time.sleep(0.2)
    return value


def traces(name: str) -> dict[str, list[str]]:
    """Whatever of lab ``name`` is still on the machine: namespaces, processes, root links, files.
    (Names as the lab makes them: lab ``a``'s are not lab ``a-2``'s.)"""
    own = re.compile(rf"\b{re.escape(name)}-(fabric|etcd\d+|n\d+|p[0-9a-f]{{8}})\b")
    processes = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"{STATE_ROOT}/{name}/" in cmdline or own.search(cmdline):
                processes.append(f"{proc.name}: {cmdline[:200]}")
    links = [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
             if own.search(line)]
    return {"namespaces": [ns for ns in ip_netns.names() if own.fullmatch(ns)],
            "processes": processes, "root links": links,
            "files": [str(STATE_ROOT / name)] if (STATE_ROOT / name).exists() else []}


def assert_gone(name: str) -> None:
    left = traces(name)
    assert not any(left.values()), f"lab {name} left traces: {left}"


def test_vxlan_lab_up_status_matrix_explain_down(lab_names: Callable[..., str], tmp_path: Path) -> None:
    name = lab_names()
    up = netctl("lab", "up", "--name", name, "--nodes", "3", "--mode", "vxlan", "--pods-per-node", "2")
    for phase in ("certificates", "etcd", "nodes", "bgp sessions", "pods"):
        assert phase in up.stderr, up.stderr
    assert "bgp sessions  n/a" in up.stderr  # no BGP in vxlan mode, and it says so

    doc = status(name)
    assert doc["mode"] == "vxlan" and doc["complete"]
    assert [n["name"] for n in doc["nodes"]] == ["n1", "n2", "n3"]
    assert all(n["agentRunning"] and n["ready"] for n in doc["nodes"]), doc["nodes"]
    assert doc["bgp"]["note"].startswith("n/a")
    (pool,) = doc["pools"]
    assert pool["cidr"] == "10.244.0.0/16" and pool["inUse"] >= 6  # six pods (and the nodes' VTEPs)
    assert sorted(p["node"] for p in doc["pods"]) == ["n1", "n1", "n2", "n2", "n3", "n3"]
    assert all(len(p["addresses"]) == 1 for p in doc["pods"])
    text = netctl("lab", "status", "--name", name).stdout
    assert "default-ipv4" in text and "pod6" in text and "\033[" not in text

    assert netctl("lab", "exec", "--name", name, "n1", "--", "netctl", "get", "ippool", "-o", "json").returncode == 0
    exports = netctl("lab", "env", "--name", name, "n2").stdout
    assert "export ETCD_ENDPOINTS=https://" in exports and f"{STATE_ROOT}/{name}/pki/n2.pem" in exports

    before = matrix(name, "--port", "80")
    assert before["probes"] == ["icmp", "tcp:80"] and all_allowed(before), before

    policy = STATE_ROOT / name / "test-policy.yaml"
    policy.write_text(POLICY)
    netctl("lab", "exec", "--name", name, "n1", "--", "netctl", "apply", "-f", str(policy))

    def denied_as_the_policy_says() -> dict[str, Any] | None:
        doc = matrix(name, "--port", "80")
        icmp, tcp = doc["results"]["icmp"], doc["results"]["tcp:80"]
        ok = all(icmp[a]["pod4"] is False and tcp[a]["pod4"] is (a == "pod1") for a in doc["pods"] if a != "pod4")
        others = all(icmp[a][b] and tcp[a][b] for a in doc["pods"] for b in doc["pods"] if b not in (a, "pod4"))
        return doc if ok and others else None

    wait_until(denied_as_the_policy_says, 20, "the matrix to show the policy")

    explained = json.loads(netctl("lab", "matrix", "--name", name, "--explain", "pod2", "pod4", "--port", "80",
                                  "-o", "json").stdout)
    icmp, tcp = explained
    assert not icmp["allowed"] and "np/default/pod4-web" in icmp["ingress"]["reason"]
    assert "default deny" in icmp["ingress"]["reason"]
    assert icmp["egress"]["allowed"] and "no policy selects the source" in icmp["egress"]["reason"]
    assert not tcp["allowed"]
    allowed = json.loads(netctl("lab", "matrix", "--name", name, "--explain", "pod1", "pod4", "--port", "80",
                                "-o", "json").stdout)[1]
    assert allowed["allowed"] and allowed["ingress"]["policy"] == "np/default/pod4-web"
    assert allowed["ingress"]["rule"] == 0
    open_pair = netctl("lab", "matrix", "--name", name, "--explain", "pod1", "pod3").stdout
    assert "default: no policy selects the destination; allowed by profile pro/net." in open_pair

    picture = tmp_path / "matrix.svg"
    table = netctl("lab", "matrix", "--name", name, "--port", "80", "--output", str(picture)).stdout
    assert "deny" in table and "allow" in table and "\033[" not in table  # no colour when not a terminal
    root = ElementTree.parse(picture).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(root.findall("{http://www.w3.org/2000/svg}rect")) == 1 + 2 * 36  # background, 2 probes × 6 × 6

    removed = netctl("lab", "down", "--name", name).stdout
    assert "removed" in removed
    assert_gone(name)
    assert "nothing to remove" in netctl("lab", "down", "--name", name).stdout
    gone = netctl("lab", "status", "--name", name, check=False)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1 and "no lab named" in gone.stderr


@pytest.mark.parametrize("mode", ["bgp", "bgp-rr"])
def test_bgp_lab_up_status_matrix_down(lab_names: Callable[..., str], mode: str) -> None:
    if not bgp_speaker_available():
        pytest.skip("felix-agent has no BGP speaker yet (no --bgp option): no BGP sessions to show")
    name = lab_names()
    up = netctl("lab", "up", "--name", name, "--nodes", "3", "--mode", mode, "--pods-per-node", "1")
    assert "bgp sessions  [" in up.stderr and "Established" in up.stderr, up.stderr
    doc = status(name)
    assert all(n["ready"] for n in doc["nodes"])
    sessions = doc["bgp"]["sessions"]
    established = {node: sorted(s["peerAddress"] for s in peers if s["state"] == "Established")
                   for node, peers in sessions.items()}
    if mode == "bgp":  # a full mesh
        assert established == {"n1": ["198.18.0.12", "198.18.0.13"], "n2": ["198.18.0.11", "198.18.0.13"],
                               "n3": ["198.18.0.11", "198.18.0.12"]}, sessions
    else:  # n1 reflects for the others, which peer with it only
        assert established == {"n1": ["198.18.0.12", "198.18.0.13"], "n2": ["198.18.0.11"],
                               "n3": ["198.18.0.11"]}, sessions
    routes = netctl("lab", "exec", "--name", name, "n2", "--", "ip", "route", "show", "proto", "81").stdout
    assert routes.count("via 198.18.0.") == 2, routes  # the other nodes' blocks, learned over BGP
    assert all_allowed(matrix(name))
    netctl("lab", "down", "--name", name)
    assert_gone(name)


def test_down_after_up_killed_during_pods(lab_names: Callable[..., str]) -> None:
    name = lab_names()
    proc = subprocess.Popen([str(NETCTL), "lab", "up", "--name", name, "--pods-per-node", "6"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = STATE_ROOT / name / "cluster.json"

    def some_pods() -> bool:
        try:
            return len(json.loads(state.read_text())["pods"]) >= 2
        except (OSError, ValueError, KeyError):
            return proc.poll() is not None

    try:
        wait_until(some_pods, 120, "the pods phase")
        assert proc.poll() is None, f"lab up ended before it could be killed:\n{proc.communicate()[1]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert traces(name)["namespaces"] and traces(name)["processes"]  # what the killed run left behind
    assert "did not finish" in netctl("lab", "status", "--name", name).stdout
    netctl("lab", "down", "--name", name)
    assert_gone(name)


def test_two_labs_side_by_side(lab_names: Callable[..., str]) -> None:
    first = lab_names()
    second = lab_names("-2")  # a name that starts with the first's: teardown must tell them apart
    netctl("lab", "up", "--name", first, "--pods-per-node", "1")
    netctl("lab", "up", "--name", second, "--pods-per-node", "1", "--nodes", "2")
    assert [n["address"] for n in status(second)["nodes"]] == ["198.18.0.11", "198.18.0.12"]  # same underlay, apart

    deny_all = STATE_ROOT / first / "deny.yaml"
    deny_all.write_text("apiVersion: tortie.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: deny-all}\n"
                        "spec: {selector: all(), types: [Ingress]}\n")
    netctl("lab", "exec", "--name", first, "n1", "--", "netctl", "apply", "-f", str(deny_all))
    wait_until(lambda: not any(ok for row in matrix(first)["results"]["icmp"].values() for ok in row.values()),
               20, f"lab {first} to deny everything")
    assert all_allowed(matrix(second))  # the other lab's datastore and dataplane are its own
    why = netctl("lab", "matrix", "--name", first, "--explain", "pod1", "pod2").stdout
    assert "DENIED" in why and "default deny: policy gnp/deny-all selects the destination" in why, why
    assert "no policy selects" in netctl("lab", "matrix", "--name", second, "--explain", "pod1", "pod2").stdout

    netctl("lab", "down", "--name", first)
    assert_gone(first)
    doc = status(second)
    assert all(n["ready"] for n in doc["nodes"]) and len(doc["pods"]) == 2
    assert all_allowed(matrix(second))
    netctl("lab", "down", "--name", second)
    assert_gone(second)


def test_errors_are_one_line(lab_names: Callable[..., str]) -> None:
    name = lab_names()
    for args, words in ((["lab", "status", "--name", name], "no lab named"),
                        (["lab", "up", "--name", "Not_A_Name"], "invalid lab name"),
                        (["lab", "matrix", "--name", name, "--output", "x.png"], ".svg"),
                        (["lab", "exec", "--name", name, "n1", "--", "true"], "no lab named"),
                        (["lab", "stop", "--name", name, "n1"], "no lab named"),
                        (["lab", "restart", "--name", name, "n1"], "no lab named")):
        done = netctl(*args, check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and words in done.stderr, (args, done.stderr)
    if not ipip_available():
        done = netctl("lab", "up", "--name", name, "--mode", "ipip", check=False)
        assert done.returncode == 1 and "run_in_ipip_vm.sh" in done.stderr, done.stderr
        assert_gone(name)


def ping(netns: str, address: str) -> bool:
    done = subprocess.run(ip_netns.exec_argv(netns, ["ping", "-q", "-n", "-c", "1", "-W", "2", address]),
                          capture_output=True, text=True, timeout=10)
    return done.returncode == 0


def nodes_of(name: str) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in status(name)["nodes"]}


def add_pod(name: str, node: str, pod: str) -> tuple[str, str]:
    """A new pod on ``node`` of a running lab through the tortie plugin, as the lab's runtime makes
    them (in a namespace named as the lab's pods, so that its teardown takes it); its netns and IPv4."""
    lab = Cluster.load(name)
    info = lab.node(node)
    container_id = secrets.token_hex(32)
    netns = f"{name}-p{container_id[:8]}"
    ip_netns.add(netns)
    bin_dir = lab.work_dir / "cni" / "bin"
    attachment = Attachment(container_id, str(ip_netns.path(netns)), "eth0",
                            {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": pod})
    done = exec_plugin(bin_dir / "tortie", "ADD", network_config(conflist(lab, info), 0), attachment,
                       cni_path=[bin_dir, REFERENCE_PLUGINS], in_netns=info.netns)
    assert done.ok, f"ADD of {pod} on {node}: {done.stdout}{done.stderr}"
    (address,) = [a.split("/")[0] for a in done.addresses() if ":" not in a]
    return netns, address


def test_stop_and_restart_an_agent(lab_names: Callable[..., str], tmp_path: Path) -> None:
    name = lab_names()
    netctl("lab", "up", "--name", name, "--nodes", "2", "--pods-per-node", "1")
    pods = {p["name"]: p for p in status(name)["pods"]}
    (pod1, pod2) = (pods["pod1"], pods["pod2"])
    assert (pod1["node"], pod2["node"]) == ("n1", "n2")
    ip1, ip2 = (p["addresses"][0].split("/")[0] for p in (pod1, pod2))
    first = nodes_of(name)["n2"]["agentPid"]

    # Stop: the agent is gone, status says so, and the dataplane it programmed stays.
    stopped = netctl("lab", "stop", "--name", name, "n2").stdout
    assert f"pid {first}" in stopped, stopped
    assert ip_netns.start_time(first) is None
    n2 = nodes_of(name)["n2"]
    assert (n2["agentRunning"], n2["agentPid"], n2["ready"]) == (False, None, False), n2
    assert nodes_of(name)["n1"]["agentRunning"]
    assert re.search(r"^n2 .* stopped +no$", netctl("lab", "status", "--name", name).stdout, re.M)
    wait_until(lambda: ping(pod1["netns"], ip2) and ping(pod2["netns"], ip1), 20, "the pods to reach each other")
    addr = netctl("lab", "exec", "--name", name, "pod2", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert f"inet {ip2}/" in addr, addr  # it keeps its address
    assert "was not running" in netctl("lab", "stop", "--name", name, "n2").stdout

    # Restart: running and ready under a new PID; a new pod on that node gets an address and pings.
    restarted = netctl("lab", "restart", "--name", name, "n2").stdout
    n2 = nodes_of(name)["n2"]
    assert n2["agentRunning"] and n2["ready"] and n2["agentPid"] not in (None, first), n2
    assert f"pid {n2['agentPid']}" in restarted
    assert f"running (pid {n2['agentPid']})" in netctl("lab", "status", "--name", name).stdout
    netns3, ip3 = add_pod(name, "n2", "pod3")
    assert ip3 not in (ip1, ip2)
    wait_until(lambda: ping(netns3, ip1) and ping(pod1["netns"], ip3) and ping(netns3, ip2), 20,
               "the new pod to reach the others")

    # Killed and restarted by hand with the same command line and environment: status finds the
    # new process by the CNI socket it listens on, and `lab stop` stops that one.
    agent = n2["agentPid"]
    argv = (Path(f"/proc/{agent}/cmdline").read_bytes().rstrip(b"\0").split(b"\0"))
    environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{agent}/environ").read_bytes().split(b"\0") if item)
    os.kill(agent, signal.SIGKILL)
    wait_until(lambda: not nodes_of(name)["n2"]["agentRunning"], 20, "status to show the killed agent stopped")
    with (tmp_path / "agent.log").open("wb") as log:
        by_hand = subprocess.Popen(ip_netns.exec_argv(n2["netns"], [a.decode() for a in argv]),
                                   env={k.decode(): v.decode() for k, v in environ.items()},
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        found = wait_until(lambda: nodes_of(name)["n2"] if nodes_of(name)["n2"]["ready"] else None, 120,
                           "status to find the agent started by hand")
        assert found["agentRunning"] and found["agentPid"] == by_hand.pid, (found, by_hand.pid)
        assert f"pid {by_hand.pid}" in netctl("lab", "stop", "--name", name, "n2").stdout
        assert by_hand.wait(timeout=10) is not None
        assert not nodes_of(name)["n2"]["agentRunning"]
    finally:
        if by_hand.poll() is None:
            by_hand.kill()
        by_hand.wait()
    netctl("lab", "down", "--name", name)
    assert_gone(name)
