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
from netlab.cluster import bgp_speaker_available, ipip_available
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
                        (["lab", "exec", "--name", name, "n1", "--", "true"], "no lab named")):
        done = netctl(*args, check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and words in done.stderr, (args, done.stderr)
    if not ipip_available():
        done = netctl("lab", "up", "--name", name, "--mode", "ipip", check=False)
        assert done.returncode == 1 and "run_in_ipip_vm.sh" in done.stderr, done.stderr
        assert_gone(name)
