"""The policy and NAT-outgoing managers against a real kernel: one host namespace, three workload
namespaces wired the way the CNI plugin wires them, and an "outside" namespace behind the host's
uplink. Hand-made DesiredStates go in; pings and TCP connections (in both directions) come out.

Each test builds its own lab and removes it, even on failure. The ``inet tortie`` table lives in the
lab's host namespace only; the root namespace's ruleset is checked to be unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import ip_interface

import pytest

from cni_plugins import wiring
from cni_plugins.naming import host_ifname
from felix_agent.calc.model import DesiredState, Endpoint, IPSet, Policy, RuleMatch
from felix_agent.dataplane.masq import MasqManager
from felix_agent.dataplane.nftables import NftTable
from felix_agent.dataplane.policy import PolicyManager
from kernel.netns import netns

pytestmark = pytest.mark.lab

NODE_V4, OUTSIDE_V4 = "192.0.2.1", "192.0.2.2"
NODE_V6, OUTSIDE_V6 = "fd00:99::1", "fd00:99::2"
POOLS = frozenset({"10.244.0.0/16", "fd00:10:244::/48"})
PODS = {
    "c1": ("10.244.0.1", "fd00:10:244::1"),
    "c2": ("10.244.0.2", "fd00:10:244::2"),
    "c3": ("10.244.0.3", "fd00:10:244::3"),
}
PORTS = (8080, 9090)
PROFILE = Policy("pro/net", ingress=(RuleMatch("Allow"),), egress=(RuleMatch("Allow"),))


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def root_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout


@dataclass
class Lab:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    made: list[str] = field(default_factory=list)
    listeners: list[socket.socket] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"tpd-{self.tag}-{name}"

    def path(self, name: str) -> str:
        return f"/run/netns/{self.ns(name)}"

    def add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", self.ns(name))
        self.made.append(self.ns(name))
        sh("ip", "-n", self.ns(name), "link", "set", "lo", "up")

    def iface(self, pod: str) -> str:
        return host_ifname("net", self.ns(pod), "eth0")

    def build(self) -> None:
        self.add_ns("host")
        self.add_ns("out")
        host, out = self.ns("host"), self.ns("out")
        sh("ip", "-n", host, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1", "netns", out)
        for ns, dev, v4, v6 in ((host, "uplink0", NODE_V4, NODE_V6), (out, "uplink1", OUTSIDE_V4, OUTSIDE_V6)):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # The node's default routes (proxy ARP answers for 169.254.1.1 only when the host can route it).
        # The outside knows no route to the pools: only NAT-outgoing traffic can get an answer.
        sh("ip", "-n", host, "route", "add", "default", "via", OUTSIDE_V4)
        sh("ip", "-n", host, "-6", "route", "add", "default", "via", OUTSIDE_V6)
        for pod, (v4, v6) in PODS.items():
            self.add_ns(pod)
            with netns(self.path("host")):
                wiring.setup(
                    self.path(pod), "eth0", self.iface(pod), 1500, [ip_interface(f"{v4}/32"), ip_interface(f"{v6}/128")]
                )
            for port in PORTS:
                self.serve(pod, port)
        self.serve("out", 8080)

    def serve(self, name: str, port: int) -> None:
        """A dual-stack TCP server in the namespace that answers each connection with the peer's address."""
        with netns(self.path(name)):
            listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)  # the socket stays in the namespace
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", port))
        listener.listen(32)
        self.listeners.append(listener)

        def answer() -> None:
            while True:
                try:
                    conn, peer = listener.accept()
                except OSError:
                    return  # closed at teardown
                with conn:
                    conn.sendall(peer[0].removeprefix("::ffff:").encode() + b"\n")

        threading.Thread(target=answer, daemon=True).start()

    def delete(self) -> None:
        for listener in self.listeners:
            listener.close()
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    # --- the table ---------------------------------------------------------------------------------------------

    def dispatch(self, pod: str, direction: str) -> str | None:
        """The chain the kernel's dispatch map sends the pod's interface to (``to-wl``: its ingress,
        ``from-wl``: its egress), or None when the map has no element for it."""
        listing = json.loads(sh("ip", "netns", "exec", self.ns("host"), "nft", "-j", "list", "map", "inet", "tortie",
                                "to-wl" if direction == "ingress" else "from-wl"))
        elements = next(item["map"] for item in listing["nftables"] if "map" in item).get("elem", [])
        return next((verdict["goto"]["target"] for key, verdict in elements if key == self.iface(pod)), None)

    def unused_chains(self) -> set[str]:
        """The endpoint-list chains of the table that no dispatch map element goes to."""
        listing = json.loads(sh("ip", "netns", "exec", self.ns("host"), "nft", "-j", "list", "table", "inet", "tortie"))
        chains = {item["chain"]["name"] for item in listing["nftables"] if "chain" in item}
        targets = {verdict["goto"]["target"] for item in listing["nftables"] if "map" in item
                   for _, verdict in item["map"].get("elem", [])}
        return {c for c in chains if c.startswith(("to-", "from-")) and c != "forward-to-wl"} - targets

    # --- traffic -----------------------------------------------------------------------------------------------

    def address(self, name: str, version: int) -> str:
        return PODS[name][0 if version == 4 else 1]

    def ping(self, src: str, dst: str) -> bool:
        argv = ["ip", "netns", "exec", self.ns(src), "ping", "-c", "1", "-w", "2", dst]
        return subprocess.run(argv, capture_output=True).returncode == 0

    def seen_as(self, src: str, dst: str, port: int = 8080) -> str | None:
        """Connect from ``src`` to ``dst``: the source address the server saw, or None when blocked."""
        with netns(self.path(src)):
            conn = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_STREAM)
        conn.settimeout(1.5)
        try:
            conn.connect((dst, port))
            return conn.recv(100).decode().strip()
        except OSError:
            return None
        finally:
            conn.close()

    def answers(self, src: str, dst: str, port: int, expected_source: str) -> bool:
        return self.seen_as(src, dst, port) == expected_source

    def reaches(self, src: str, dst: str, port: int = 8080) -> bool:
        """Both families, ping and TCP (checked side by side), must agree: a split verdict fails the test."""
        checks = []
        with ThreadPoolExecutor(4) as pool:
            for version in (4, 6):
                address, mine = self.address(dst, version), self.address(src, version)
                checks.append(pool.submit(self.ping, src, address))
                checks.append(pool.submit(self.answers, src, address, port, mine))
        results = {check.result() for check in checks}
        assert len(results) == 1, f"{src} → {dst}: the families or protocols disagree"
        return results.pop()


@contextlib.contextmanager
def built_lab() -> Iterator[Lab]:
    """This module's lab, built and always removed; the root ruleset must be left as it was (the
    ``lab`` fixture of every module that uses this lab)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces and nftables tables in them")
    before = root_ruleset()
    made = Lab()
    try:
        made.build()
        yield made
    finally:
        made.delete()
        assert root_ruleset() == before, "the root namespace's ruleset changed"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with built_lab() as made:
        yield made


@dataclass
class Agent:
    """The two managers sharing one driver, pointed at the lab's host namespace."""

    lab: Lab
    table: NftTable = field(init=False)

    def __post_init__(self) -> None:
        self.table = NftTable(netns=self.lab.ns("host"))
        self.policy = PolicyManager(self.table)
        self.masq = MasqManager(self.table)

    def endpoint(
        self,
        pod: str,
        ingress: tuple[str, ...] = (),
        egress: tuple[str, ...] = (),
        profiles: tuple[str, ...] = ("pro/net",),
    ) -> Endpoint:
        v4, v6 = PODS[pod]
        return Endpoint(f"t/{pod}", self.lab.iface(pod), (f"{v4}/32", f"{v6}/128"), ingress, egress, profiles)

    def apply(
        self,
        endpoints: list[Endpoint],
        policies: Sequence[Policy] = (),
        ipsets: Sequence[IPSet] = (),
        nat_pools: frozenset[str] = POOLS,
    ) -> str:
        state = DesiredState(
            node="lab",
            endpoints=frozenset(endpoints),
            policies=frozenset([PROFILE, *policies]),
            ipsets=frozenset(ipsets),
            nat_pools=nat_pools,
            all_pools=POOLS,
        )
        self.policy.on_update(state)
        self.masq.on_update(state)
        written = self.policy.apply()
        self.masq.apply()
        return written


def members(*pods: str) -> list[IPSet]:
    """The selector set ``fe`` holding the given pods (both families)."""
    return [
        IPSet("fe", 4, members=frozenset(f"{PODS[p][0]}/32" for p in pods)),
        IPSet("fe", 6, members=frozenset(f"{PODS[p][1]}/128" for p in pods)),
    ]


def all_pods(agent: Agent, **overrides: Endpoint) -> list[Endpoint]:
    return [overrides.get(pod, agent.endpoint(pod)) for pod in PODS]


def test_default_allow_through_the_profile_and_drop_without_one(lab: Lab) -> None:
    agent = Agent(lab)
    agent.apply(all_pods(agent))
    assert lab.reaches("c1", "c2") and lab.reaches("c2", "c1")
    assert lab.ping("c1", NODE_V4) and lab.ping("c1", NODE_V6)  # workload → host runs its egress (allowed)
    # no profile, no policy: nothing passes, either way
    agent.apply(all_pods(agent, c3=agent.endpoint("c3", profiles=())))
    assert not lab.reaches("c1", "c3") and not lab.reaches("c3", "c1")
    assert not lab.ping("c3", NODE_V4)
    # c1 and c2 have the same policy lists: one chain per direction serves both; c3's are its own
    assert lab.dispatch("c1", "ingress") == lab.dispatch("c2", "ingress") != lab.dispatch("c3", "ingress")
    assert lab.dispatch("c1", "egress") == lab.dispatch("c2", "egress") != lab.dispatch("c3", "egress")
    # an endpoint that is gone: its interface has no map entry, and an unknown tor* interface is dropped;
    # the chains no endpoint uses any more are gone too
    agent.apply([agent.endpoint("c1"), agent.endpoint("c2")])
    assert lab.dispatch("c3", "ingress") is None and lab.dispatch("c3", "egress") is None
    assert lab.unused_chains() == set()
    assert not lab.reaches("c1", "c3") and not lab.reaches("c3", "c1")
    assert lab.reaches("c1", "c2")


def test_deny_all_ingress(lab: Lab) -> None:
    agent = Agent(lab)
    deny = Policy("np/t/deny-ingress")  # selects c2 for ingress and allows nothing
    agent.apply(all_pods(agent, c2=agent.endpoint("c2", ingress=(deny.id,))), [deny])
    assert not lab.reaches("c1", "c2") and not lab.reaches("c3", "c2")
    assert lab.reaches("c2", "c1")  # c2's egress is untouched, and the answers come back
    assert lab.ping("c2", NODE_V4) and sh(
        "ip", "netns", "exec", lab.ns("host"), "ping", "-c", "1", "-w", "2", OUTSIDE_V4
    )


def test_allow_by_label_and_a_label_change_is_set_elements_only(lab: Lab) -> None:
    agent = Agent(lab)
    allow_fe = Policy("np/t/allow-fe", ingress=(RuleMatch("Allow", src_sets=("fe",)),))
    pods = all_pods(agent, c2=agent.endpoint("c2", ingress=(allow_fe.id,)))
    agent.apply(pods, [allow_fe], members("c1"))
    assert lab.reaches("c1", "c2") and not lab.reaches("c3", "c2")
    assert lab.reaches("c2", "c1") and lab.reaches("c2", "c3")

    written = agent.apply(pods, [allow_fe], members("c3"))  # c1 loses the label, c3 gets it
    lines = [line for line in written.splitlines() if line != "add table inet tortie"]
    assert lines == [
        "delete element inet tortie s-fe-v4 { 10.244.0.1 }",
        "delete element inet tortie s-fe-v6 { fd00:10:244::1 }",
        "add element inet tortie s-fe-v4 { 10.244.0.3 }",
        "add element inet tortie s-fe-v6 { fd00:10:244::3 }",
    ]
    assert lab.reaches("c3", "c2") and not lab.reaches("c1", "c2")
    assert lab.reaches("c2", "c1") and lab.reaches("c2", "c3")


def test_allow_by_port_and_protocol(lab: Lab) -> None:
    agent = Agent(lab)
    web = Policy("np/t/web", ingress=(RuleMatch("Allow", protocol=6, dst_ports=((8080, 8080),)),))
    agent.apply(all_pods(agent, c2=agent.endpoint("c2", ingress=(web.id,))), [web])
    for version in (4, 6):
        c1, c2 = lab.address("c1", version), lab.address("c2", version)
        assert lab.seen_as("c1", c2, 8080) == c1
        assert lab.seen_as("c1", c2, 9090) is None
        assert not lab.ping("c1", c2)
        assert lab.seen_as("c2", c1, 9090) == c2 and lab.ping("c2", c1)  # the other direction is not c2's ingress


def test_egress_deny_to_a_net(lab: Lab) -> None:
    agent = Agent(lab)
    no_c3 = Policy(
        "np/t/no-c3",
        egress=(RuleMatch("Deny", dst_nets=("10.244.0.3/32", "fd00:10:244::3/128")), RuleMatch("Allow")),
    )
    agent.apply(all_pods(agent, c1=agent.endpoint("c1", egress=(no_c3.id,))), [no_c3])
    assert not lab.reaches("c1", "c3") and lab.reaches("c1", "c2")
    assert lab.reaches("c3", "c1")  # c3 may open connections to c1; c1's answers are established traffic


def test_pass_goes_to_the_profiles_and_skips_the_later_policies(lab: Lab) -> None:
    agent = Agent(lab)
    pass_fe = Policy("np/t/pass-fe", ingress=(RuleMatch("Pass", src_sets=("fe",)),))
    deny = Policy("np/t/deny", ingress=(RuleMatch("Deny"),))
    c2 = agent.endpoint("c2", ingress=(pass_fe.id, deny.id))
    agent.apply(all_pods(agent, c2=c2), [pass_fe, deny], members("c1"))
    assert lab.reaches("c1", "c2")  # passed: the profile allows it
    assert not lab.reaches("c3", "c2")  # not passed: the Deny policy drops it
    assert lab.reaches("c2", "c3")
    # a Pass with no profile to go to is dropped
    agent.apply(
        all_pods(agent, c2=agent.endpoint("c2", ingress=(pass_fe.id, deny.id), profiles=())),
        [pass_fe, deny],
        members("c1"),
    )
    assert not lab.reaches("c1", "c2")


def test_order_a_deny_before_an_allow_wins(lab: Lab) -> None:
    agent = Agent(lab)
    deny_c1 = Policy("np/t/deny-c1", ingress=(RuleMatch("Deny", src_sets=("fe",)),))
    allow = Policy("np/t/allow-all", ingress=(RuleMatch("Allow"),))
    agent.apply(
        all_pods(agent, c2=agent.endpoint("c2", ingress=(deny_c1.id, allow.id))), [deny_c1, allow], members("c1")
    )
    assert not lab.reaches("c1", "c2") and lab.reaches("c3", "c2")
    assert lab.reaches("c2", "c1")
    agent.apply(
        all_pods(agent, c2=agent.endpoint("c2", ingress=(allow.id, deny_c1.id))), [deny_c1, allow], members("c1")
    )
    assert lab.reaches("c1", "c2") and lab.reaches("c3", "c2")


def test_nat_outgoing_only_to_outside_the_pools(lab: Lab) -> None:
    agent = Agent(lab)
    agent.apply(all_pods(agent))
    assert lab.seen_as("c1", OUTSIDE_V4) == NODE_V4  # masqueraded to the node's address
    assert lab.seen_as("c1", OUTSIDE_V6) == NODE_V6
    assert lab.seen_as("c1", "10.244.0.2") == "10.244.0.1"  # pool to pool keeps its source
    assert lab.seen_as("c1", "fd00:10:244::2") == "fd00:10:244::1"
    # without natOutgoing the outside sees the pod's address, has no route back, and the connection fails
    agent.apply(all_pods(agent), nat_pools=frozenset())
    assert lab.seen_as("c1", OUTSIDE_V4) is None and lab.seen_as("c1", OUTSIDE_V6) is None
    agent.apply(all_pods(agent))
    assert lab.seen_as("c2", OUTSIDE_V4) == NODE_V4


def test_a_restart_writes_nothing_and_a_resync_repairs_hand_edits(lab: Lab) -> None:
    agent = Agent(lab)
    deny = Policy("np/t/deny-ingress")
    pods = all_pods(agent, c2=agent.endpoint("c2", ingress=(deny.id,)))
    agent.apply(pods, [deny])
    restarted = Agent(lab)
    assert restarted.apply(pods, [deny]) == ""  # read back, recognised, nothing to write
    assert not lab.reaches("c1", "c2")

    host = ["ip", "netns", "exec", lab.ns("host"), "nft"]
    to_c2 = lab.dispatch("c2", "ingress")
    assert to_c2 is not None
    sh(*host, "flush", "chain", "inet", "tortie", to_c2)  # someone empties c2's ingress chain ...
    sh(*host, "delete", "element", "inet", "tortie", "from-wl", f'{{ "{lab.iface("c1")}" }}')  # ... and unhooks c1
    assert lab.reaches("c1", "c3") is False  # c1's interface is unknown now: dropped
    assert restarted.policy.apply(resync=True) != ""
    assert lab.reaches("c1", "c3") and not lab.reaches("c1", "c2")
    from_c1 = lab.dispatch("c1", "egress")
    assert from_c1 is not None
    listing = sh(*host, "list", "chain", "inet", "tortie", from_c1)
    assert "jump pro-" in listing
