"""Learned-route decisions (bgp.learned) against a fake kernel: which route each prefix becomes,
what is never touched, and graceful restart's stale paths with a fake clock."""

from __future__ import annotations

import errno
import time

import pytest

from bgp.learned import BGP_PROTOCOL, LearnedRoutes
from bgp.model import MESH, SessionStatus
from kernel.netlink import KernelError
from kernel.rtnl import KernelRoute

UNDERLAY = KernelRoute(dst="198.18.0.0/24", device="eth0", scope="link", proto=2, ifindex=2)
DEFAULT = KernelRoute(dst="0.0.0.0/0", gateway="198.18.0.1", device="eth0", proto=3, ifindex=2)
N2, N3, FAR = "198.18.0.12", "198.18.0.13", "203.0.113.9"


class FakeKernel:
    """The main table: one route per prefix, as ``add`` / ``replace`` / ``delete`` treat it."""

    def __init__(self, *routes: KernelRoute) -> None:
        self.table = {r.dst: r for r in routes}
        self.writes: list[tuple[str, str]] = []

    def routes(self) -> list[KernelRoute]:
        return list(self.table.values())

    def add_route(self, route: KernelRoute) -> None:
        if route.dst in self.table:
            raise KernelError(f"add route {route.dst}", errno.EEXIST)
        self.writes.append(("add", route.dst))
        self.table[route.dst] = route

    def replace_route(self, route: KernelRoute) -> None:
        self.writes.append(("replace", route.dst))
        self.table[route.dst] = route

    def delete_route(self, route: KernelRoute) -> None:
        have = self.table.get(route.dst)
        if have is not None and have.proto == route.proto:
            self.writes.append(("delete", route.dst))
            del self.table[route.dst]

    def ours(self) -> dict[str, KernelRoute]:
        return {d: r for d, r in self.table.items() if r.proto == BGP_PROTOCOL}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(*routes: KernelRoute, encap: dict[str, str] | None = None) -> tuple[LearnedRoutes, FakeKernel, Clock]:
    kernel, clock = FakeKernel(UNDERLAY, DEFAULT, *routes), Clock()
    return LearnedRoutes(kernel, encap_for=(encap or {}).get, clock=clock), kernel, clock


def down(peer: str) -> SessionStatus:
    return SessionStatus(peer, MESH, "Active", "2025-01-01T00:00:00+00:00", "closing connection")


def test_next_hop_on_a_connected_subnet_is_routed_directly() -> None:
    learned, kernel, _ = make()
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    learned.apply()
    assert kernel.ours() == {"10.244.2.0/26": KernelRoute(dst="10.244.2.0/26", gateway=N2, device="eth0",
                                                          proto=BGP_PROTOCOL, ifindex=2)}


def test_an_ipip_pool_goes_through_tunl0_onlink() -> None:
    learned, kernel, _ = make(encap={"10.244.2.0/26": "ipip"})
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    learned.apply()
    route = kernel.ours()["10.244.2.0/26"]
    assert (route.device, route.onlink, route.gateway) == ("tunl0", True, N2)


def test_cross_subnet_ipip_only_for_next_hops_off_the_local_subnets() -> None:
    cross = {"10.244.2.0/26": "ipip-cross-subnet", "10.244.9.0/26": "ipip-cross-subnet"}
    learned, kernel, _ = make(encap=cross)
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    learned.on_route(FAR, "10.244.9.0/26", FAR, False, {})
    learned.apply()
    assert kernel.ours()["10.244.2.0/26"].device == "eth0"
    assert kernel.ours()["10.244.9.0/26"].device == "tunl0"


def test_a_next_hop_elsewhere_is_left_to_the_kernel_to_resolve() -> None:
    learned, kernel, _ = make()
    learned.on_route(FAR, "10.96.0.0/24", FAR, False, {})
    learned.apply()
    route = kernel.ours()["10.96.0.0/24"]
    assert (route.gateway, route.device, route.onlink) == (FAR, None, False)


def test_withdrawn_routes_are_removed_and_only_protocol_81_is_ever_written() -> None:
    learned, kernel, _ = make()
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    learned.apply()
    learned.on_route(N2, "10.244.2.0/26", None, True, {})
    learned.apply()
    assert kernel.ours() == {}
    assert kernel.table.keys() == {UNDERLAY.dst, DEFAULT.dst}


def test_a_prefix_another_protocol_routes_is_not_touched() -> None:
    felix = KernelRoute(dst="10.244.2.0/26", gateway=N2, device="tunl0", onlink=True, proto=80)
    learned, kernel, _ = make(felix)
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    learned.on_route(N3, "0.0.0.0/0", N3, False, {})  # a peer's default route: the host's stays
    learned.apply()
    assert kernel.table["10.244.2.0/26"] == felix
    assert kernel.table["0.0.0.0/0"] == DEFAULT
    assert learned.stats().conflicts == 2 and kernel.writes == []


def test_a_foreign_route_appearing_later_is_reported_not_overwritten() -> None:
    learned, kernel, _ = make()
    learned.apply()
    kernel.table["10.244.2.0/26"] = KernelRoute(dst="10.244.2.0/26", device="eth0", proto=4)  # added meanwhile
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    learned.apply()
    assert kernel.table["10.244.2.0/26"].proto == 4
    assert learned.stats().conflicts == 1


def test_prefixes_inside_the_underlay_are_never_installed() -> None:
    learned, kernel, _ = make()
    for prefix in ("198.18.0.0/24", "198.18.0.0/25", "198.18.0.13/32"):
        learned.on_route(N3, prefix, N3, False, {})
    learned.apply()
    assert kernel.ours() == {}


def test_the_best_path_wins_and_the_next_takes_over_when_it_goes() -> None:
    learned, kernel, _ = make()
    learned.on_route(N2, "10.244.9.0/26", N2, False, {"local-preference": 100})
    learned.on_route(N3, "10.244.9.0/26", N3, False, {"local-preference": 200})
    learned.apply()
    assert kernel.ours()["10.244.9.0/26"].gateway == N3
    learned.on_route(N3, "10.244.9.0/26", None, True, {})
    learned.apply()
    assert kernel.ours()["10.244.9.0/26"].gateway == N2


def test_a_session_down_without_graceful_restart_removes_the_peers_routes() -> None:
    learned, kernel, _ = make()
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    learned.apply()
    learned.on_session(down(N2), restart_time=0)
    learned.apply()
    assert kernel.ours() == {}


def test_graceful_restart_keeps_routes_stale_until_end_of_rib() -> None:
    learned, kernel, clock = make()
    for prefix in ("10.244.2.0/26", "10.244.102.0/26"):
        learned.on_route(N2, prefix, N2, False, {})
    learned.apply()
    learned.on_session(down(N2), restart_time=120)
    clock.now += 60
    learned.apply()
    assert set(kernel.ours()) == {"10.244.2.0/26", "10.244.102.0/26"}
    assert learned.stats().stale == 2
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})  # re-announced after the restart
    learned.on_end_of_rib(N2, "ipv4 unicast")
    learned.apply()
    assert set(kernel.ours()) == {"10.244.2.0/26"}


def test_stale_routes_expire_after_the_restart_time() -> None:
    learned, kernel, clock = make()
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    learned.apply()
    learned.on_session(down(N2), restart_time=120)
    clock.now += 119
    learned.apply()
    assert "10.244.2.0/26" in kernel.ours()
    assert learned.next_deadline() == pytest.approx(1120.0)
    clock.now += 2
    learned.apply()
    assert kernel.ours() == {}


def test_a_fresh_path_beats_a_stale_one() -> None:
    learned, kernel, _ = make()
    learned.on_route(N2, "10.244.9.0/26", N2, False, {"local-preference": 300})
    learned.on_route(N3, "10.244.9.0/26", N3, False, {})
    learned.on_session(down(N2), restart_time=120)  # e.g. one of two reflectors dies
    learned.apply()
    assert kernel.ours()["10.244.9.0/26"].gateway == N3


def test_routes_left_by_a_previous_run_are_kept_until_relearned_or_the_grace_ends() -> None:
    left = [KernelRoute(dst=p, gateway=N2, device="eth0", proto=BGP_PROTOCOL, ifindex=2)
            for p in ("10.244.2.0/26", "10.244.102.0/26")]
    learned, kernel, clock = make(*left)
    assert learned.adopt(grace=120) == 2
    learned.apply()
    assert set(kernel.ours()) == {"10.244.2.0/26", "10.244.102.0/26"} and kernel.writes == []
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    clock.now += 121
    learned.apply()
    assert set(kernel.ours()) == {"10.244.2.0/26"}


def test_a_resync_repairs_routes_changed_behind_its_back() -> None:
    learned, kernel, _ = make()
    learned.on_route(N2, "10.244.2.0/26", N2, False, {})
    learned.apply()
    del kernel.table["10.244.2.0/26"]
    kernel.table["10.244.77.0/26"] = KernelRoute(dst="10.244.77.0/26", gateway=N3, proto=BGP_PROTOCOL)
    learned.apply(resync=True)
    assert set(kernel.ours()) == {"10.244.2.0/26"}


def test_a_refused_route_is_counted_and_retried_on_resync() -> None:
    learned, kernel, _ = make()
    refuse = True

    def add(route: KernelRoute) -> None:
        if refuse:
            raise KernelError(f"add route {route.dst}", errno.ENETUNREACH)
        FakeKernel.add_route(kernel, route)

    kernel.add_route = add  # type: ignore[method-assign]
    learned.on_route(FAR, "10.96.0.0/24", FAR, False, {})
    learned.apply()
    assert learned.stats().failed == 1 and kernel.ours() == {}
    refuse = False
    learned.apply(resync=True)
    assert "10.96.0.0/24" in kernel.ours()


def test_one_apply_with_refused_and_done_writes_records_each() -> None:
    """A batch where some writes are refused: the done ones (delete, replace, adds) are what the
    manager believes installed and are counted as writes; a foreign route that appeared meanwhile
    is a conflict; an unreachable next hop is a failure."""
    learned, kernel, _ = make()
    learned.on_routes([(N2, "10.244.1.0/26", N2, False, {}), (N2, "10.244.2.0/26", N2, False, {})])
    learned.apply()
    assert learned.stats().writes == 2
    kernel.table["10.244.6.0/26"] = KernelRoute(dst="10.244.6.0/26", device="eth0", proto=4)  # added meanwhile
    learned.on_routes([
        (N2, "10.244.1.0/26", None, True, {}),  # delete
        (N3, "10.244.2.0/26", N3, False, {}),  # replace (its only path now goes through N3)
        (N2, "10.244.3.0/26", N2, False, {}),
        (N2, "10.244.4.0/26", N2, False, {}),
        (FAR, "10.244.5.0/26", FAR, False, {}),  # refused: the fake kernel cannot reach FAR
        (N2, "10.244.6.0/26", N2, False, {}),  # refused: EEXIST
    ])
    learned.on_route(N2, "10.244.2.0/26", None, True, {})
    real_add = kernel.add_route

    def add(route: KernelRoute) -> None:
        if route.gateway == FAR:
            raise KernelError(f"add route {route.dst}", errno.ENETUNREACH)
        real_add(route)

    kernel.add_route = add  # type: ignore[method-assign]
    learned.apply()
    stats = learned.stats()
    assert (stats.writes, stats.failed, stats.conflicts) == (2 + 4, 1, 1)
    assert learned.installed() == kernel.ours()
    assert sorted(kernel.ours()) == ["10.244.2.0/26", "10.244.3.0/26", "10.244.4.0/26"]
    assert kernel.ours()["10.244.2.0/26"].gateway == N3 and kernel.table["10.244.6.0/26"].proto == 4

def test_the_installer_thread_leaves_a_change_to_the_caller_that_applies_it_and_installs_one_nobody_applies(
) -> None:
    """With ``change_delay`` (felix-agent applies in the speaker's thread after each read), the
    installer thread does not race the caller for the apply; a change nobody applies (a peer
    removed outside a read) is still installed, after the delay."""
    kernel = FakeKernel(UNDERLAY, DEFAULT)
    learned = LearnedRoutes(kernel, change_delay=0.2)
    learned.apply()
    learned.start()
    try:
        for i in range(50):  # the caller applies each change itself, at once
            learned.on_route(N2, f"10.244.{i}.0/26", N2, False, {})
            learned.apply()
        assert len(kernel.ours()) == 50
        assert kernel.writes.count(("add", "10.244.0.0/26")) == 1
        learned.on_route(N2, "10.244.0.0/26", None, True, {})  # nobody applies this one
        deadline = time.monotonic() + 10
        while "10.244.0.0/26" in kernel.ours():
            assert time.monotonic() < deadline, "the installer thread never applied the withdrawal"
            time.sleep(0.01)
    finally:
        learned.stop()


def _wake_ups(tid: int) -> int:
    """How often a thread of this process has gone back to sleep (its voluntary context switches)."""
    with open(f"/proc/self/task/{tid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def test_paths_the_caller_applies_at_once_do_not_wake_the_installer_thread() -> None:
    """felix-agent's reader of ExaBGP's output records each UPDATE's paths and applies them right
    after: with ``wake=False`` the installer thread sleeps on (it woke to find nothing due, and
    took the GIL beside the apply, once per UPDATE); recorded with the default it wakes, and a
    change nobody applies is still installed (the test above)."""
    kernel = FakeKernel(UNDERLAY, DEFAULT)
    learned = LearnedRoutes(kernel, change_delay=0.2)
    learned.apply()
    learned.start()
    try:
        assert learned._thread is not None and learned._thread.native_id is not None
        tid = learned._thread.native_id

        def series(first: int, wake: bool) -> int:
            before = _wake_ups(tid)
            for i in range(first, first + 30):
                learned.on_routes([(N2, f"10.244.{i}.0/26", N2, False, {})], wake=wake)
                learned.apply()
                time.sleep(0.002)  # the installer thread's chance to run, were it woken
            return _wake_ups(tid) - before

        quiet = series(0, wake=False)
        loud = series(30, wake=True)
        assert len(kernel.ours()) == 60  # every path in the kernel either way
        assert quiet <= 2 < 5 <= loud, (quiet, loud)
    finally:
        learned.stop()
