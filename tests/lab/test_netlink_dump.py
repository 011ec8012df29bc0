"""The netlink driver's hand-parsed link and route listings read the same values as pyroute2's."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from pyroute2.iproute.linux import IPRoute

from kernel.netns import netns
from kernel.rtnl import RTNL

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

SETUP = """link add vxlan.tortie type vxlan id 4096 dstport 4789 local 10.1.1.1 nolearning
link set vxlan.tortie up
link add tor1 type veth peer name tpe1
link set tor1 up
link set tpe1 up
link set lo up
address add 10.1.1.1/24 dev tpe1
route add 10.244.0.5/32 dev tor1 scope link proto 80
route add blackhole 10.244.0.0/26 proto 80
route add 10.244.1.0/26 via 10.244.1.0 dev vxlan.tortie onlink proto 80
route add 10.9.0.0/16 via 10.1.1.2 metric 7
route add blackhole fd00:1::/122 proto 80
route add fd00:2::5/128 dev tor1 proto 80 metric 5
"""


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"tnl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "-batch", "-"], input=SETUP, text=True, check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_raw_listings_equal_pyroute2s(ns: str) -> None:
    with RTNL.open(ns) as fast:
        with netns(ns):
            slow = RTNL(IPRoute(), None)  # no raw socket: the pyroute2 path
        try:
            assert sorted(fast.links(), key=repr) == sorted(slow.links(), key=repr)
            routes = sorted(fast.routes(), key=repr)
            assert routes == sorted(slow.routes(), key=repr)
            ours = {r.dst: r for r in routes if r.proto == 80}
            assert ours["10.244.1.0/26"].onlink and ours["10.244.1.0/26"].device == "vxlan.tortie"
            assert ours["fd00:2::5/128"].metric == 5 and ours["10.244.0.0/26"].type == "blackhole"
            # one protocol's routes, filtered by the kernel: the same as filtering the whole listing
            indexes = fast.link_indexes()
            assert indexes == {link.name: link.index for link in fast.links()}
            filtered = sorted(fast.routes(protocol=80, indexes=indexes), key=repr)
            assert filtered == sorted((r for r in routes if r.proto == 80), key=repr) and len(filtered) == 5
            assert sorted(slow.routes(protocol=80), key=repr) == filtered
            vxlan = next(link for link in fast.links() if link.name == "vxlan.tortie").vxlan
            assert vxlan is not None and (vxlan.vni, vxlan.port, vxlan.local) == (4096, 4789, "10.1.1.1")
        finally:
            slow.close()
