"""The route writes of a large table (``kernel.rtnl_bulk.RouteBodies``): each message body is the
one ``kernel.rtnl._route_body`` makes for that route, byte for byte, however many routes of one
shape come before it. Pure: nothing is sent to a kernel."""

from __future__ import annotations

import itertools

from kernel.rtnl import KernelRoute, _route_body
from kernel.rtnl_bulk import RouteBodies

SHAPES = [
    dict(gateway="198.18.0.21", proto=81),
    dict(gateway="198.18.0.21", device="eth0", proto=81),
    dict(gateway="198.18.0.22", device="tunl0", onlink=True, proto=81),
    dict(type="blackhole", proto=80),
    dict(gateway="198.18.0.21", proto=81, metric=100, table=1000),
    dict(device="eth0", scope="link", proto=2, table=254),
]
V4 = ["10.100.0.1/32", "10.100.0.2/32", "10.244.1.0/26", "10.244.1.64/26", "0.0.0.0/0", "10.0.0.0/8"]
V6 = ["fd00:10:244::/122", "fd00:10:244::40/122", "fd00::1/128", "::/0"]
SHAPES6 = [dict(gateway="fd00::1", proto=81), dict(gateway="fd00::2", device="eth0", proto=81),
           dict(type="blackhole", proto=80)]


def test_every_body_is_the_one_route_body_makes() -> None:
    bodies = RouteBodies()
    cases = [(dst, shape, oif) for (dst, shape), oif in
             itertools.product([*itertools.product(V4, SHAPES), *itertools.product(V6, SHAPES6)], (None, 7))]
    for _ in range(2):  # the second time round every shape is known
        for dst, shape, oif in cases:
            route = KernelRoute(dst=dst, **shape)  # type: ignore[arg-type]
            assert bodies.body(route, oif) == _route_body(route, oif), (dst, shape, oif)


def test_a_table_of_one_shape_differs_in_the_destination_only() -> None:
    bodies = RouteBodies()
    routes = [KernelRoute(dst=f"10.100.{i // 250}.{i % 250 + 1}/32", gateway="198.18.0.21", proto=81)
              for i in range(1000)]
    assert [bodies.body(r, 3) for r in routes] == [_route_body(r, 3) for r in routes]
