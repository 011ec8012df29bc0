"""``BulkRTNL.write_routes``, the bulk writer learned BGP routes go through, in a real namespace: it
does what ``add_route``/``replace_route``/``delete_route`` one at a time do, errors included, for
thousands of routes in one call.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from kernel.netlink import Socket
from kernel.rtnl import KernelRoute
from kernel.rtnl_bulk import BulkRTNL

pytestmark = pytest.mark.lab


@pytest.fixture
def netlink() -> Iterator[BulkRTNL]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds a network namespace")
    name = f"nlb{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        batch = "".join(f"{line}\n" for line in (
            "link add d0 type veth peer name d1", "link set d0 up", "link set d1 up",
            "addr add 10.1.0.1/24 dev d0", "addr add fd01::1/64 dev d0 nodad"))
        subprocess.run(["ip", "-n", name, "-batch", "-"], input=batch, check=True, text=True)
        with BulkRTNL.open(f"/run/netns/{name}") as driver:
            yield driver
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ours(driver: BulkRTNL) -> dict[str, KernelRoute]:
    return {r.dst: r for r in driver.routes() if r.proto == 81}


def test_thousands_of_routes_added_replaced_and_deleted_in_one_call(netlink: BulkRTNL) -> None:
    routes = [KernelRoute(dst=f"10.100.{i // 250}.{i % 250 + 1}/32", gateway="10.1.0.2", proto=81)
              for i in range(5000)]
    assert netlink.write_routes([("add", r) for r in routes]) == [None] * len(routes)
    have = ours(netlink)
    assert set(have) == {r.dst for r in routes}
    assert {(r.gateway, r.device) for r in have.values()} == {("10.1.0.2", "d0")}

    moved = [KernelRoute(dst=r.dst, gateway="10.1.0.3", device="d0", proto=81) for r in routes]
    assert netlink.write_routes([("replace", r) for r in moved]) == [None] * len(moved)
    assert {r.gateway for r in ours(netlink).values()} == {"10.1.0.3"}

    assert netlink.write_routes([("delete", have) for have in ours(netlink).values()]) == [None] * len(routes)
    assert ours(netlink) == {}


def test_each_write_gets_its_own_result(netlink: BulkRTNL) -> None:
    existing = KernelRoute(dst="10.200.0.0/24", gateway="10.1.0.2", proto=81)
    netlink.add_route(existing)
    onlink = KernelRoute(dst="10.201.0.0/26", gateway="192.0.2.7", device="d0", onlink=True, proto=81)
    v6 = KernelRoute(dst="fd00:244::/122", gateway="fd01::2", proto=81)
    errors = netlink.write_routes([
        ("add", existing),  # already there: EEXIST, as add_route would raise
        ("delete", KernelRoute(dst="10.202.0.0/24", gateway="10.1.0.2", proto=81)),  # gone: a success
        ("add", KernelRoute(dst="10.203.0.0/24", gateway="192.0.2.9", proto=81)),  # unreachable next hop
        ("replace", KernelRoute(dst="10.204.0.0/24", gateway="192.0.2.7", device="nosuch0", onlink=True,
                                proto=81)),
        ("replace", onlink),
        ("add", v6),
        ("add", KernelRoute(dst="10.205.0.0/26", type="blackhole", proto=81)),
    ])
    codes = [e.code if e is not None else None for e in errors]
    assert codes == [errno.EEXIST, None, errno.ENETUNREACH, errno.ENODEV, None, None, None], errors
    assert "10.204.0.0/24 via 192.0.2.7 dev nosuch0 onlink" in str(errors[3])
    have = ours(netlink)
    assert set(have) == {"10.200.0.0/24", "10.201.0.0/26", "fd00:244::/122", "10.205.0.0/26"}
    assert (have["10.201.0.0/26"].gateway, have["10.201.0.0/26"].device, have["10.201.0.0/26"].onlink) == \
        ("192.0.2.7", "d0", True)
    assert (have["fd00:244::/122"].gateway, have["fd00:244::/122"].device) == ("fd01::2", "d0")
    assert have["10.205.0.0/26"].type == "blackhole"
    # The same as the one-at-a-time writer produces: compare with a route it made.
    netlink.delete_route(have["10.201.0.0/26"])
    netlink.replace_route(onlink)
    assert ours(netlink)["10.201.0.0/26"] == have["10.201.0.0/26"]


def test_failures_land_on_their_own_writes_across_chunks(netlink: BulkRTNL) -> None:
    """Only the last write of each sendmsg asks the kernel for an ack: failures anywhere in a chunk
    (its first, its last, the very last write) still come back on the right write, and the others
    are done."""
    size = Socket.CHUNK
    routes = [KernelRoute(dst=f"10.110.{i // 250}.{i % 250 + 1}/32", gateway="10.1.0.2", proto=81)
              for i in range(2 * size + 77)]
    clashing = {0, size - 1, size, size + 100, len(routes) - 1}
    for i in clashing:
        netlink.add_route(routes[i])
    errors = netlink.write_routes([("add", r) for r in routes])
    assert {i for i, e in enumerate(errors) if e is not None} == clashing
    assert {e.code for e in errors if e is not None} == {errno.EEXIST}
    assert set(ours(netlink)) == {r.dst for r in routes}
