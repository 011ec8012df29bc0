"""The IPIP VM tests' underlay: two L2 segments (bridges in a switch namespace) joined by a router,
three node namespaces on them and an empty pod namespace per node.

n1 and n2 share 10.9.1.0/24; n3 is alone on 10.9.2.0/24, so traffic to it crosses the router,
which knows no pod routes. Everything is built through netlink in this process: under TCG every
``ip`` exec costs ~0.1 s. The namespaces are deleted when the ``with`` block ends, however it ends.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2.iproute.linux import IPRoute

from kernel.netns import netns

NODES = ((1, 1), (2, 1), (3, 2))  # (k, subnet): n1, n2 on 10.9.1.0/24, n3 on 10.9.2.0/24


def ns_path(name: str) -> str:
    return f"/run/netns/{name}"


def write_sysctl(netns_name: str, key: str, value: str) -> None:
    with netns(ns_path(netns_name)), open(f"/proc/sys/net/{key}", "w") as f:  # the thread's namespace
        f.write(value)


@dataclass(frozen=True)
class Host:
    """One node of the underlay: its namespace, its pod's (empty) namespace, its address."""

    k: int
    subnet: int
    netns: str
    pod_netns: str
    underlay: str  # 10.9.<subnet>.1<k>

    @property
    def segment(self) -> str:
        return f"10.9.{self.subnet}.0/24"


class PodNode:
    """Names and addresses of node ``k`` and its one pod (mixed into each test file's node)."""

    k: int

    @property
    def name(self) -> str:
        return f"n{self.k}"

    @property
    def block(self) -> str:
        return f"10.244.{self.k}.0/26"

    @property
    def pod_ip(self) -> str:
        return f"10.244.{self.k}.2"


def wire_pod(u: Underlay, host: Host, mtu: int) -> str:
    """Wire ``host``'s pod with the CNI plugin's own code (its /26 address); the host end's name."""
    from cni_plugins import wiring

    pod_if = f"tor{u.prefix[3:]}{host.k}"
    with netns(ns_path(host.netns)):
        wiring.setup(ns_path(host.pod_netns), "eth0", pod_if, mtu,
                     [ipaddress.ip_interface(f"10.244.{host.k}.2/26")])
    return pod_if


@dataclass(frozen=True)
class Underlay:
    prefix: str  # every namespace's name starts with it
    hosts: list[Host]


@contextmanager
def underlay(tag: str) -> Iterator[Underlay]:
    """Build the underlay in namespaces named ``<tag><random>-…``."""
    prefix = f"{tag}{secrets.token_hex(3)}"
    names = [f"{prefix}-{s}" for s in ("sw", "r", "n1", "n2", "n3", "p1", "p2", "p3")]
    sw, router = names[0], names[1]
    handles: dict[str, Any] = {}
    try:
        subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names), check=True,
                       capture_output=True, text=True)
        for name in names:
            with netns(ns_path(name)):
                handles[name] = IPRoute()
            handles[name].link("set", index=1, state="up")
        for br in ("br1", "br2"):
            handles[sw].link("add", ifname=br, kind="bridge", state="up")

        def plug(ns: str, ifname: str, port: str, bridge: str, cidr: str) -> None:
            fd = os.open(ns_path(ns), os.O_RDONLY)
            try:
                handles[sw].link("add", ifname=port, kind="veth", peer={"ifname": ifname, "net_ns_fd": fd})
            finally:
                os.close(fd)
            handles[sw].link("set", ifname=port, master=handles[sw].link_lookup(ifname=bridge)[0], state="up")
            index = handles[ns].link_lookup(ifname=ifname)[0]
            iface = ipaddress.ip_interface(cidr)
            handles[ns].addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            handles[ns].link("set", index=index, state="up")

        plug(router, "eth1", "r1", "br1", "10.9.1.1/24")
        plug(router, "eth2", "r2", "br2", "10.9.2.1/24")
        write_sysctl(router, "ipv4/ip_forward", "1")
        hosts = []
        for k, subnet in NODES:
            host = Host(k, subnet, f"{prefix}-n{k}", f"{prefix}-p{k}", f"10.9.{subnet}.1{k}")
            plug(host.netns, "eth0", f"v{k}", f"br{subnet}", f"{host.underlay}/24")
            handles[host.netns].route("add", dst="0.0.0.0/0", gateway=f"10.9.{subnet}.1")
            write_sysctl(host.netns, "ipv4/ip_forward", "1")
            hosts.append(host)
        for handle in handles.values():
            handle.close()
        handles.clear()
        yield Underlay(prefix, hosts)
    finally:
        for handle in handles.values():
            handle.close()
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names),
                       capture_output=True, text=True)
