"""The pod's gateway resolves without the host's routing table: each pod has a permanent neighbour
entry for 169.254.1.1 and for the host end's link-local address at the host end's fixed MAC, so two
pods of a node with no default route reach each other (proxy ARP alone would need a route to the
gateway). CHECK reports the entry when it is missing.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator

import pytest

from netlab.lab import Pod
from tests.lab.tortie_support import HOST_MAC, TortieLab

pytestmark = pytest.mark.lab

GATEWAYS = {4: "169.254.1.1", 6: "fe80::ecee:eeff:feee:eeee"}


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="tg", plugins=["portmap"]) as tl:
        yield tl


@pytest.fixture(params=["agent", "in-process"])
def path(tl: TortieLab, request: pytest.FixtureRequest) -> Iterator[str]:
    tl.use_agent(request.param == "agent")
    if request.param == "in-process":
        tl.remove_dataplane()
    yield str(request.param)
    tl.reset()


def address(pod: Pod, version: int) -> str:
    return next(ip for ip in pod.ips if ipaddress.ip_address(ip).version == version)


def test_pods_of_a_node_without_a_default_route_reach_each_other(tl: TortieLab, path: str) -> None:
    node = tl.node(1).netns
    defaults = {family: tl.lab.exec(node, "ip", family, "route", "show", "default").stdout.strip()
                for family in ("-4", "-6")}
    for family, route in defaults.items():
        if route:
            tl.lab.exec(node, "ip", family, "route", "del", *route.split())
    try:
        assert not tl.lab.exec(node, "ip", "-4", "route", "show", "default").stdout.strip()
        a, b = tl.add_pod("a"), tl.add_pod("b")
        for version in (4, 6):
            neighbours = json.loads(tl.lab.exec(a.netns, "ip", "-j", f"-{version}", "neigh", "show",
                                                "dev", "eth0").stdout)
            entry = next(n for n in neighbours if n["dst"] == GATEWAYS[version])
            assert entry["lladdr"] == HOST_MAC and "PERMANENT" in entry["state"], entry
            assert tl.lab.ping(a.netns, address(b, version)), f"IPv{version}: a cannot reach b"
            assert tl.lab.ping(b.netns, address(a, version)), f"IPv{version}: b cannot reach a"
    finally:
        for family, route in defaults.items():
            if route:
                tl.lab.exec(node, "ip", family, "route", "replace", *route.split(), check=False)


def test_check_reports_a_missing_gateway_entry(tl: TortieLab, path: str) -> None:
    pod = tl.add_pod("c")
    assert tl.call_for(pod, "CHECK").ok
    tl.lab.exec(pod.netns, "ip", "neigh", "del", GATEWAYS[4], "dev", "eth0")
    check = tl.call_for(pod, "CHECK")
    assert check.code == 104 and "permanent neighbour" in check.stdout, check.output
