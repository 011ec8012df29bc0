"""The veth/route wiring of one container, in real namespaces.

The "host" is a namespace the test makes (with an uplink carrying the node's addresses and the
default routes); the containers are namespaces too. The wiring functions run with the test's
thread inside the host namespace, so nothing touches the root namespace.
"""

from __future__ import annotations

import ipaddress
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from cni_plugins import wiring
from cni_plugins.naming import host_ifname
from cni_plugins.wiring import InterfaceExists, NetnsNotFound, WiringError
from kernel import netns as namespaces
from kernel.netns import netns

pytestmark = pytest.mark.lab

NODE_V4, NODE_V6 = "192.0.2.1", "fd00:99::1"
MTU = 1450


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def addrs(*text: str) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    return [ipaddress.ip_interface(t) for t in text]


@dataclass
class Lab:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    made: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"tw-{self.tag}-host"

    def path(self, name: str) -> str:
        return f"/run/netns/{name}"

    def add_ns(self, suffix: str) -> str:
        name = f"tw-{self.tag}-{suffix}"
        sh("ip", "netns", "add", name)
        self.made.append(name)
        return name

    def in_host(self, *argv: str) -> str:
        return sh("ip", "-n", self.host, *argv)

    def host_ifs(self) -> list[str]:
        with netns(self.path(self.host)):
            return wiring.list_host_ifs()

    def delete(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    lab = Lab()
    try:
        lab.add_ns("host")
        lab.in_host("link", "set", "lo", "up")
        # A node's uplink: its own addresses, and the default routes that make proxy ARP answer for 169.254.1.1.
        # (A veth pair stands in for the NIC: the lab kernel has no dummy driver.)
        lab.in_host("link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1")
        lab.in_host("link", "set", "uplink1", "up")
        lab.in_host("link", "set", "uplink0", "up")
        lab.in_host("addr", "add", f"{NODE_V4}/32", "dev", "uplink0")
        lab.in_host("addr", "add", f"{NODE_V6}/128", "dev", "uplink0", "nodad")
        lab.in_host("route", "add", "default", "dev", "uplink0")
        lab.in_host("-6", "route", "add", "default", "dev", "uplink0")
        yield lab
    finally:
        lab.delete()


def ping(src_ns: str, address: str) -> bool:
    argv = ["ip", "netns", "exec", src_ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", address]
    return subprocess.run(argv, capture_output=True).returncode == 0


def test_netns_always_returns_to_the_original_namespace(lab: Lab) -> None:
    before = os.readlink("/proc/thread-self/ns/net")
    with pytest.raises(RuntimeError), netns(lab.path(lab.host)):
        assert os.readlink("/proc/thread-self/ns/net") != before
        raise RuntimeError("boom")
    assert os.readlink("/proc/thread-self/ns/net") == before
    with pytest.raises(namespaces.NetnsNotFound), netns(lab.path("tw-nonexistent")):
        pass
    assert os.readlink("/proc/thread-self/ns/net") == before


def test_two_containers_reach_each_other_and_the_host(lab: Lab) -> None:
    c1, c2 = lab.add_ns("c1"), lab.add_ns("c2")
    a1 = addrs("10.244.0.5/26", "fd00:10:244::5/122")
    a2 = addrs("10.244.1.7/26", "fd00:10:244::1:7/122")
    with netns(lab.path(lab.host)):
        w1 = wiring.setup(lab.path(c1), "eth0", host_ifname("net", c1, "eth0"), MTU, a1)
        w2 = wiring.setup(lab.path(c2), "eth0", host_ifname("net", c2, "eth0"), MTU, a2)
    assert (w1.host_mac, w1.container_ifname) == ("ee:ee:ee:ee:ee:ee", "eth0")
    assert w1.container_mac != w1.host_mac
    assert f"{w1.container_index}: eth0@" in sh("ip", "-n", c1, "link", "show", "eth0")
    assert sorted(lab.host_ifs()) == sorted([w1.host_ifname, w2.host_ifname])
    assert f"mtu {MTU}" in sh("ip", "-n", c1, "link", "show", "eth0")
    assert "proto 80 scope link" in lab.in_host("route", "show", "10.244.0.5")
    assert sh("ip", "netns", "exec", lab.host, "sysctl", "-n", f"net.ipv4.conf.{w1.host_ifname}.proxy_arp") == "1\n"

    for src, dst in (
        (c1, "10.244.1.7"),
        (c1, "fd00:10:244::1:7"),
        (c2, "10.244.0.5"),
        (c2, "fd00:10:244::5"),
        (c1, NODE_V4),
        (c1, NODE_V6),
    ):
        assert ping(src, dst), f"{src} cannot reach {dst}"


def test_each_end_of_the_pair_has_one_queue_each_way(lab: Lab) -> None:
    """The queues are given at creation (no shrinking afterwards, which waits for an RCU grace
    period with the rtnl lock held); a pod sees one transmit and one receive queue, as before."""
    c1 = lab.add_ns("c1")
    host_if = host_ifname("net", c1, "eth0")
    with netns(lab.path(lab.host)):
        wiring.setup(lab.path(c1), "eth0", host_if, MTU, addrs("10.244.0.5/32"))
    for shown in (lab.in_host("-d", "link", "show", host_if), sh("ip", "-n", c1, "-d", "link", "show", "eth0")):
        assert "numtxqueues 1 numrxqueues 1" in shown
    queues = sh("ip", "netns", "exec", c1, "ls", "/sys/class/net/eth0/queues").split()
    assert sorted(queues) == ["rx-0", "tx-0"]
    assert ping(c1, NODE_V4)


def test_check_is_empty_when_healthy_and_names_a_deleted_host_route(lab: Lab) -> None:
    c1 = lab.add_ns("c1")
    a = addrs("10.244.0.5/26", "fd00:10:244::5/122")
    host_if = host_ifname("net", c1, "eth0")
    with netns(lab.path(lab.host)):
        wiring.setup(lab.path(c1), "eth0", host_if, MTU, a)
        assert wiring.check(lab.path(c1), "eth0", host_if, a) == []
        lab.in_host("route", "del", "10.244.0.5/32", "dev", host_if)
        assert wiring.check(lab.path(c1), "eth0", host_if, a) == [
            f"the host route to 10.244.0.5 via {host_if} is missing"
        ]
        sh("ip", "-n", c1, "-6", "route", "del", "default")
        assert len(wiring.check(lab.path(c1), "eth0", host_if, a)) == 2
        assert wiring.teardown(host_if)
        problems = wiring.check(lab.path(c1), "eth0", host_if, a)
    assert problems == [f"the host interface {host_if} is missing", "the container interface eth0 is missing"]


def test_existing_container_interface_fails_and_leaves_no_veth(lab: Lab) -> None:
    c1 = lab.add_ns("c1")
    sh("ip", "-n", c1, "link", "add", "eth0", "type", "bridge")
    with netns(lab.path(lab.host)), pytest.raises(InterfaceExists, match="eth0"):
        wiring.setup(lab.path(c1), "eth0", host_ifname("net", c1, "eth0"), MTU, addrs("10.244.0.5/32"))
    assert lab.host_ifs() == []
    assert "bridge" in sh("ip", "-d", "-n", c1, "link", "show", "eth0")


def test_host_name_taken_by_a_link_that_is_not_ours_fails(lab: Lab) -> None:
    c1 = lab.add_ns("c1")
    host_if = host_ifname("net", c1, "eth0")
    lab.in_host("link", "add", host_if, "type", "bridge")
    with netns(lab.path(lab.host)), pytest.raises(InterfaceExists, match=host_if):
        wiring.setup(lab.path(c1), "eth0", host_if, MTU, addrs("10.244.0.5/32"))
    assert "bridge" in lab.in_host("-d", "link", "show", host_if)
    assert "eth0" not in sh("ip", "-n", c1, "link")


def test_a_leftover_veth_of_the_same_attachment_is_replaced(lab: Lab) -> None:
    c1 = lab.add_ns("c1")
    host_if = host_ifname("net", c1, "eth0")
    lab.in_host("link", "add", host_if, "type", "veth", "peer", "name", "stale0")
    with netns(lab.path(lab.host)):
        wired = wiring.setup(lab.path(c1), "eth0", host_if, MTU, addrs("10.244.0.5/32"))
        assert wiring.check(lab.path(c1), "eth0", host_if, addrs("10.244.0.5/32")) == []
    assert wired.host_mac == "ee:ee:ee:ee:ee:ee"
    assert "stale0" not in lab.in_host("link")


def test_missing_netns_fails_and_leaves_nothing(lab: Lab) -> None:
    with netns(lab.path(lab.host)), pytest.raises(NetnsNotFound):
        wiring.setup(lab.path(f"tw-{lab.tag}-gone"), "eth0", "tor00000000000", MTU, addrs("10.244.0.5/32"))
    with netns(lab.path(lab.host)), pytest.raises(WiringError, match="/etc/hostname"):
        wiring.setup("/etc/hostname", "eth0", "tor00000000000", MTU, addrs("10.244.0.5/32"))
    assert lab.host_ifs() == []
    assert "10.244.0.5" not in lab.in_host("route")


def test_teardown_twice_and_after_the_container_is_gone(lab: Lab) -> None:
    c1, c2 = lab.add_ns("c1"), lab.add_ns("c2")
    h1, h2 = host_ifname("net", c1, "eth0"), host_ifname("net", c2, "eth0")
    with netns(lab.path(lab.host)):
        wiring.setup(lab.path(c1), "eth0", h1, MTU, addrs("10.244.0.5/32", "fd00:10:244::5/128"))
        wiring.setup(lab.path(c2), "eth0", h2, MTU, addrs("10.244.0.6/32"))
        assert wiring.teardown(h1) is True
        assert wiring.teardown(h1) is False
        assert "10.244.0.5" not in lab.in_host("route")
        sh("ip", "netns", "del", c2)
        wiring.teardown(h2)  # True or False depending on how fast the kernel reaped the namespace; never raises
        assert wiring.list_host_ifs() == []


def test_a_failure_midway_removes_the_veth(lab: Lab) -> None:
    c1 = lab.add_ns("c1")
    host_if = host_ifname("net", c1, "eth0")
    # The kernel refuses a multicast address on an interface: the veth exists by then and must go.
    with netns(lab.path(lab.host)), pytest.raises(WiringError, match="eth0") as failure:
        wiring.setup(lab.path(c1), "eth0", host_if, MTU, addrs("10.244.0.5/32", "ff02::1/128"))
    assert "\n" not in str(failure.value)
    assert lab.host_ifs() == []
    assert "eth0" not in sh("ip", "-n", c1, "link")
    assert "10.244.0.5" not in lab.in_host("route")


def test_setup_and_teardown_timing(lab: Lab) -> None:
    c1 = lab.add_ns("c1")
    a = addrs("10.244.0.5/32", "fd00:10:244::5/128")
    setups: list[float] = []
    teardowns: list[float] = []
    with netns(lab.path(lab.host)):
        for i in range(20):
            host_if = host_ifname("net", f"{c1}-{i}", "eth0")
            start = time.perf_counter()
            wiring.setup(lab.path(c1), "eth0", host_if, MTU, a)
            setups.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert wiring.teardown(host_if)
            teardowns.append(time.perf_counter() - start)
    for name, times in (("setup", setups), ("teardown", teardowns)):
        ms = sorted(t * 1000 for t in times)
        print(
            f"\n{name} over {len(ms)} calls: median {statistics.median(ms):.1f} ms, "
            f"min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms"
        )


def test_an_address_routed_elsewhere_fails_naming_the_holder_and_leaves_no_veth(lab: Lab) -> None:
    c1 = lab.add_ns("c1")
    lab.in_host("route", "add", "10.244.0.5/32", "dev", "uplink0")
    with netns(lab.path(lab.host)), pytest.raises(WiringError, match="uplink0"):
        wiring.setup(lab.path(c1), "eth0", host_ifname("net", c1, "eth0"), MTU, addrs("10.244.0.5/32"))
    assert lab.host_ifs() == []
    assert "eth0" not in sh("ip", "-n", c1, "link")
