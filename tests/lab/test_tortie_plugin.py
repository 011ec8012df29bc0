"""The `tortie` CNI plugin, exec'd as a runtime does inside a `netlab` lab: wiring and traffic,
the WorkloadEndpoint, CHECK, DEL, churn, bad input, VERSION, STATUS, GC, chaining, another IPAM
plugin, and the two paths meeting (agent start and crash, concurrent calls).

Every test goes through the compiled front end (the venv's `tortie`, as install-deps installs it);
those with a `front_end` parameter also run through the Python relay.

Most tests run on both paths: delegated (felix-agent serves the node's socket) and in-process (no
agent, so the front end does the work itself). One lab serves the module; each test leaves the node
empty (pods deleted, then anything left removed). Known product bugs are strict xfails that name
the bug, so each assertion stays real and the run turns red once the bug is fixed. Timings are
printed, never asserted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from netlab import netns as ip_netns
from netlab.cni import REFERENCE_PLUGINS, Attachment, exec_plugin, network_config
from netlab.lab import Pod
from netlab.wait import wait_for
from tests.lab.tortie_support import (
    HOST_MAC,
    MTU,
    NETWORK,
    POOL_V4,
    POOL_V6,
    Footprint,
    Sandbox,
    TortieLab,
    host_ifname,
)

pytestmark = pytest.mark.lab

HOST_V6 = "fd00:198:18::11"  # put on node 1's lo: an IPv6 address of "the host" for pods to reach
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"
CYCLES = 200


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(plugins=["portmap"]) as tl:
        tl.exec(1, "ip", "address", "add", f"{HOST_V6}/128", "dev", "lo")
        yield tl


@pytest.fixture(autouse=True)
def empty_node(tl: TortieLab) -> Iterator[None]:
    yield
    tl.reset()


@pytest.fixture
def agent(tl: TortieLab) -> None:
    tl.use_agent(True)


@pytest.fixture(params=["compiled", "python"])
def front_end(tl: TortieLab, request: pytest.FixtureRequest) -> Iterator[str]:
    """Which executable the runtime execs: the compiled front end (the default everywhere else in
    this module) or the Python relay (a supported fallback install)."""
    tl.use_front_end(str(request.param))
    yield str(request.param)
    tl.use_front_end("compiled")


def link_json(tl: TortieLab, netns: str, name: str) -> dict[str, Any]:
    out = tl.lab.exec(netns, "ip", "-j", "-d", "link", "show", "dev", name).stdout
    return dict(json.loads(out)[0])


def routes(tl: TortieLab, netns: str, family: str) -> set[tuple[str, str | None, str, str]]:
    """(dst, gateway, dev, scope) of each route in the main table."""
    entries = json.loads(tl.lab.exec(netns, "ip", "-j", family, "route", "show").stdout)
    return {(r["dst"], r.get("gateway"), r["dev"], r.get("scope", "global")) for r in entries}


def sysctl(tl: TortieLab, netns: str, key: str) -> str:
    return tl.lab.exec(netns, "sysctl", "-n", key).stdout.strip()


def v4(pod: Pod) -> str:
    return next(ip for ip in pod.ips if ipaddress.ip_address(ip).version == 4)


def v6(pod: Pod) -> str:
    return next(ip for ip in pod.ips if ipaddress.ip_address(ip).version == 6)


def assert_served_by(tl: TortieLab, path: str, container_id: str) -> None:
    """The call went the way the path says: the agent logged it, or no agent was there to."""
    if path == "agent":
        assert container_id in tl.agent_output(), "the agent did not serve the call"
    else:
        assert not tl.socket().exists()


# --------------------------------------------------------------------------------------------
# ADD: the result, the wiring, the traffic


def test_add_result_wiring_and_traffic(tl: TortieLab, path: str, front_end: str) -> None:
    node = tl.node(1)
    a, b = tl.add_pod("a"), tl.add_pod("b")
    for pod in (a, b):
        assert_served_by(tl, path, pod.container_id)
        result = pod.result
        assert result["cniVersion"] == "1.0.0"
        host_if = host_ifname(pod.container_id)
        container_mac = link_json(tl, pod.netns, "eth0")["address"]
        assert result["interfaces"] == [
            {"name": host_if, "mac": HOST_MAC},
            {"name": "eth0", "mac": container_mac, "sandbox": str(ip_netns.path(pod.netns))},
        ]
        addresses = [ipaddress.ip_interface(ip["address"]) for ip in result["ips"]]
        assert [ip["interface"] for ip in result["ips"]] == [1, 1]  # the container side, which has a sandbox
        assert sorted((a.version, a.network.prefixlen) for a in addresses) == [(4, 32), (6, 128)]
        assert all(a.ip in ipaddress.ip_network(POOL_V4 if a.version == 4 else POOL_V6) for a in addresses)

        # The host end: contract name, fixed MAC, MTU, no address but its link-local, proxy ARP/NDP.
        host_link = link_json(tl, node.netns, host_if)
        assert (host_link["address"], host_link["mtu"], host_link["linkinfo"]["info_kind"]) == (HOST_MAC, MTU, "veth")
        host_addrs = tl.exec(1, "ip", "-o", "address", "show", "dev", host_if).stdout
        assert "inet " not in host_addrs and "scope global" not in host_addrs
        assert sysctl(tl, node.netns, f"net.ipv4.conf.{host_if}.proxy_arp") == "1"
        assert sysctl(tl, node.netns, f"net.ipv6.conf.{host_if}.proxy_ndp") == "1"
        for ip in pod.ips:
            family = f"-{ipaddress.ip_address(ip).version}"
            route = tl.exec(1, "ip", family, "route", "show", "exact", ip).stdout
            assert f"dev {host_if} proto 80" in route, route

        # The container end: MTU, /32 and /128, routes through 169.254.1.1 and the host's link-local.
        assert link_json(tl, pod.netns, "eth0")["mtu"] == MTU
        inside = tl.lab.exec(pod.netns, "ip", "-o", "address", "show", "dev", "eth0").stdout
        assert f"inet {v4(pod)}/32" in inside and f"inet6 {v6(pod)}/128" in inside
        routes_v4, routes_v6 = routes(tl, pod.netns, "-4"), routes(tl, pod.netns, "-6")
        assert {("default", "169.254.1.1", "eth0", "global"), ("169.254.1.1", None, "eth0", "link")} <= routes_v4
        assert ("default", GATEWAY_V6, "eth0", "global") in routes_v6

    # pod <-> pod, pod <-> host, both families
    for src, dst in ((a, b), (b, a)):
        assert tl.lab.ping(src.netns, v4(dst)), f"{src.name} -> {dst.name} over IPv4"
        assert tl.lab.ping(src.netns, v6(dst)), f"{src.name} -> {dst.name} over IPv6"
    for pod in (a, b):
        assert tl.lab.ping(node.netns, v4(pod)) and tl.lab.ping(node.netns, v6(pod)), f"host -> {pod.name}"
        assert tl.lab.ping(pod.netns, node.address) and tl.lab.ping(pod.netns, HOST_V6), f"{pod.name} -> host"


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_add_result_in_each_spec_version(tl: TortieLab, path: str, version: str) -> None:
    pod = tl.add_pod("v", tl.conflist(version=version))
    assert pod.result["cniVersion"] == version
    ips = pod.result["ips"]
    if version == "0.4.0":
        assert sorted(ip["version"] for ip in ips) == ["4", "6"]
    else:
        assert all("version" not in ip for ip in ips)  # 1.0.0 removed it
    assert [i.get("sandbox") for i in pod.result["interfaces"]] == [None, str(ip_netns.path(pod.netns))]


def test_workload_endpoint(tl: TortieLab, path: str) -> None:
    pod = tl.add_pod("web-1", namespace="shop", labels={"app": "web", "tier": "front"})
    host_if = host_ifname(pod.container_id)
    (endpoint,) = tl.endpoints()
    meta, spec = endpoint["metadata"], endpoint["spec"]
    assert (meta["name"], meta["namespace"]) == (f"n1-{host_if}", "shop")
    assert meta["labels"] == {"app": "web", "tier": "front", "tortie.dev/name": "web-1",
                              "tortie.dev/namespace": "shop", "tortie.dev/network": NETWORK}
    container_mac = link_json(tl, pod.netns, "eth0")["address"]
    assert spec["node"] == "n1"
    assert spec["network"] == NETWORK
    assert spec["containerID"] == pod.container_id
    assert (spec["interfaceName"], spec["endpoint"]) == (host_if, "eth0")
    assert spec["mac"] == container_mac
    assert spec["ipNetworks"] == pod.addresses
    assert spec["pod"] == "web-1"
    assert spec["profiles"] == ["kns.shop"]


# --------------------------------------------------------------------------------------------
# CHECK


def _break(tl: TortieLab, pod: Pod, what: str) -> None:
    if what == "host-route-v4":
        tl.exec(1, "ip", "route", "del", f"{v4(pod)}/32")
    elif what == "host-route-v6":
        tl.exec(1, "ip", "-6", "route", "del", f"{v6(pod)}/128")
    elif what == "container-default-v4":
        tl.lab.exec(pod.netns, "ip", "route", "del", "default")
    elif what == "container-default-v6":
        tl.lab.exec(pod.netns, "ip", "-6", "route", "del", "default")
    elif what == "container-address-v4":
        tl.lab.exec(pod.netns, "ip", "address", "del", f"{v4(pod)}/32", "dev", "eth0")
    elif what == "endpoint":
        tl.netctl(1, "delete", "wep", f"n1-{host_ifname(pod.container_id)}", "-n", pod.namespace)
    elif what == "reservation":
        tl.netctl(1, "ipam", "release", "--ip", v4(pod), "--ip", v6(pod))
    else:
        raise AssertionError(what)


@pytest.mark.parametrize("broken", ["host-route-v4", "host-route-v6", "container-default-v4", "container-default-v6",
                                    "container-address-v4", "endpoint", "reservation"])
def test_check_passes_after_add_and_catches_damage(tl: TortieLab, path: str, broken: str) -> None:
    pod = tl.add_pod("c")
    healthy = tl.call_for(pod, "CHECK")
    assert healthy.ok and healthy.stdout == "", healthy
    _break(tl, pod, broken)
    damaged = tl.call_for(pod, "CHECK")
    assert damaged.returncode != 0, f"CHECK missed the damage ({broken})"
    assert damaged.output is not None, f"not the spec's error JSON: {damaged.stdout!r} {damaged.stderr!r}"
    assert isinstance(damaged.code, int) and damaged.code > 0 and damaged.output.get("msg"), damaged.output


def test_a_failed_repeated_add_leaves_the_live_attachment_alone(tl: TortieLab, path: str) -> None:
    live = tl.add_pod("live")
    again = Attachment(live.container_id, live.attachment.netns, "eth0", live.attachment.cni_args)
    run = tl.call("ADD", network_config(live.conflist, 0), again)
    assert run.returncode != 0 and run.code == 4, run  # the spec: an interface of that name exists
    state = tl.datastore()
    handle = f"{NETWORK}.{live.container_id}.eth0"
    assert state.handles == [handle], "the live attachment's reservation is gone"
    assert set(state.allocations.values()) == {handle} and len(state.allocations) >= 2
    check = tl.call_for(live, "CHECK")
    assert check.ok, check.output


# --------------------------------------------------------------------------------------------
# DEL


def test_del_twice(tl: TortieLab, path: str, front_end: str) -> None:
    pod = tl.add_pod("d")
    for _ in range(2):
        run = tl.call_for(pod, "DEL")
        assert run.ok and run.stdout == "", run
        assert tl.tor_links() == []
        state = tl.datastore()
        assert state.handles == [] and state.endpoints == []
        assert set(tl.ipam_in_use().values()) == {0}
        assert "eth0" not in tl.lab.exec(pod.netns, "ip", "-o", "link").stdout
    tl.lab.delete_pod(pod)  # a third DEL, as the runtime does, then the namespace goes


@pytest.mark.parametrize("netns_given", ["path-gone", "no-CNI_NETNS"])
def test_del_after_the_netns_is_gone(tl: TortieLab, path: str, netns_given: str) -> None:
    pod = tl.add_pod("g")
    other = tl.add_pod("other")  # must survive
    ip_netns.delete(pod.netns)
    attachment = Attachment(pod.container_id, pod.attachment.netns if netns_given == "path-gone" else "",
                            "eth0", pod.attachment.cni_args)
    run = tl.call("DEL", network_config(pod.conflist, 0, prev_result=pod.result), attachment)
    assert run.ok and run.stdout == "", run
    assert tl.tor_links() == [host_ifname(other.container_id)]
    state = tl.datastore()
    assert state.handles == [f"{NETWORK}.{other.container_id}.eth0"]
    assert state.endpoints == [f"default/n1-{host_ifname(other.container_id)}"]
    assert tl.ipam_in_use() == {"pool-v4": 1, "pool-v6": 1}
    tl.lab.delete_pod(pod)  # the runtime's own DEL, and its bookkeeping
    assert tl.lab.ping(tl.node(1).netns, v4(other))


UNREACHABLE_ETCD = "https://198.18.0.2:2399"  # nobody listens there: connection refused, retried to the budget


def test_del_with_etcd_unreachable_answers_within_adds_budget_and_removes_the_veth(tl: TortieLab, path: str) -> None:
    """DEL is best effort: code 11 within the time ADD takes to give up (one retry budget for the
    whole call, not one per etcd request), and the kernel part is gone all the same."""
    from datastore.config import EtcdConfig

    budget = EtcdConfig.retry_budget
    pod = tl.add_pod("cut-off")
    cut_off = tl.conflist(etcd_endpoints=UNREACHABLE_ETCD)
    with tl.sandbox() as box:
        attachment = Attachment(secrets.token_hex(32), box.path, "eth0", {"K8S_POD_NAME": "never"})
        started = time.monotonic()
        add = tl.call("ADD", network_config(cut_off, 0), attachment)
        add_seconds = time.monotonic() - started
        assert "eth0" not in box.exec("ip", "-o", "link").stdout
    started = time.monotonic()
    delete = tl.call("DEL", network_config(cut_off, 0, prev_result=pod.result), pod.attachment)
    del_seconds = time.monotonic() - started
    print(f"\netcd unreachable ({path}): ADD answered code {add.code} in {add_seconds:.2f} s, "
          f"DEL code {delete.code} in {del_seconds:.2f} s (retry budget {budget} s)")
    assert add.code == 11 and delete.code == 11, (add, delete)
    assert "198.18.0.2:2399" in delete.stdout, "the error names the endpoint"
    assert host_ifname(pod.container_id) not in tl.tor_links(), "DEL left the host veth"
    assert "eth0" not in tl.lab.exec(pod.netns, "ip", "-o", "link").stdout, "DEL left the container's interface"
    # The bound the issue asks for: the same budget as ADD (before the fix DEL paid it twice, 7-8 s).
    assert del_seconds < max(add_seconds, budget) + 1.0, f"DEL {del_seconds:.1f} s, ADD {add_seconds:.1f} s"
    again = tl.call("DEL", network_config(pod.conflist, 0, prev_result=pod.result), pod.attachment)
    assert again.ok, again  # once etcd answers, the runtime's retried DEL releases the rest
    state = tl.datastore()
    assert state.handles == [] and state.endpoints == []


def test_del_of_an_attachment_never_added_changes_nothing(tl: TortieLab, path: str) -> None:
    live = tl.add_pod("live")
    before = tl.footprint()
    with tl.sandbox() as box:
        for ifname in ("eth0", "net1"):
            attachment = Attachment(secrets.token_hex(32), box.path, ifname, {"K8S_POD_NAME": "ghost"})
            run = tl.call("DEL", network_config(tl.conflist(), 0), attachment)
            assert run.ok and run.stdout == "", run
    assert tl.footprint() == before
    assert tl.lab.ping(tl.node(1).netns, v4(live))


# --------------------------------------------------------------------------------------------
# churn


def test_add_del_cycles_leave_nothing(tl: TortieLab, agent: None) -> None:
    started = time.perf_counter()
    for n in range(CYCLES):
        pod = tl.add_pod(f"churn-{n}")
        tl.lab.delete_pod(pod)
    seconds = time.perf_counter() - started
    print(f"\n{CYCLES} ADD/DEL cycles (agent path, pod netns made and removed each time): {seconds:.1f} s, "
          f"{CYCLES / seconds:.1f} cycles/s")
    assert tl.tor_links() == []
    assert tl.count_handles() == 0
    assert tl.endpoints() == []
    assert set(tl.ipam_in_use().values()) == {0}
    checked = tl.ipam_check()
    assert checked.returncode == 0, checked.stdout


# --------------------------------------------------------------------------------------------
# bad input: the right code, and nothing changed


@dataclass(frozen=True)
class Request:
    config: dict[str, Any] | bytes
    attachment: Attachment
    env: dict[str, str]


def _request(tl: TortieLab, box: Sandbox, *, config: dict[str, Any] | bytes | None = None,
             env: dict[str, str] | None = None, **attachment: str) -> Request:
    fields = {"container_id": secrets.token_hex(32), "netns": box.path, "ifname": "eth0"} | attachment
    att = Attachment(fields["container_id"], fields["netns"], fields["ifname"], {"K8S_POD_NAME": "bad"})
    return Request(network_config(tl.conflist(), 0) if config is None else config, att, env or {})


def _conf(**overrides: Any) -> Callable[[TortieLab, Sandbox], Request]:
    return lambda tl, box: _request(tl, box, config=network_config(tl.conflist(**overrides), 0))


def _ipam(**fields: Any) -> Callable[[TortieLab, Sandbox], Request]:
    def build(tl: TortieLab, box: Sandbox) -> Request:
        ipam = {k: v for k, v in {"type": "tortie-ipam", "assign_ipv6": "true", **fields}.items() if v is not None}
        return _request(tl, box, config=network_config(tl.conflist(ipam=ipam), 0))

    return build


def _without(key: str) -> Callable[[TortieLab, Sandbox], Request]:
    def build(tl: TortieLab, box: Sandbox) -> Request:
        config = network_config(tl.conflist(), 0)
        del config[key]
        return _request(tl, box, config=config)

    return build


def _existing_ifname(tl: TortieLab, box: Sandbox) -> Request:
    box.exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")  # no dummy module here
    return _request(tl, box)


BAD_INPUT: dict[str, tuple[int, Callable[[TortieLab, Sandbox], Request]]] = {
    # id: (expected CNI error code, request builder)
    "stdin-invalid-json": (6, lambda tl, box: _request(tl, box, config=b'{"cniVersion": "1.0.0", "name": ')),
    "stdin-not-an-object": (6, lambda tl, box: _request(tl, box, config=b"[1, 2]")),
    "cniVersion-unsupported": (1, lambda tl, box: _request(tl, box, config=network_config(
        tl.conflist(version="0.2.0"), 0))),
    "cniVersion-missing": (1, _without("cniVersion")),
    "CNI_COMMAND-unknown": (4, lambda tl, box: _request(tl, box, env={"CNI_COMMAND": "ATTACH"})),
    "CNI_CONTAINERID-missing": (4, lambda tl, box: _request(tl, box, container_id="")),
    "CNI_CONTAINERID-malformed": (4, lambda tl, box: _request(tl, box, container_id="-no/such id")),
    "CNI_NETNS-missing": (4, lambda tl, box: _request(tl, box, netns="")),
    "CNI_NETNS-relative": (4, lambda tl, box: _request(tl, box, netns="run/netns/x")),
    "CNI_IFNAME-missing": (4, lambda tl, box: _request(tl, box, ifname="")),
    "CNI_IFNAME-too-long": (4, lambda tl, box: _request(tl, box, ifname="e" * 16)),
    "CNI_IFNAME-slash": (4, lambda tl, box: _request(tl, box, ifname="eth/0")),
    "CNI_ARGS-malformed": (4, lambda tl, box: _request(tl, box, env={"CNI_ARGS": "K8S_POD_NAME"})),
    "ifname-exists-in-container": (4, _existing_ifname),
    "netns-does-not-exist": (3, lambda tl, box: _request(tl, box, netns=f"/run/netns/{tl.lab.name}-p00000000")),
    "name-missing": (7, _without("name")),
    "type-missing": (7, _without("type")),
    "type-not-a-string": (7, _conf(type=["tortie"])),
    "name-invalid": (7, lambda tl, box: _request(tl, box, config=network_config(tl.conflist(name="bad name!"), 0))),
    "mtu-string": (7, _conf(mtu="1450")),
    "mtu-float": (7, _conf(mtu=1450.5)),
    "mtu-bool": (7, _conf(mtu=True)),
    "mtu-too-small": (7, _conf(mtu=100)),
    "mtu-too-large": (7, _conf(mtu=70000)),
    "nodename-not-a-string": (7, _conf(nodename=5)),
    "dns-not-an-object": (7, _conf(dns="8.8.8.8")),
    "ipam-missing": (7, _without("ipam")),
    "ipam-type-missing": (7, _ipam(type=None)),
    "ipam-assign-not-a-flag": (7, _ipam(assign_ipv4="yes")),
    "ipam-no-family": (7, _ipam(assign_ipv4="false", assign_ipv6="false")),
    "ipam-pools-not-a-list": (7, _ipam(ipv4_pools="pool-v4")),
    "pool-unknown": (101, _ipam(ipv4_pools=["no-such-pool"])),
    "etcd-endpoint-scheme": (7, _conf(etcd_endpoints="ftp://198.18.0.2:2379")),
    "etcd-endpoint-port": (7, _conf(etcd_endpoints="https://198.18.0.2:port")),
    "etcd-endpoint-host": (7, _conf(etcd_endpoints="https://not a host name:2379")),
    "etcd-endpoint-not-a-string": (7, _conf(etcd_endpoints=["https://198.18.0.2:2379"])),
    "etcd-ca-file-missing": (7, _conf(etcd_ca_cert_file="/nonexistent/ca.pem")),
    "etcd-endpoint-unreachable": (11, _conf(etcd_endpoints="https://198.18.0.2:2399")),
    "agent_socket-not-absolute": (7, _conf(agent_socket="run/tortie/cni.sock")),
    "agent_socket-not-a-string": (7, _conf(agent_socket=7)),
}


class DatastoreChanged(AssertionError):
    """A call that should have changed nothing wrote to etcd."""


# Known product bugs, reported: each stays a real assertion (xfail strict: the run turns red once fixed).
BAD_INPUT_BUGS: dict[str, tuple[type[BaseException], str]] = {}


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.xfail(strict=True, raises=BAD_INPUT_BUGS[case][0],
                                               reason=BAD_INPUT_BUGS[case][1]))
    if case in BAD_INPUT_BUGS else case
    for case in BAD_INPUT
])
def test_bad_input_gets_its_code_and_changes_nothing(tl: TortieLab, path: str, case: str) -> None:
    code, build = BAD_INPUT[case]
    with tl.sandbox() as box:
        request = build(tl, box)
        before = tl.footprint()
        sandbox_links = box.exec("ip", "-o", "link").stdout
        run = tl.call("ADD", request.config, request.attachment, env=request.env)
        after = tl.footprint()
        assert run.returncode != 0, f"ADD accepted {case}: {run.stdout}"
        assert run.output is not None, f"not the spec's error JSON: {run.stdout!r} {run.stderr[-500:]!r}"
        assert (run.code, bool(run.output.get("msg"))) == (code, True), run.output
        assert box.exec("ip", "-o", "link").stdout == sandbox_links  # nothing added or removed in the container
    assert_unchanged(before, after)


@pytest.mark.parametrize("case", ["stdin-invalid-json", "agent_socket-not-absolute", "agent_socket-not-a-string",
                                  "pool-unknown", "etcd-endpoint-unreachable"])
def test_bad_input_through_either_front_end(tl: TortieLab, path: str, front_end: str, case: str) -> None:
    test_bad_input_gets_its_code_and_changes_nothing(tl, path, case)


def assert_unchanged(before: Footprint, after: Footprint) -> None:
    assert after.links == before.links
    changed = {k for k in before.datastore.kvs.keys() | after.datastore.kvs.keys()
               if before.datastore.kvs.get(k) != after.datastore.kvs.get(k)}
    if changed or after.datastore.revision != before.datastore.revision:
        raise DatastoreChanged(f"etcd written: revision {before.datastore.revision} -> {after.datastore.revision}, "
                               f"keys changed: {sorted(changed)}")


# --------------------------------------------------------------------------------------------
# STATUS and GC (spec 1.1.0)


def test_version(tl: TortieLab, front_end: str) -> None:
    for asked in ("0.4.0", "1.1.0"):
        run = tl.call("VERSION", {"cniVersion": asked})
        assert run.ok, run
        assert run.output == {"cniVersion": asked, "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


def test_status_ok(tl: TortieLab, path: str, front_end: str) -> None:
    run = tl.call("STATUS", network_config(tl.conflist(version="1.1.0"), 0))
    assert run.ok and run.stdout == "", run


@pytest.mark.parametrize("overrides", [
    pytest.param({"ipam": {"type": "tortie-ipam", "ipv4_pools": ["no-such-pool"]}}, id="no-usable-pool"),
    pytest.param({"etcd_endpoints": "https://198.18.0.2:2399"}, id="datastore-unreachable"),
])
def test_status_unavailable(tl: TortieLab, path: str, overrides: dict[str, Any]) -> None:
    run = tl.call("STATUS", network_config(tl.conflist(version="1.1.0", **overrides), 0))
    assert run.returncode != 0 and run.code == 50, run


@pytest.mark.parametrize("command", ["DEL", "CHECK", "STATUS", "GC"])
def test_a_config_without_a_type_string_is_refused_by_every_command(tl: TortieLab, path: str, command: str) -> None:
    """The spec requires ``type`` in every plugin object; ADD is among BAD_INPUT. Nothing is touched."""
    pod = tl.add_pod("typed")
    before = tl.footprint()
    for plugin_type in (None, 7):
        config = network_config(tl.conflist(version="1.1.0", type=plugin_type), 0, prev_result=pod.result,
                                extra={"cni.dev/valid-attachments": []})
        if plugin_type is None:
            config.pop("type", None)
        run = tl.call(command, config, pod.attachment)
        assert run.returncode != 0 and run.code == 7, run
        assert run.output is not None and "type" in run.output["msg"], run.output
    assert_unchanged(before, tl.footprint())
    assert tl.call_for(pod, "CHECK").ok


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_keeps_the_listed_attachment_only(tl: TortieLab, path: str, key: str, front_end: str) -> None:
    conflist = tl.conflist(version="1.1.0")
    pods = [tl.add_pod(f"gc{n}", conflist) for n in range(3)]
    kept = pods[0]
    gone = pods[1:]
    elsewhere = tl.add_pod("other-network", tl.conflist(version="1.1.0", name="tnet-other"))  # not this GC's
    extra = {key: [{"containerID": kept.container_id, "ifname": "eth0"}]}
    run = tl.call("GC", network_config(conflist, 0, extra=extra))
    assert run.ok and run.stdout == "", run
    assert tl.tor_links() == sorted([host_ifname(kept.container_id),
                                     host_ifname(elsewhere.container_id, network="tnet-other")])
    state = tl.datastore()
    assert state.endpoints == sorted([f"default/n1-{host_ifname(kept.container_id)}",
                                      f"default/n1-{host_ifname(elsewhere.container_id, network='tnet-other')}"])
    assert state.handles == sorted([f"{NETWORK}.{kept.container_id}.eth0", f"tnet-other.{elsewhere.container_id}.eth0"])
    assert tl.ipam_in_use() == {"pool-v4": 2, "pool-v6": 2}
    for pod in gone:
        assert "eth0" not in tl.lab.exec(pod.netns, "ip", "-o", "link").stdout
    check = tl.call_for(kept, "CHECK")
    assert check.ok, check
    assert tl.lab.ping(tl.node(1).netns, v4(kept)) and tl.lab.ping(tl.node(1).netns, v6(kept))
    for pod in gone:  # the runtime's DEL after GC still succeeds
        tl.lab.delete_pod(pod)


def test_gc_without_the_attachment_list_is_refused(tl: TortieLab, path: str) -> None:
    tl.add_pod("kept")
    before = tl.footprint()
    run = tl.call("GC", network_config(tl.conflist(version="1.1.0"), 0))
    assert run.returncode != 0 and run.code == 7, run
    assert_unchanged(before, tl.footprint())


# --------------------------------------------------------------------------------------------
# chaining: tortie first, then the reference portmap and tuning


def test_chained_before_portmap_and_tuning(tl: TortieLab, path: str) -> None:
    mappings = [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]
    chained = [
        # runtimeConfig as the runtime derives it from the capability args
        {"type": "portmap", "capabilities": {"portMappings": True}, "runtimeConfig": {"portMappings": mappings}},
        {"type": "tuning", "sysctl": {"net.core.somaxconn": "1234"}},
    ]
    pod = tl.add_pod("chain", tl.conflist(chained=chained))
    host_if = host_ifname(pod.container_id)
    result = pod.result
    assert [i["name"] for i in result["interfaces"]] == [host_if, "eth0"]
    assert result["interfaces"][1]["sandbox"] == str(ip_netns.path(pod.netns))
    assert [ip["interface"] for ip in result["ips"]] == [1, 1]
    (endpoint,) = tl.endpoints()
    assert [ip["address"] for ip in result["ips"]] == endpoint["spec"]["ipNetworks"]
    nat_v4 = tl.exec(1, "iptables", "-w", "-t", "nat", "-S").stdout
    assert "--dport 18080" in nat_v4 and f"{v4(pod)}:80" in nat_v4
    assert sysctl(tl, pod.netns, "net.core.somaxconn") == "1234"
    assert tl.lab.ping(pod.netns, tl.node(1).address)

    tl.lab.delete_pod(pod)  # DEL in reverse order, each with the final result
    assert "18080" not in tl.exec(1, "iptables", "-w", "-t", "nat", "-S").stdout
    assert "18080" not in tl.exec(1, "ip6tables", "-w", "-t", "nat", "-S").stdout
    assert tl.tor_links() == []
    assert tl.count_handles() == 0 and tl.endpoints() == []


# --------------------------------------------------------------------------------------------
# the two paths together: an agent (re)start keeps live pods; either path deletes what the other made


def test_agent_start_keeps_live_pods_and_each_path_deletes_the_others(tl: TortieLab) -> None:
    tl.use_agent(False)
    in_process = tl.add_pod("made-in-process")
    tl.use_agent(True)  # start-up cleanup runs: a live pod is not a leftover
    assert stat.S_IMODE(tl.socket().stat().st_mode) == 0o600
    assert tl.tor_links() == [host_ifname(in_process.container_id)]
    assert len(tl.endpoints()) == 1 and tl.count_handles() == 1
    wait_for(lambda: tl.lab.ping(in_process.netns, tl.node(1).address), 15, "the pod to reach the host")
    delegated = tl.add_pod("made-by-agent")
    assert delegated.container_id in tl.agent_output()
    assert tl.call_for(in_process, "CHECK").ok
    tl.lab.delete_pod(in_process)  # DEL by the agent of what the plugin made itself

    tl.use_agent(False)  # SIGTERM: the dataplane stays, and the pod keeps its traffic
    assert tl.lab.ping(delegated.netns, tl.node(1).address)
    assert tl.call_for(delegated, "CHECK").ok
    tl.lab.delete_pod(delegated)  # DEL in-process of what the agent made
    tl.assert_clean()


def test_a_dead_agents_stale_socket_means_in_process(tl: TortieLab, agent: None, front_end: str) -> None:
    pid = tl.agent_pid()
    os.kill(pid, signal.SIGKILL)  # a crash: the socket file stays behind, nobody listens
    wait_for(lambda: not tl.lab.process_running(pid), 10, "the killed agent to exit")
    tl.stop_agent()
    assert tl.socket().exists()
    pod = tl.add_pod("after-crash")
    assert tl.call_for(pod, "CHECK").ok
    assert tl.lab.exec(pod.netns, "ip", "-o", "address", "show", "eth0").stdout.count("scope global") == 2
    tl.use_agent(True)  # back: it programs the pod it did not make
    wait_for(lambda: tl.lab.ping(pod.netns, tl.node(1).address), 15, "the pod to reach the host")
    tl.lab.delete_pod(pod)
    tl.assert_clean()


def test_both_paths_answer_a_request_the_same(tl: TortieLab, front_end: str) -> None:
    config = network_config(tl.conflist(etcd_endpoints=None, etcd_ca_cert_file=None, etcd_cert_file=None,
                                        etcd_key_file=None), 0)
    answers = {}
    for running in (False, True):
        tl.use_agent(running)
        with tl.sandbox() as box:
            attachment = Attachment(secrets.token_hex(32), box.path, "eth0", {})
            add = tl.call("ADD", config, attachment)
            answers["agent" if running else "in-process"] = add.code
            tl.call("DEL", config, attachment)
    assert answers["agent"] == answers["in-process"], answers


# --------------------------------------------------------------------------------------------
# another IPAM plugin than tortie-ipam: the reference host-local, exec'd from CNI_PATH


def test_delegates_to_another_ipam_plugin(tl: TortieLab, path: str) -> None:
    ipam = {"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/24"}]],
            "dataDir": str(tl.work / f"host-local-{path}")}
    conflist = tl.conflist(ipam=ipam)
    a, b = tl.add_pod("hl-a", conflist), tl.add_pod("hl-b", conflist)
    for pod in (a, b):
        (ip,) = pod.result["ips"]
        address = ipaddress.ip_interface(ip["address"])
        assert address.ip in ipaddress.ip_network("10.250.0.0/24")
        assert address.network.prefixlen == 32 and ip["interface"] == 1  # routed Calico's way all the same
        assert tl.call_for(pod, "CHECK").ok
    assert tl.lab.ping(a.netns, b.ips[0]) and tl.lab.ping(tl.node(1).netns, a.ips[0])
    reserved = tl.work / f"host-local-{path}" / NETWORK
    assert sorted(p.name for p in reserved.iterdir() if p.name[0].isdigit()) == sorted([a.ips[0], b.ips[0]])
    tl.lab.delete_pod(a)
    tl.lab.delete_pod(b)
    assert not any(p.name[0].isdigit() for p in reserved.iterdir()), "host-local still holds addresses"
    assert tl.tor_links() == [] and tl.endpoints() == []


# --------------------------------------------------------------------------------------------
# concurrent calls on the agent (it serves each connection on its own thread)


def test_concurrent_adds_and_dels_on_the_agent(tl: TortieLab, agent: None, front_end: str) -> None:
    config = network_config(tl.conflist(), 0)
    with contextlib.ExitStack() as boxes:
        attachments = [Attachment(secrets.token_hex(32), boxes.enter_context(tl.sandbox()).path, "eth0",
                                  {"K8S_POD_NAME": f"par-{n}"}) for n in range(8)]
        with ThreadPoolExecutor(len(attachments)) as pool:
            adds = list(pool.map(lambda att: tl.call("ADD", config, att), attachments))
        assert all(run.ok for run in adds), [run.output for run in adds if not run.ok]
        addresses = [a for run in adds for a in run.addresses()]
        assert len(set(addresses)) == len(addresses) == 16
        assert len(tl.tor_links()) == 8 and tl.count_handles() == 8 and len(tl.endpoints()) == 8
        with ThreadPoolExecutor(len(attachments)) as pool:
            dels = list(pool.map(lambda att: tl.call("DEL", config, att), attachments))
        assert all(run.ok for run in dels), [run.output for run in dels if not run.ok]
    tl.assert_clean()


# --------------------------------------------------------------------------------------------
# tortie-ipam under the reference ptp, relayed to the agent like tortie itself


def test_tortie_ipam_under_ptp_is_served_by_the_agent(tl: TortieLab, agent: None, front_end: str) -> None:
    ptp = {"cniVersion": "1.0.0", "name": "ptp-relayed", "type": "ptp", "nodename": tl.node(1).name,
           "agent_socket": str(tl.socket()), "ipam": {"type": "tortie-ipam"}}  # no etcd_*: the env has them
    env = {"ETCD_ENDPOINTS": tl.env["ETCD_ENDPOINTS"], "ETCD_CA_CERT_FILE": tl.env["ETCD_CA_CERT_FILE"],
           "ETCD_CERT_FILE": tl.env["ETCD_CERT_FILE"], "ETCD_KEY_FILE": tl.env["ETCD_KEY_FILE"]}
    with tl.sandbox() as a, tl.sandbox() as b:
        atts = [Attachment(secrets.token_hex(32), box.path, "eth0", {}) for box in (a, b)]
        adds = [exec_plugin(REFERENCE_PLUGINS / "ptp", "ADD", ptp, att, cni_path=tl.cni_path,
                            in_netns=tl.node(1).netns, extra_env=env) for att in atts]
        assert all(run.ok for run in adds), [run.stdout + run.stderr for run in adds]
        for att in atts:  # the agent logged each assignment: the relay reached it
            assert f"ptp-relayed.{att.container_id}" in tl.agent_output()
        ips = [str(ipaddress.ip_interface(run.output["ips"][0]["address"]).ip) for run in adds]  # type: ignore[index]
        assert len(set(ips)) == 2 and tl.count_handles() == 2
        assert a.exec("ping", "-c", "1", "-W", "2", ips[1], check=False).returncode == 0  # ptp's routing
        for att, run in zip(atts, adds, strict=True):
            done = exec_plugin(REFERENCE_PLUGINS / "ptp", "DEL", {**ptp, "prevResult": run.output}, att,
                               cni_path=tl.cni_path, in_netns=tl.node(1).netns, extra_env=env)
            assert done.ok, done.stdout + done.stderr
    assert tl.count_handles() == 0


@pytest.mark.parametrize("delegated", [True, False], ids=["agent", "in-process"])
def test_an_add_whose_address_is_refused_takes_its_veth_back(tl: TortieLab, delegated: bool) -> None:
    """ADD makes the veth pair while IPAM assigns: when IPAM refuses (an address outside every
    pool), the pair is removed again and nothing is left in the datastore."""
    tl.use_agent(delegated)
    with tl.sandbox() as box:
        before = tl.datastore()
        config = network_config(tl.conflist(), 0, extra={"args": {"cni": {"ips": ["10.99.0.5"]}}})
        run = tl.call("ADD", config, Attachment(secrets.token_hex(32), box.path))
        assert not run.ok and run.output["code"] == 103, run  # ADDRESS_NOT_IN_POOL
        assert tl.tor_links() == []
        after = tl.datastore()
        assert after.handles == before.handles and after.endpoints == before.endpoints
        assert box.exec("ip", "-o", "link", "show", "eth0", check=False).returncode != 0
