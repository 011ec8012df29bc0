"""``kernel.rtnl`` reads and writes what iproute2 (``ip -j``, ``bridge``) reads back, in a namespace of its own."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from kernel.rtnl_bulk import BulkRTNL

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


def ip_json(ns: str, *args: str) -> list[dict[str, object]]:
    name = ns.rsplit("/", 1)[1]
    out = subprocess.run(["ip", "-j", "-n", name, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")  # type: ignore[no-any-return]


def test_listings_read_what_iproute2_reads(ns: str) -> None:
    with BulkRTNL.open(ns) as rtnl:
        links = {link.name: link for link in rtnl.links()}
        for shown in ip_json(ns, "-d", "link", "show"):
            link = links[str(shown["ifname"])]
            assert link.index == shown["ifindex"] and link.mtu == shown["mtu"]
            assert link.up == ("UP" in shown["flags"])  # type: ignore[operator]
            assert link.kind == (shown.get("linkinfo") or {}).get("info_kind")  # type: ignore[union-attr]
        assert len(links) == len(ip_json(ns, "link", "show"))
        routes = sorted(rtnl.routes(), key=repr)
        shown_dsts = {str(r["dst"]) for family in ("-4", "-6")
                      for r in ip_json(ns, family, "route", "show", "table", "main")
                      if r.get("type", "unicast") in ("unicast", "blackhole")}
        canonical = {str(ipaddress.ip_network(d if "/" in d or d == "default" else
                                              f"{d}/{32 if ':' not in d else 128}"))
                     for d in shown_dsts if d != "default"}
        assert {r.dst for r in routes} == canonical
        ours = {r.dst: r for r in routes if r.proto == 80}
        assert ours["10.244.1.0/26"].onlink and ours["10.244.1.0/26"].device == "vxlan.tortie"
        assert ours["fd00:2::5/128"].metric == 5 and ours["10.244.0.0/26"].type == "blackhole"
        assert ours["10.244.0.5/32"].scope == "link" and ours["10.244.0.5/32"].device == "tor1"
        # one protocol's routes, filtered by the kernel: the same as filtering the whole listing
        indexes = rtnl.link_indexes()
        assert indexes == {link.name: link.index for link in links.values()}
        filtered = sorted(rtnl.routes(protocol=80, indexes=indexes), key=repr)
        assert filtered == sorted((r for r in routes if r.proto == 80), key=repr) and len(filtered) == 5
        vxlan = links["vxlan.tortie"].vxlan
        assert vxlan is not None
        assert (vxlan.vni, vxlan.port, vxlan.local, vxlan.learning) == (4096, 4789, "10.1.1.1", False)


def test_writes_are_what_iproute2_reads_back(ns: str) -> None:
    with BulkRTNL.open(ns) as rtnl:
        rtnl.add_vxlan("vx2", vni=7, port=4790, local="10.1.1.1", mac="66:74:6f:72:00:07", mtu=1400)
        (shown,) = ip_json(ns, "-d", "link", "show", "vx2")
        data = shown["linkinfo"]["info_data"]  # type: ignore[index]
        assert (data["id"], data["port"], data["local"], data["learning"]) == (7, 4790, "10.1.1.1", False)
        assert (shown["address"], shown["mtu"]) == ("66:74:6f:72:00:07", 1400)
        link = rtnl.link("vx2")
        assert link is not None and not link.up
        rtnl.set_link(link.index, mtu=1300, up=True)
        assert rtnl.link_by_index(link.index) == link.replace(mtu=1300, up=True)
        rtnl.add_address(link.index, "10.5.0.1/24")
        rtnl.add_address(link.index, "10.5.0.1/24")  # EEXIST is success
        assert {a for a in rtnl.addresses(link.index) if ":" not in a} == {"10.5.0.1/24"}  # and the link-local
        assert rtnl.address_link("10.5.0.1") == rtnl.link("vx2")
        rtnl.add_fdb(link.index, "66:74:6f:72:00:08", "10.1.1.8")
        assert rtnl.fdb(link.index) == {("66:74:6f:72:00:08", "10.1.1.8")}
        name = ns.rsplit("/", 1)[1]
        fdb = subprocess.run(["bridge", "-n", name, "fdb", "show", "dev", "vx2"], capture_output=True, text=True,
                             check=True).stdout
        assert "66:74:6f:72:00:08 dst 10.1.1.8 self permanent" in fdb
        rtnl.set_neighbour(link.index, "10.5.0.8", "66:74:6f:72:00:08")
        assert [(n.ip, n.mac, n.permanent) for n in rtnl.neighbours(link.index) if n.permanent] == [
            ("10.5.0.8", "66:74:6f:72:00:08", True)]
        rtnl.delete_neighbour(link.index, "10.5.0.8")
        rtnl.delete_neighbour(link.index, "10.5.0.8")  # gone: success
        rtnl.delete_fdb(link.index, "66:74:6f:72:00:08", "10.1.1.8")
        assert rtnl.fdb(link.index) == set() and not any(n.permanent for n in rtnl.neighbours(link.index))
        rtnl.delete_address(link.index, "10.5.0.1/24")
        assert {a for a in rtnl.addresses(link.index) if ":" not in a} == set()
        assert rtnl.delete_link(link.index) and not rtnl.delete_link("vx2")
        assert rtnl.link("vx2") is None
