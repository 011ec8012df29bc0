"""The route manager's diff against fake read-backs: no root, no kernel.

The fake kernel keeps every main-table route (Tortie's and foreign ones) keyed as the kernel keys
them (prefix and metric), and refuses an ``add`` over an existing key as the kernel does.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from felix_agent.calc.model import DesiredState, Route, VXLANPeer
from felix_agent.dataplane.errors import ApplyError
from felix_agent.dataplane.route_desired import kernel_route
from felix_agent.dataplane.routes import RouteManager, RouteOp, plan, satisfies
from felix_agent.dataplane.vxlan import vtep_link_local
from kernel.netlink import KernelError
from kernel.rtnl import KernelRoute, Link

VX = "vxlan.tortie"
PEER2 = VXLANPeer("n2", "198.18.0.12", "10.244.2.1", "66:74:6f:72:00:02")
PEER3 = VXLANPeer("n3", "198.18.0.13", "10.244.3.1", "66:74:6f:72:00:03")


@dataclass
class FakeKernel:
    """Implements the route manager's driver protocol over a list of routes."""

    routes_: list[KernelRoute] = field(default_factory=list)
    links_: dict[str, int] = field(default_factory=lambda: {"lo": 1, "eth0": 2, "vxlan.tortie": 3})
    writes: list[tuple[str, KernelRoute]] = field(default_factory=list)
    reads: int = 0  # full listings of the links (every full apply starts with one)

    def links(self) -> list[Link]:
        return [Link(i, n, None, 1500, None, True) for n, i in self.links_.items()]

    def link_indexes(self) -> dict[str, int]:
        self.reads += 1
        return dict(self.links_)

    def link(self, name: str) -> Link | None:
        return Link(self.links_[name], name, None, 1500, None, True) if name in self.links_ else None

    def routes(self, protocol: int | None = None, indexes: Mapping[str, int] | None = None) -> list[KernelRoute]:
        return [r for r in self.routes_ if protocol is None or r.proto == protocol]

    def route_at(self, address: str) -> KernelRoute:
        """The entry with the longest prefix holding ``address`` (``ip route get fibmatch``), device by index."""
        import ipaddress
        found = [r for r in self.routes_ if ipaddress.ip_address(address) in ipaddress.ip_network(r.dst)]
        if not found:
            raise KernelError("route get", errno.ENETUNREACH)
        best = max(found, key=lambda r: ipaddress.ip_network(r.dst).prefixlen)
        return best.replace(device=None)

    def _resolve(self, r: KernelRoute) -> KernelRoute:
        if r.type == "unicast" and r.device is not None:
            if r.device not in self.links_:
                raise KernelError(f"route {r.dst}", errno.ENODEV)
            return r.replace(ifindex=self.links_[r.device])
        return r

    def _at_key(self, r: KernelRoute) -> list[KernelRoute]:
        return [x for x in self.routes_ if (x.dst, x.metric) == (r.dst, r.metric)]

    def add_route(self, route: KernelRoute) -> None:
        self.writes.append(("add", route))
        if self._at_key(route):
            raise KernelError(f"add route {route.dst}", errno.EEXIST)
        self.routes_.append(self._resolve(route))

    def replace_route(self, route: KernelRoute) -> None:
        self.writes.append(("replace", route))
        new = self._resolve(route)
        for old in self._at_key(route):
            self.routes_.remove(old)
        self.routes_.append(new)

    def delete_route(self, route: KernelRoute) -> None:
        self.writes.append(("delete", route))
        for old in self.routes_:
            if (old.dst, old.metric, old.proto) == (route.dst, route.metric, route.proto):
                self.routes_.remove(old)
                return
        raise KernelError(f"delete route {route.dst}", errno.ESRCH)

    def link_up(self, name: str, index: int) -> None:
        self.links_[name] = index

    def link_down(self, name: str) -> None:
        """The link goes, and the kernel takes its routes with it."""
        index = self.links_.pop(name)
        self.routes_ = [r for r in self.routes_ if r.ifindex != index]


def local(dst: str, dev: str, index: int, proto: int = 80) -> KernelRoute:
    return KernelRoute(dst, device=dev, scope="link", proto=proto, ifindex=index)


def state(*routes: Route, peers: frozenset[VXLANPeer] = frozenset({PEER2, PEER3})) -> DesiredState:
    return DesiredState(node="n1", routes=frozenset(routes), vxlan_peers=peers)


BLOCK1 = Route("10.244.1.0/26", "blackhole", node="n1")
TO_N2 = Route("10.244.2.0/26", "vxlan", gateway="10.244.2.1", node="n2")
TO_N3 = Route("10.244.3.0/26", "vxlan", gateway="10.244.3.1", node="n3")
FOREIGN = [
    KernelRoute("0.0.0.0/0", gateway="198.18.0.1", device="eth0", proto=3, ifindex=2),  # boot
    KernelRoute("198.18.0.0/24", device="eth0", scope="link", proto=2, ifindex=2),  # kernel
    KernelRoute("10.244.9.0/26", gateway="198.18.0.19", device="eth0", proto=81, ifindex=2),  # BGP-learned
]


def manager(kernel: FakeKernel, *routes: Route) -> RouteManager:
    m = RouteManager(kernel)
    m.on_update(state(*routes))
    return m


# -- translation ---------------------------------------------------------------------------------


def test_each_kind_becomes_the_kernel_route_calico_programs() -> None:
    peers = {"n2": PEER2}
    assert kernel_route(Route("10.244.1.5/32", "local", device="torabc"), peers) == KernelRoute(
        "10.244.1.5/32", device="torabc", scope="link", proto=80)
    assert kernel_route(Route("fd00::5/128", "local", device="torabc"), peers) == KernelRoute(
        "fd00::5/128", device="torabc", proto=80)
    assert kernel_route(BLOCK1, peers) == KernelRoute("10.244.1.0/26", type="blackhole", proto=80)
    assert kernel_route(TO_N2, peers) == KernelRoute(
        "10.244.2.0/26", gateway="10.244.2.1", device="vxlan.tortie", onlink=True, proto=80)
    # No gateway given: the VTEP of the route's node.
    assert kernel_route(Route("10.244.2.64/32", "vxlan", node="n2"), peers).gateway == "10.244.2.1"
    # IPv6 over the same device: via the peer VTEP's link-local address, derived from its MAC.
    v6 = kernel_route(Route("fd00:10:244:2::/122", "vxlan", gateway="10.244.2.1", node="n2"), peers)
    assert v6 == KernelRoute("fd00:10:244:2::/122", gateway="fe80::6474:6fff:fe72:2", device="vxlan.tortie", proto=80)
    assert vtep_link_local(PEER2.vtep_mac) == "fe80::6474:6fff:fe72:2"
    assert kernel_route(Route("10.244.3.0/26", "ipip", gateway="10.9.2.13"), peers) == KernelRoute(
        "10.244.3.0/26", gateway="10.9.2.13", device="tunl0", onlink=True, proto=80)
    assert kernel_route(Route("10.244.3.0/26", "direct", gateway="198.18.0.13"), peers) == KernelRoute(
        "10.244.3.0/26", gateway="198.18.0.13", proto=80)
    # Not canonical on input, canonical in the kernel's terms.
    assert kernel_route(Route("10.244.1.7/26", "blackhole"), peers).dst == "10.244.1.0/26"


@pytest.mark.parametrize(
    "route",
    [
        Route("10.244.1.5/32", "local"),  # no device
        Route("fd00:1::/122", "ipip", gateway="10.9.0.2"),  # IPIP is IPv4 only
        Route("10.244.4.0/26", "vxlan", node="n4"),  # unknown VTEP
        Route("10.244.4.0/26", "direct"),  # no gateway
        Route("10.244.4.0/26", "bgp"),
    ],
)
def test_routes_that_cannot_be_made_are_rejected(route: Route) -> None:
    with pytest.raises(ValueError):
        kernel_route(route, {"n2": PEER2})


# -- plan ----------------------------------------------------------------------------------------


def test_plan_adds_replaces_and_removes_only_its_own_routes() -> None:
    desired = {
        "10.244.1.0/26": KernelRoute("10.244.1.0/26", type="blackhole", proto=80),
        "10.244.2.0/26": KernelRoute("10.244.2.0/26", gateway="10.244.2.1", device=VX, onlink=True, proto=80),
        "10.244.3.0/26": KernelRoute("10.244.3.0/26", gateway="10.244.3.1", device=VX, onlink=True, proto=80),
    }
    actual = [
        *FOREIGN,
        KernelRoute("10.244.1.0/26", type="blackhole", proto=80),  # in sync
        KernelRoute("10.244.2.0/26", gateway="10.244.2.99", device=VX, onlink=True, ifindex=3, proto=80),  # wrong
        KernelRoute("10.244.4.0/26", gateway="10.244.4.1", device=VX, onlink=True, ifindex=3, proto=80),  # stale
    ]
    ops = plan(desired, actual)
    assert ops == [
        RouteOp("delete", actual[-1]),
        RouteOp("replace", desired["10.244.2.0/26"]),
        RouteOp("add", desired["10.244.3.0/26"]),
    ]
    assert not any(op.route in FOREIGN for op in ops)


def test_plan_for_a_kernel_in_sync_is_empty() -> None:
    desired = {"10.244.1.0/26": KernelRoute("10.244.1.0/26", type="blackhole", proto=80)}
    # v6 blackholes hang on lo when read back; a device left to the kernel matches any.
    actual = [*FOREIGN, KernelRoute("10.244.1.0/26", type="blackhole", device=None, proto=80)]
    assert plan(desired, actual) == []
    direct = {"10.244.3.0/26": KernelRoute("10.244.3.0/26", gateway="198.18.0.13", proto=80)}
    assert plan(direct, [KernelRoute("10.244.3.0/26", gateway="198.18.0.13", device="eth0", ifindex=2, proto=80)]) == []


def test_plan_never_replaces_a_foreign_route_on_the_same_prefix() -> None:
    want = KernelRoute("10.244.2.0/26", gateway="10.244.2.1", device=VX, onlink=True, proto=80)
    foreign = KernelRoute("10.244.2.0/26", gateway="198.18.0.12", device="eth0", proto=81, ifindex=2)
    assert plan({want.dst: want}, [foreign]) == [RouteOp("add", want)]


def test_plan_drops_an_extra_metric_of_its_own() -> None:
    want = KernelRoute("fd00:1::/122", type="blackhole", proto=80)
    extra = KernelRoute("fd00:1::/122", type="blackhole", metric=100, proto=80)
    assert plan({want.dst: want}, [want, extra]) == [RouteOp("delete", extra)]
    assert plan({want.dst: want}, [extra]) == [RouteOp("add", want), RouteOp("delete", extra)]


# -- the manager over the fake kernel -------------------------------------------------------------


def test_first_apply_programs_everything_and_the_second_writes_nothing() -> None:
    kernel = FakeKernel(list(FOREIGN))
    m = manager(kernel, BLOCK1, TO_N2, TO_N3)
    assert m.apply() == 3
    assert {r.dst for r in kernel.routes_ if r.proto == 80} == {"10.244.1.0/26", "10.244.2.0/26", "10.244.3.0/26"}
    kernel.writes.clear()
    assert m.apply() == 0
    assert kernel.writes == []
    assert all(r in kernel.routes_ for r in FOREIGN)


def test_a_route_deleted_out_of_band_is_restored_and_a_stale_one_removed() -> None:
    kernel = FakeKernel(list(FOREIGN))
    m = manager(kernel, BLOCK1, TO_N2, TO_N3)
    m.apply()
    kernel.routes_ = [r for r in kernel.routes_ if r.dst != "10.244.2.0/26"]
    kernel.routes_.append(
        KernelRoute("10.244.7.0/26", gateway="10.244.7.1", device="vxlan.tortie", onlink=True, ifindex=3, proto=80)
    )
    kernel.writes.clear()
    assert m.apply() == 0  # between resyncs the manager trusts its view: out-of-band changes wait
    assert m.apply(resync=True) == 2
    assert [w[0] for w in kernel.writes] == ["delete", "add"]
    assert {r.dst for r in kernel.routes_ if r.proto == 80} == {"10.244.1.0/26", "10.244.2.0/26", "10.244.3.0/26"}


def test_node_removal_removes_its_routes() -> None:
    kernel = FakeKernel(list(FOREIGN))
    m = manager(kernel, BLOCK1, TO_N2, TO_N3)
    m.apply()
    m.on_update(state(BLOCK1, TO_N2, peers=frozenset({PEER2})))
    assert m.apply() == 1
    assert "10.244.3.0/26" not in {r.dst for r in kernel.routes_}


def test_a_changed_route_is_replaced_in_place() -> None:
    kernel = FakeKernel(list(FOREIGN))
    m = manager(kernel, BLOCK1, TO_N2)
    m.apply()
    kernel.writes.clear()
    m.on_update(state(BLOCK1, Route("10.244.2.0/26", "direct", gateway="198.18.0.12")))
    assert m.apply() == 1
    assert kernel.writes == [("replace", KernelRoute("10.244.2.0/26", gateway="198.18.0.12", proto=80))]


def test_the_cni_plugins_identical_local_route_is_left_alone() -> None:
    kernel = FakeKernel([*FOREIGN, local("10.244.1.5/32", "tor1", 10)])
    kernel.link_up("tor1", 10)
    m = manager(kernel, BLOCK1, Route("10.244.1.5/32", "local", device="tor1"))
    assert m.apply() == 1  # the blackhole only
    assert kernel.writes == [("add", KernelRoute("10.244.1.0/26", type="blackhole", proto=80))]


def test_an_unknown_local_route_on_a_live_veth_is_kept_until_its_endpoint_is_known_gone() -> None:
    kernel = FakeKernel([*FOREIGN, local("10.244.1.5/32", "tor1", 10), local("10.244.1.6/32", "tor2", 11)])
    kernel.link_up("tor1", 10)
    kernel.link_up("tor2", 11)
    m = manager(kernel, BLOCK1)
    m.apply()  # neither endpoint known yet: a fresh ADD
    assert {r.dst for r in kernel.routes_} >= {"10.244.1.5/32", "10.244.1.6/32"}
    assert not any(action == "delete" for action, _ in kernel.writes)

    m.on_update(state(BLOCK1, Route("10.244.1.5/32", "local", device="tor1")))
    assert m.apply() == 0
    m.on_update(state(BLOCK1))  # the endpoint on tor1 is gone; its veth lingers
    assert m.apply() == 1
    assert kernel.writes[-1] == ("delete", local("10.244.1.5/32", "tor1", 10))
    assert "10.244.1.6/32" in {r.dst for r in kernel.routes_}  # still unknown, still kept


def test_a_recreated_veth_keeps_its_route_although_the_old_endpoint_was_retired() -> None:
    kernel = FakeKernel([*FOREIGN, local("10.244.1.5/32", "tor1", 10)])
    kernel.link_up("tor1", 10)
    m = manager(kernel, Route("10.244.1.5/32", "local", device="tor1"))
    m.apply()
    m.on_update(state())  # endpoint deleted...
    kernel.link_down("tor1")  # ... its veth too, and a retried ADD makes it again
    kernel.link_up("tor1", 12)
    kernel.routes_.append(local("10.244.1.5/32", "tor1", 12))
    kernel.writes.clear()
    assert m.apply() == 0
    assert kernel.writes == []


def test_a_stale_route_of_ours_that_is_not_a_local_route_goes() -> None:
    kernel = FakeKernel([*FOREIGN, local("10.244.1.5/32", "eth0", 2)])
    m = manager(kernel)
    assert m.apply() == 1
    assert "10.244.1.5/32" not in {r.dst for r in kernel.routes_}


def test_routes_through_missing_devices_wait_and_failures_are_reported_after_the_rest() -> None:
    kernel = FakeKernel(list(FOREIGN))
    del kernel.links_["vxlan.tortie"]
    m = manager(kernel, BLOCK1, TO_N2, Route("10.244.1.5/32", "local", device="tor9"))
    assert m.apply() == 1  # the blackhole; the others wait for their devices
    kernel.link_up("vxlan.tortie", 3)
    assert m.apply() == 1
    kernel.add_route = _refuse  # type: ignore[method-assign]
    m.on_update(state(BLOCK1, TO_N2, TO_N3))
    with pytest.raises(ApplyError, match="10.244.3.0/26"):
        m.apply()


def test_a_foreign_route_on_a_desired_prefix_is_a_conflict_not_an_error() -> None:
    foreign = KernelRoute("10.244.2.0/26", gateway="198.18.0.12", device="eth0", proto=81, ifindex=2)
    kernel = FakeKernel([*FOREIGN, foreign])
    m = manager(kernel, BLOCK1, TO_N2)
    assert m.apply() == 1
    assert foreign in kernel.routes_
    assert not any(r.dst == "10.244.2.0/26" and r.proto == 80 for r in kernel.routes_)


def _refuse(route: KernelRoute) -> None:
    raise KernelError(f"add route {route.dst}", errno.ENETUNREACH)


def test_between_resyncs_a_new_endpoint_costs_no_listing_and_a_resync_reads_again() -> None:
    kernel = FakeKernel(list(FOREIGN))
    m = manager(kernel, BLOCK1, TO_N2)
    m.apply()
    assert kernel.reads == 1
    kernel.link_up("tor1", 10)  # a new pod's veth, and the CNI plugin's own route on it
    kernel.routes_.append(local("10.244.1.5/32", "tor1", 10))
    kernel.link_up("tor2", 11)  # another, whose route the agent writes
    kernel.writes.clear()
    m.on_update(state(BLOCK1, TO_N2, Route("10.244.1.5/32", "local", device="tor1"),
                      Route("10.244.1.6/32", "local", device="tor2")))
    assert m.apply() == 1
    # tor1's add is refused (the plugin's route is there already: a lookup settles it), tor2's is made
    assert [(action, r.dst) for action, r in kernel.writes] == [("add", "10.244.1.5/32"), ("add", "10.244.1.6/32")]
    assert local("10.244.1.6/32", "tor2", 11) in kernel.routes_
    assert kernel.reads == 1  # no listing of links or routes
    m.on_update(state(BLOCK1, TO_N2, Route("10.244.1.5/32", "local", device="tor1")))  # tor2's pod goes
    assert m.apply() == 1 and "10.244.1.6/32" not in {r.dst for r in kernel.routes_}
    kernel.link_down("tor1")  # tor1's pod is deleted with its veth: the kernel took the route
    m.on_update(state(BLOCK1, TO_N2))
    assert m.apply() == 0 and kernel.reads == 1
    assert m.apply(resync=True) == 0 and kernel.reads == 2
    assert {r.dst for r in kernel.routes_ if r.proto == 80} == {"10.244.1.0/26", "10.244.2.0/26"}


def test_between_resyncs_a_foreign_route_on_a_new_prefix_is_still_a_conflict() -> None:
    kernel = FakeKernel(list(FOREIGN))
    m = manager(kernel, BLOCK1)
    m.apply()
    foreign = KernelRoute("10.244.3.0/26", gateway="198.18.0.13", device="eth0", proto=81, ifindex=2)
    kernel.routes_.append(foreign)
    m.on_update(state(BLOCK1, TO_N3))
    assert m.apply() == 0
    assert foreign in kernel.routes_ and not any(r.dst == "10.244.3.0/26" and r.proto == 80 for r in kernel.routes_)


def test_a_resync_reads_on_a_thread_and_a_later_apply_adopts_it_with_the_writes_made_meanwhile() -> None:
    import contextlib
    import threading

    kernel = FakeKernel(list(FOREIGN))
    read_done = threading.Event()
    m = RouteManager(kernel, reader=lambda: contextlib.nullcontext(kernel), wake=read_done.set)
    m.on_update(state(BLOCK1, TO_N2))
    m.apply()
    kernel.routes_ = [r for r in kernel.routes_ if r.dst != "10.244.2.0/26"]  # out of band
    assert m.apply(resync=True) == 0  # the read runs on its thread; nothing waits for it
    assert read_done.wait(5) and m.wants_apply
    kernel.link_up("tor1", 10)  # a new pod while the read waits to be adopted: not in the read
    kernel.writes.clear()
    m.on_update(state(BLOCK1, TO_N2, Route("10.244.1.5/32", "local", device="tor1")))
    assert m.apply() == 2  # the adoption: the deleted route is repaired, the new pod's route made
    made = sorted((action, r.dst) for action, r in kernel.writes)
    assert made == [("add", "10.244.1.5/32"), ("add", "10.244.2.0/26")]
    assert not m.wants_apply and m.apply() == 0

    # a read overtaken by a write: the write stands, the read repairs the rest
    read_done.clear()
    kernel.routes_ = [r for r in kernel.routes_ if r.dst != "10.244.2.0/26"]
    assert m.apply(resync=True) == 0
    assert read_done.wait(5)
    kernel.link_up("tor2", 11)
    assert m._read is not None  # as if the manager had written this route during the read:
    m._read.note_routes("10.244.1.6/32", [local("10.244.1.6/32", "tor2", 11)])
    kernel.routes_.append(local("10.244.1.6/32", "tor2", 11))
    m.on_update(state(BLOCK1, TO_N2, Route("10.244.1.5/32", "local", device="tor1"),
                      Route("10.244.1.6/32", "local", device="tor2")))
    kernel.writes.clear()
    assert m.apply() == 1
    assert [(action, r.dst) for action, r in kernel.writes] == [("add", "10.244.2.0/26")]


# ---- on_update works on what changed: whatever the sequence, the kernel ends as the state asks ----
UNIVERSE = (
    Route("10.244.1.5/32", "local", device="tora", node="n1"),
    Route("10.244.1.5/32", "local", device="torb", node="n1"),  # one address on two veths: one wins
    Route("10.244.1.6/32", "local", device="torb", node="n1"),
    Route("fd00:244::6/128", "local", device="torb", node="n1"),
    Route("10.244.1.0/26", "blackhole", node="n1"),
    Route("10.244.2.0/26", "vxlan", node="n2"),  # made from n2's VTEP: only while n2 is a peer
    Route("fd00:244:2::/122", "vxlan", node="n2"),
    Route("10.244.3.0/26", "vxlan", gateway="10.244.3.1", node="n3"),
    Route("10.244.3.0/26", "direct", gateway="198.18.0.13", node="n3"),  # the same dst, another kind
    Route("10.244.4.0/26", "vxlan", node="n4"),  # never a peer: rejected
    LATE := Route("10.244.1.7/32", "local", device="torc", node="n1"),  # its veth appears along the way
)


def wanted(routes: frozenset[Route], peers: frozenset[VXLANPeer]) -> dict[str, KernelRoute]:
    """By destination, the first route in (dst, kind, gateway, device) order that can be made."""
    by_node = {p.node: p for p in peers}
    found: dict[str, KernelRoute] = {}
    for route in sorted(routes, key=lambda r: (r.dst, r.kind, r.gateway or "", r.device or "")):
        try:
            k = kernel_route(route, by_node)
        except ValueError:
            continue
        found.setdefault(k.dst, k)
    return found


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.frozensets(st.sampled_from(UNIVERSE)),
                          st.sampled_from([frozenset({PEER2, PEER3}), frozenset({PEER3}), frozenset()]),
                          st.booleans()), min_size=1, max_size=12), st.integers(0, 12))
@example(states=[(frozenset({LATE}), frozenset(), False)] * 2, veth_at=1)
def test_the_kernel_holds_what_each_state_asks_whatever_came_before(
        states: list[tuple[frozenset[Route], frozenset[VXLANPeer], bool]], veth_at: int) -> None:
    """A route waits for its veth (made at step ``veth_at``), and is written by the first apply after."""
    kernel = FakeKernel(list(FOREIGN))
    kernel.link_up("tora", 10)
    kernel.link_up("torb", 11)
    m = RouteManager(kernel)
    for step, (routes, peers, resync) in enumerate(states):
        if step == veth_at:
            kernel.link_up("torc", 12)
        m.on_update(state(*routes, peers=peers))
        m.apply(resync=resync)
        ours = {r.dst: r for r in kernel.routes_ if r.proto == 80}
        want = {dst: k for dst, k in wanted(routes, peers).items() if k.device in (None, *kernel.links_)}
        assert ours.keys() == want.keys()
        assert all(satisfies(ours[dst], k) for dst, k in want.items())
        assert [r for r in kernel.routes_ if r.proto != 80] == FOREIGN  # nothing of anyone else's touched
