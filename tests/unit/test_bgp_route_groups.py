"""Learned paths a group at a time (``bgp.route_groups``, and the speaker handing an UPDATE's
prefixes on as groups): the same table of paths, and the same kernel routes, as the per-route
path gives, prefix by prefix; import filters, looped paths, the node's own prefixes and the
per-peer received/accepted counts as before. Pure: a fake kernel, no ExaBGP."""

from __future__ import annotations

import ipaddress
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bgp.filters import Filter, Rule
from bgp.learned import LearnedRoutes
from bgp.model import EXTERNAL, MESH, Export, Peer, PeerOptions, SpeakerConfig
from bgp.route_groups import RouteGroup, groups_of, record
from bgp.speaker import Speaker
from kernel.rtnl import KernelRoute

Change = tuple[str, str, str | None, bool, Mapping[str, Any]]
ATTRS: list[Mapping[str, Any]] = [{}, {"local-preference": 200}]

changes = st.lists(st.tuples(st.sampled_from(["p1", "p2"]), st.sampled_from([f"10.0.0.{i}/32" for i in range(6)]),
                             st.sampled_from(["198.18.0.1", "198.18.0.2", None]), st.booleans(),
                             st.sampled_from(ATTRS)), max_size=40)


def per_route(table: dict[str, dict[str, tuple[str, int]]], change: Change) -> None:
    """The reference: one change at a time, as ``LearnedRoutes.on_routes`` did before groups."""
    peer, prefix, next_hop, withdrawn, attrs = change
    paths = table.setdefault(prefix, {})
    if withdrawn or next_hop is None:
        paths.pop(peer, None)
    else:
        paths[peer] = (next_hop, int(attrs.get("local-preference", 100)))
    if not paths:
        del table[prefix]


@settings(max_examples=300, deadline=None)
@given(changes)
def test_recording_groups_gives_the_table_of_recording_each_change(items: list[Change]) -> None:
    expected: dict[str, dict[str, tuple[str, int]]] = {}
    for change in items:
        per_route(expected, change)
    table: dict[str, dict[str, tuple[str, int]]] = {}
    groups = groups_of(items)
    touched = record(table, groups, lambda nh, attrs: (nh, int(attrs.get("local-preference", 100))))
    assert table == expected
    assert set(touched) == {prefix for _, prefix, *_ in items}
    assert sum(len(g.prefixes) for g in groups) == len(items)


def test_consecutive_changes_of_one_update_make_one_group() -> None:
    attrs: dict[str, Any] = {}
    items: list[Change] = [("p1", f"10.0.0.{i}/32", "198.18.0.1", False, attrs) for i in range(800)]
    items += [("p1", "10.0.1.0/24", None, True, {}), ("p1", "10.0.2.0/24", "198.18.0.1", True, {})]
    assert groups_of(items) == [RouteGroup("p1", [p for _, p, *_ in items[:800]], "198.18.0.1", attrs),
                                RouteGroup("p1", ["10.0.1.0/24", "10.0.2.0/24"], None, {})]


# -- the speaker's UPDATEs, grouped or one by one -------------------------------------------------

ME, EXT, MESHPEER = "198.18.0.3", "198.18.0.11", "198.18.0.12"
UNDERLAY = KernelRoute(dst="198.18.0.0/24", device="eth0", scope="link", proto=2, ifindex=2)
REJECT = Filter("no-10-100-1", import_v4=(Rule(accept=False, operator="In",
                                               cidr=ipaddress.ip_network("10.100.1.0/24")),))


class FakeKernel:
    def __init__(self) -> None:
        self.table = {UNDERLAY.dst: UNDERLAY}

    def routes(self) -> list[KernelRoute]:
        return list(self.table.values())

    def add_route(self, route: KernelRoute) -> None:
        self.table[route.dst] = route

    replace_route = add_route

    def delete_route(self, route: KernelRoute) -> None:
        self.table.pop(route.dst, None)


def line(peer: str, asn: int, announce: Mapping[str, list[str]] | None = None, withdraw: list[str] | None = None,
         as_path: list[int] | None = None, local_pref: int | None = None, compact: bool = True) -> str:
    def nlris(prefixes: list[str]) -> str:
        return ", ".join(f'"{p}"' if compact else f'{{ "nlri": "{p}" }}' for p in prefixes)

    attrs = f'"origin": "igp", "as-path": {{ "0": {{ "element": "as-sequence", "value": {as_path or []} }} }}'
    if local_pref is not None:
        attrs += f', "local-preference": {local_pref}'
    parts = [f'"attribute": {{ {attrs} }}'] if announce else []
    if announce:
        hops = ", ".join(f'"{nh}": [ {nlris(ps)} ]' for nh, ps in announce.items())
        parts.append(f'"announce": {{ "ipv4 unicast": {{ {hops} }} }}')
    if withdraw:
        parts.append(f'"withdraw": {{ "ipv4 unicast": [ {nlris(withdraw)} ] }}')
    return ('{ "exabgp": "5.0.0", "time": 1.0, "host" : "n3", "pid" : 1, "ppid" : 1, "counter": 1, '
            f'"type": "update", "neighbor": {{ "address": {{ "local": "{ME}", "peer": "{peer}" }}, '
            f'"asn": {{ "local": 64512, "peer": {asn} }} , "direction": "receive", '
            f'"message": {{ "update": {{ {", ".join(parts)} }} }} }} }}')


def prefixes(third: int, count: int) -> list[str]:
    return [f"10.100.{third}.{i + 1}/32" for i in range(count)]


def updates() -> Iterator[str]:
    """A table from an external peer (filtered in part), a mesh peer's better paths for some of
    it, a looped UPDATE, withdrawals, and prefixes the node announces itself."""
    yield line(EXT, 65001, {EXT: prefixes(0, 200), "198.18.0.21": prefixes(1, 100)}, as_path=[65001])
    yield line(EXT, 65001, {EXT: prefixes(2, 50) + ["10.244.0.0/26"]}, as_path=[65001], compact=False)
    yield line(MESHPEER, 64512, {MESHPEER: prefixes(0, 20) + prefixes(2, 5)}, local_pref=300)
    yield line(EXT, 65001, {EXT: prefixes(3, 10)}, as_path=[65001, 64512])  # our AS: looped
    yield line(EXT, 65001, withdraw=prefixes(0, 10) + prefixes(4, 3))
    yield line(MESHPEER, 64512, withdraw=prefixes(2, 2))
    yield line(EXT, 65001, {EXT: prefixes(0, 5)}, as_path=[65001, 64512], withdraw=prefixes(2, 1))  # looped again


def run(grouped: bool) -> tuple[Speaker, FakeKernel]:
    kernel = FakeKernel()
    learned = LearnedRoutes(kernel)
    if grouped:
        speaker = Speaker(tempfile.mkdtemp(), on_route=learned.on_route, on_batch=learned.apply,
                          on_groups=lambda groups: learned.on_groups(groups, wake=False))
    else:
        speaker = Speaker(tempfile.mkdtemp(), on_route=learned.on_route, on_batch=learned.apply)
    config = SpeakerConfig(node="n3", router_id=ME, local_address=ME, asn=64512, peers=(
        Peer(EXT, 65001, EXTERNAL, name="tor", options=PeerOptions(filters=(REJECT,))),
        Peer(MESHPEER, 64512, MESH, name="n12")))
    speaker._config = config  # what configure() records, without starting ExaBGP
    speaker._set_peers(config.peers)
    speaker._exports = {"10.244.0.0/26": Export("10.244.0.0/26", ME)}
    learned.apply()
    for text in updates():
        speaker._on_line(text)
        speaker._on_batch()
    return speaker, kernel


def test_grouped_updates_install_what_route_by_route_installs_with_the_same_counts() -> None:
    grouped, kernel = run(grouped=True)
    one_by_one, reference = run(grouped=False)
    assert kernel.table == reference.table
    assert grouped.learned() == one_by_one.learned()
    ext, mesh = grouped._peers[EXT], grouped._peers[MESHPEER]
    # received: 200 + 100 + 50 + 1 announced, 13 withdrawn (10 of them announced), 1 withdrawn by
    # the last (looped) UPDATE; the looped UPDATEs' paths are not received
    assert set(ext.announced) == set(prefixes(0, 200)[10:] + prefixes(1, 100) + prefixes(2, 50)[1:]
                                     + ["10.244.0.0/26"])
    # accepted: less the import filter (10.100.1.0/24) and the node's own block
    assert set(ext.routes) == set(prefixes(0, 200)[10:] + prefixes(2, 50)[1:])
    assert set(mesh.routes) == set(mesh.announced) == set(prefixes(0, 20) + prefixes(2, 5)[2:])
    ours = {d: r for d, r in kernel.table.items() if r.proto == 81}
    # the mesh peer's local preference wins where both have a path
    assert {d for d, r in ours.items() if r.gateway == MESHPEER} == set(prefixes(0, 20) + prefixes(2, 5)[2:])
    assert set(ours) == set(ext.routes) | set(mesh.routes)
    assert grouped.metrics().looped == one_by_one.metrics().looped == 10 + 5


# -- the underlay test of every prefix of a table (bgp.learned_kernel) ----------------------------

SUBNETS = ["198.18.0.0/24", "10.0.0.0/8", "0.0.0.0/0", "192.168.1.128/25", "fd00:1::/64"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SUBNETS), max_size=3, unique=True),
       st.ip_addresses(v=4).map(str) | st.sampled_from(["198.18.0.7", "10.1.2.3", "192.168.1.200", "fd00:1::9"]),
       st.integers(0, 32))
def test_in_underlay_is_ipaddress_subnet_of(subnets: list[str], host: str, length: int) -> None:
    from bgp.learned_kernel import read_kernel

    kernel = read_kernel([KernelRoute(dst=s, device="eth0", proto=2, ifindex=2) for s in subnets])
    prefix = str(ipaddress.ip_network(f"{host}/{length if ':' not in host else length + 96}", strict=False))
    net = ipaddress.ip_network(prefix)
    expected = any(net.version == (n := ipaddress.ip_network(s)).version and net.subnet_of(n)  # type: ignore[arg-type]
                   for s in subnets if ipaddress.ip_network(s).prefixlen < ipaddress.ip_network(s).max_prefixlen)
    assert kernel.in_underlay(prefix) == expected
