"""Real CNI clients (a libcni client and podman 4.3) driving plugin chains, proved here against the
reference plugins; a Tortie case is one more entry in ``CONFLISTS`` / ``NETWORKS``.

The runtime's network domain is a namespace the test makes (host ends of veths, bridges, portmap's
iptables rules, bandwidth's ifb); the clients run inside it, so the root namespace is never touched.
Timings are printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netlab.cni import REFERENCE_PLUGINS
from netlab.runtimes import (
    Podman,
    libcni,
    path_without_ip6tables,
    run_two_containers_and_ping,
)

pytestmark = pytest.mark.lab

PORTMAP_ARGS: dict[str, Any] = {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}
BANDWIDTH = {"ingressRate": 8_000_000, "ingressBurst": 800_000, "egressRate": 8_000_000, "egressBurst": 800_000}


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def need_reference_plugins(*names: str) -> None:
    missing = [n for n in names if not (REFERENCE_PLUGINS / n).exists()]
    if missing:
        pytest.skip(f"reference plugins {missing} missing in {REFERENCE_PLUGINS}: install containernetworking-plugins")


@dataclass
class Lab:
    """A runtime namespace, a container namespace and a private directory, all with unique names."""

    work: Path
    host: str
    container: str

    @property
    def container_path(self) -> str:
        return f"/run/netns/{self.container}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces and runs CNI plugins")
    tag = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix=f"tortie-rt-{tag}-") as work:
        lab = Lab(Path(work), f"trt-{tag}-host", f"trt-{tag}-c1")
        try:
            sh("ip", "netns", "add", lab.host)
            sh("ip", "-n", lab.host, "link", "set", "lo", "up")
            sh("ip", "netns", "add", lab.container)
            yield lab
        finally:
            for ns in (lab.container, lab.host):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# --------------------------------------------------------------------------------------------
# (a) the libcni client: ADD, CHECK, DEL of a chain


def reference_ptp_chain(name: str, ipam_dir: Path) -> dict[str, Any]:
    """ptp + host-local, then portmap and bandwidth fed by capability args."""
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": False,
                "mtu": 1500,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": "10.218.0.0/24", "gateway": "10.218.0.1"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }


CONFLISTS: dict[str, tuple[Callable[[str, Path], dict[str, Any]], list[Path]]] = {
    # id: (conflist factory, CNI_PATH)
    "reference-ptp-portmap-bandwidth": (reference_ptp_chain, [REFERENCE_PLUGINS]),
}


def host_links(lab: Lab, kind: str) -> list[str]:
    return sh("ip", "-n", lab.host, "-o", "link", "show", "type", kind).splitlines()


def pings(netns: str, address: str) -> bool:
    ping = ["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "2", address]
    return subprocess.run(ping, capture_output=True).returncode == 0


def nat_rules(lab: Lab) -> str:
    return sh("ip", "netns", "exec", lab.host, "iptables", "-w", "-t", "nat", "-S")


@pytest.mark.parametrize(
    ("cap_args", "check"),
    [
        ({**PORTMAP_ARGS, "bandwidth": BANDWIDTH}, True),
        # bandwidth 1.1.1 panics on a CHECK without runtimeConfig.bandwidth (plugins#1221, fixed in 1.9.1)
        (PORTMAP_ARGS, False),
    ],
    ids=["portmap+bandwidth", "portmap-only-no-check"],
)
@pytest.mark.parametrize("chain", list(CONFLISTS))
def test_libcni_add_check_del(lab: Lab, cnic: Path, chain: str, cap_args: dict[str, Any], check: bool) -> None:
    need_reference_plugins("ptp", "host-local", "portmap", "bandwidth")
    factory, cni_path = CONFLISTS[chain]
    name = f"{lab.host}-net"
    conflist = factory(name, lab.work / "ipam")
    conflist_path = lab.work / f"{name}.conflist"
    conflist_path.write_text(json.dumps(conflist))
    cache = lab.work / "cache"
    container_id = f"{lab.container}-id"
    # portmap 1.1.1's CHECK is broken for IPv4-only attachments while ip6tables works (plugins#819)
    env = {"PATH": path_without_ip6tables(lab.work / "bin")}

    def call(cmd: str) -> subprocess.CompletedProcess[str]:
        return libcni(
            cnic,
            cmd,
            conflist_path,
            lab.container_path,
            container_id=container_id,
            cni_path=cni_path,
            cache_dir=cache,
            in_netns=lab.host,
            cap_args=cap_args,
            env=env,
        )

    started = time.perf_counter()
    add = call("add")
    add_seconds = time.perf_counter() - started
    try:
        assert add.returncode == 0, add.stderr
        result = json.loads(add.stdout)
        address = ipaddress.ip_interface(result["ips"][0]["address"])
        assert any(i.get("sandbox") == lab.container_path and i["name"] == "eth0" for i in result["interfaces"])
        assert str(address) in sh("ip", "-n", lab.container, "-o", "-4", "addr", "show", "eth0")
        gateway = result["ips"][0]["gateway"]
        assert pings(lab.container, gateway)
        assert (cache / "results" / f"{name}-{container_id}-eth0").exists()  # DEL's prevResult
        assert "--dport 18080" in nat_rules(lab)  # portmap's DNAT, in the runtime namespace
        if "bandwidth" in cap_args:
            assert host_links(lab, "ifb"), "bandwidth made no ifb for egress shaping"
            assert "tbf" in sh("tc", "-n", lab.host, "qdisc", "show")

        if check:
            checked = call("check")
            assert checked.returncode == 0, checked.stderr
    finally:
        started = time.perf_counter()
        dels = [call("del"), call("del")]  # DEL runs even after a failed ADD, and is idempotent
        del_seconds = time.perf_counter() - started
    print(f"\n[{chain}/{'+'.join(cap_args)}] libcni ADD {add_seconds * 1000:.1f} ms, 2xDEL {del_seconds * 1000:.1f} ms")
    for d in dels:
        assert d.returncode == 0, d.stderr
    assert host_links(lab, "veth") == []
    assert host_links(lab, "ifb") == []
    assert "18080" not in nat_rules(lab)
    assert "eth0" not in sh("ip", "-n", lab.container, "-o", "link")
    assert not (cache / "results" / f"{name}-{container_id}-eth0").exists()
    assert not any(p.name[0].isdigit() for p in (lab.work / "ipam" / name).iterdir())  # host-local released it
    after = call("check")
    assert after.returncode == 1 and after.stderr.strip()  # nothing left to check; the error reaches stderr


# --------------------------------------------------------------------------------------------
# (b) podman 4.3: two containers on one CNI network ping each other


def reference_bridge_network(name: str, ipam_dir: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": f"trt{uuid.uuid4().hex[:8]}",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": "10.219.0.0/24", "gateway": "10.219.0.1"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
        ],
    }


NETWORKS: dict[str, tuple[Callable[[str, Path], dict[str, Any]], list[Path]]] = {
    # id: (conflist factory, podman's cni_plugin_dirs)
    "reference-bridge": (reference_bridge_network, [REFERENCE_PLUGINS]),
}


@pytest.fixture
def podman_tools() -> None:
    missing = [
        tool
        for tool in ("podman", "runc", "conmon", "nsenter")
        if shutil.which(tool) is None and not Path(f"/usr/bin/{tool}").exists()
    ]
    if missing:
        pytest.skip(f"{missing} not installed: apt-get install podman runc conmon")


@pytest.mark.parametrize("network", list(NETWORKS))
def test_podman_two_containers_ping(lab: Lab, podman_tools: None, network: str) -> None:
    need_reference_plugins("bridge", "host-local")
    factory, plugin_dirs = NETWORKS[network]
    name = f"{lab.host}-pod"
    net_dir = lab.work / "net.d"
    net_dir.mkdir()
    (net_dir / f"{name}.conflist").write_text(json.dumps(factory(name, lab.work / "ipam")))

    podman = Podman(lab.work / "podman", lab.host, net_dir, plugin_dirs)
    try:
        podman.import_busybox()
        report = run_two_containers_and_ping(podman, name)
        print(f"\n[{network}] podman run -d: " + ", ".join(f"{s * 1000:.0f} ms" for s in report.run_seconds))
        assert len(set(report.addresses)) == 2
        assert all(ipaddress.ip_address(a) in ipaddress.ip_network("10.219.0.0/24") for a in report.addresses)
        assert report.all_pinged, [p.stdout + p.stderr for p in report.pings]
        assert host_links(lab, "veth") == []  # removal ran the CNI DELs
        assert podman.call("ps", "--all", "--quiet", check=True).stdout.strip() == ""
    finally:
        problems = podman.cleanup()
    assert problems == []
    assert not (lab.work / "podman").exists()
    assert not any(Path("/sys/fs/cgroup").glob(f"*{podman.cgroup_parent}"))
