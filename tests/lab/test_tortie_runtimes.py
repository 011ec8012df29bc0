"""Real CNI clients driving the `tortie` plugin in a `netlab` lab: the libcni client (ADD, CHECK,
DEL of `tortie` + the reference `portmap` + `bandwidth`) and podman 4.3 (two busybox containers on
a Tortie network that ping each other).

The runtime's namespace is lab node n1's: the clients run there (`nsenter`), so the plugins, the
host ends of the veths, portmap's iptables rules and bandwidth's ifb all live in it, and felix-agent
can serve the delegated path from there too. (The reference `bridge` + `tortie-ipam` case lives in
test_reference_plugins.py.) Timings are printed, never asserted.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab.runtimes import (
    Podman,
    libcni,
    path_without_ip6tables,
    run_two_containers_and_ping,
)
from tests.lab.tortie_support import POOL_V4, TortieLab, host_ifname

pytestmark = pytest.mark.lab

PORT_MAPPINGS = [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]
BANDWIDTH = {"ingressRate": 8_000_000, "ingressBurst": 800_000, "egressRate": 8_000_000, "egressBurst": 800_000}


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="tr", plugins=["portmap", "bandwidth"]) as tl:
        yield tl


@pytest.fixture(autouse=True)
def empty_node(tl: TortieLab) -> Iterator[None]:
    yield
    tl.reset()


def nat_rules(tl: TortieLab) -> str:
    return tl.exec(1, "iptables", "-w", "-t", "nat", "-S").stdout


def links_of_kind(tl: TortieLab, kind: str) -> list[str]:
    return tl.exec(1, "ip", "-o", "link", "show", "type", kind).stdout.splitlines()


# --------------------------------------------------------------------------------------------
# libcni


def test_libcni_add_check_del_with_portmap_and_bandwidth(tl: TortieLab, cnic: Path, path: str) -> None:
    # An IPv4-only attachment, with the two workarounds test_runtimes.py documents for the reference
    # plugins 1.1.1: ip6tables kept off PATH (portmap's CHECK of an IPv4-only attachment looks for
    # an IPv6 chain it never made while ip6tables is usable, containernetworking/plugins#819), and
    # the bandwidth capability always given (bandwidth's CHECK panics without it, plugins#1221).
    conflist = tl.conflist(ipv6=False, chained=[
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "bandwidth", "capabilities": {"bandwidth": True}},
    ])
    conflist_path = tl.work / f"libcni-{path}.conflist"
    conflist_path.write_text(json.dumps(conflist))
    cache = tl.work / f"libcni-cache-{path}"
    env = {"PATH": path_without_ip6tables(tl.work / "bin-no-ip6tables")}
    container_id = secrets.token_hex(32)
    host_if = host_ifname(container_id)

    with tl.sandbox() as box:
        def call(cmd: str) -> subprocess.CompletedProcess[str]:
            return libcni(cnic, cmd, conflist_path, box.path, container_id=container_id, cni_path=tl.cni_path,
                          cache_dir=cache, in_netns=tl.node(1).netns,
                          cap_args={"portMappings": PORT_MAPPINGS, "bandwidth": BANDWIDTH},
                          args={"K8S_POD_NAME": "libcni", "K8S_POD_NAMESPACE": "default"}, env=env)

        started = time.perf_counter()
        add = call("add")
        add_seconds = time.perf_counter() - started
        try:
            assert add.returncode == 0, add.stderr
            result = json.loads(add.stdout)
            # The chain's final result still carries tortie's interfaces and addresses.
            assert [i["name"] for i in result["interfaces"]][:2] == [host_if, "eth0"]
            assert result["interfaces"][1]["sandbox"] == box.path
            (ip,) = result["ips"]
            address = ipaddress.ip_interface(ip["address"])
            assert address.network.prefixlen == 32 and address.ip in ipaddress.ip_network(POOL_V4)
            assert ip["interface"] == 1
            assert f"inet {address}" in box.exec("ip", "-o", "-4", "address", "show", "eth0").stdout
            assert tl.lab.ping(tl.node(1).netns, str(address.ip))
            (endpoint,) = tl.endpoints()
            assert endpoint["spec"]["containerID"] == container_id and endpoint["spec"]["pod"] == "libcni"
            assert (cache / "results" / f"{conflist['name']}-{container_id}-eth0").exists()  # DEL's prevResult
            assert "--dport 18080" in nat_rules(tl) and f"{address.ip}:80" in nat_rules(tl)
            assert links_of_kind(tl, "ifb"), "bandwidth made no ifb for egress shaping"
            assert "tbf" in tl.exec(1, "tc", "qdisc", "show", "dev", host_if).stdout

            checked = call("check")
            assert checked.returncode == 0, checked.stderr
            tl.exec(1, "ip", "route", "del", f"{address.ip}/32")
            broken = call("check")
            assert broken.returncode != 0 and "host route" in broken.stderr, broken.stderr
        finally:
            started = time.perf_counter()
            dels = [call("del"), call("del")]  # DEL runs even after a failed ADD, and is idempotent
            del_seconds = time.perf_counter() - started
    print(f"\n[libcni, {path}] ADD {add_seconds * 1000:.0f} ms, 2xDEL {del_seconds * 1000:.0f} ms")
    for d in dels:
        assert d.returncode == 0, d.stderr
    assert tl.tor_links() == []
    assert links_of_kind(tl, "ifb") == []
    assert "18080" not in nat_rules(tl)
    assert tl.count_handles() == 0 and tl.endpoints() == []
    assert not (cache / "results" / f"{conflist['name']}-{container_id}-eth0").exists()


# --------------------------------------------------------------------------------------------
# podman 4.3


@pytest.fixture
def podman_tools() -> None:
    missing = [tool for tool in ("podman", "runc", "conmon", "nsenter")
               if shutil.which(tool) is None and not Path(f"/usr/bin/{tool}").exists()]
    if missing:
        pytest.skip(f"{missing} not installed: apt-get install podman runc conmon")


def test_podman_two_containers_ping_on_a_tortie_network(tl: TortieLab, podman_tools: None, path: str) -> None:
    # On the delegated path the agent runs in the runtime namespace, where podman runs the plugin.
    adds_before = tl.agent_output().count(" ADD ")
    name = f"{tl.lab.name}-podnet"
    conflist: dict[str, Any] = tl.conflist(name=name, ipv6=False)
    with tempfile.TemporaryDirectory(prefix=f"tortie-podman-{tl.lab.name}-") as work:
        net_dir = Path(work) / "net.d"
        net_dir.mkdir()
        (net_dir / f"{name}.conflist").write_text(json.dumps(conflist))
        podman = Podman(Path(work) / "podman", tl.node(1).netns, net_dir, tl.cni_path)
        try:
            podman.import_busybox()
            report = run_two_containers_and_ping(podman, name)
            print(f"\n[podman, {path}] podman run -d: " + ", ".join(f"{s * 1000:.0f} ms" for s in report.run_seconds))
            assert len(set(report.addresses)) == 2
            assert all(ipaddress.ip_address(a) in ipaddress.ip_network(POOL_V4) for a in report.addresses)
            assert report.all_pinged, [p.stdout + p.stderr for p in report.pings]
            assert podman.call("ps", "--all", "--quiet", check=True).stdout.strip() == ""
        finally:
            problems = podman.cleanup()
    assert problems == []
    if path == "agent":
        assert tl.agent_output().count(" ADD ") - adds_before == 2, "the agent did not serve podman's two ADDs"
    # Removing the containers ran the CNI DELs: nothing of theirs is left.
    assert tl.tor_links() == []
    assert tl.count_handles() == 0 and tl.endpoints() == []
    assert not any(Path("/sys/fs/cgroup").glob(f"*{podman.cgroup_parent}"))
