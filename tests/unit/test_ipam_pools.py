"""Pool selection and pool rules (ipam.pools): which pools a request may use, in which order, and
which pool changes are refused. Pure: pools are values built here."""

from __future__ import annotations

import ipaddress

import pytest

from datastore.errors import ValidationError
from ipam.errors import NoSuitablePool
from ipam.pools import Pool, check_pool_change, pool_for_address, select_pools


def pool(name: str, cidr: str, block: int = 26, *, disabled: bool = False, selector: str = "all()") -> Pool:
    return Pool(name, ipaddress.ip_network(cidr), block, disabled, selector, False)


WIDE = pool("wide", "10.244.0.0/16")
NARROW = pool("narrow", "10.245.0.0/24")
OFF = pool("off", "10.246.0.0/24", disabled=True)
GPU = pool("gpu", "10.247.0.0/24", selector="gpu == 'true'")
V6 = pool("v6", "fd00:10:244::/48", 122)
POOLS = [WIDE, NARROW, OFF, GPU, V6]


def test_blocks_of_a_pool() -> None:
    assert WIDE.block_count == 1024
    assert WIDE.block_at(0) == ipaddress.ip_network("10.244.0.0/26")
    assert WIDE.block_at(5) == ipaddress.ip_network("10.244.1.64/26")
    assert WIDE.block_of(ipaddress.ip_address("10.244.1.70")) == WIDE.block_at(5)
    assert V6.block_at(1) == ipaddress.ip_network("fd00:10:244::40/122")


def test_without_a_request_every_enabled_selecting_pool_of_the_family_by_prefix_then_name() -> None:
    assert select_pools(POOLS, 4, [], "n1", {}) == [WIDE, NARROW]
    assert select_pools(POOLS, 4, [], "n1", {"gpu": "true"}) == [WIDE, GPU, NARROW]
    assert select_pools(POOLS, 6, [], "n1", {}) == [V6]


def test_requested_pools_by_name_or_cidr_in_the_order_given() -> None:
    assert select_pools(POOLS, 4, ["wide", "10.245.0.0/24"], "n1", {}) == [WIDE, NARROW]


@pytest.mark.parametrize(("requested", "labels", "message"), [
    (["nope"], {}, "no IPv4 pool named 'nope'"),
    (["v6"], {}, "no IPv4 pool named 'v6'"),
    (["off"], {}, "is disabled"),
    (["gpu"], {}, "does not select node n1"),
])
def test_a_request_that_cannot_be_honoured_is_refused(requested: list[str], labels: dict[str, str],
                                                       message: str) -> None:
    with pytest.raises(NoSuitablePool, match=message):
        select_pools(POOLS, 4, requested, "n1", labels)


def test_no_pool_at_all_is_refused() -> None:
    with pytest.raises(NoSuitablePool, match="no enabled IPv6 pool selects node n1"):
        select_pools([WIDE], 6, [], "n1", {})


def test_the_pool_of_an_address() -> None:
    assert pool_for_address(POOLS, ipaddress.ip_address("10.245.0.9")) is NARROW
    assert pool_for_address(POOLS, ipaddress.ip_address("192.0.2.1")) is None


def test_pool_changes() -> None:
    check_pool_change(pool("wide", "10.244.0.0/16"), WIDE, POOLS)  # unchanged: fine
    check_pool_change(pool("new", "10.250.0.0/24"), None, POOLS)
    check_pool_change(pool("v6b", "10.244.0.0/16"), None, [V6])  # another family never overlaps
    with pytest.raises(ValidationError, match="cidr cannot be changed"):
        check_pool_change(pool("wide", "10.249.0.0/16"), WIDE, POOLS)
    with pytest.raises(ValidationError, match="blockSize cannot be changed"):
        check_pool_change(pool("wide", "10.244.0.0/16", 28), WIDE, POOLS)
    with pytest.raises(ValidationError, match="overlaps IPPool wide"):
        check_pool_change(pool("inside", "10.244.3.0/24"), None, POOLS)
