"""IP reservations in the block maths: reserved ordinals are never taken, the rest is taken in FIFO
order, and the counts ``ipam show`` prints agree with a brute-force count (by property)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datastore.codec import decode
from datastore.errors import ValidationError
from datastore.kv import KeyValue
from ipam.block import Block
from ipam.reservations import Reservations

BLOCK = ipaddress.ip_network("10.0.0.0/27")
BLOCK6 = ipaddress.ip_network("fd00::/122")


def _networks(block: ipaddress.IPv4Network | ipaddress.IPv6Network) -> st.SearchStrategy[list]:  # type: ignore[type-arg]
    """Reservations around ``block``: inside it, covering it, straddling its edges, or elsewhere."""
    base = int(block.network_address)
    span = block.num_addresses

    def net(start: int, prefix: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network((base + start, prefix), strict=False)

    low = block.max_prefixlen - 7
    return st.lists(st.builds(net, st.integers(-2 * span, 3 * span), st.integers(low, block.max_prefixlen)),
                    max_size=5)


@st.composite
def blocks(draw: st.DrawFn, cidr: ipaddress.IPv4Network | ipaddress.IPv6Network = BLOCK) -> Block:
    """A block with some addresses taken and its free list in some order."""
    block = Block.empty(cidr, "n1")
    order = draw(st.permutations(range(cidr.num_addresses)))
    taken = draw(st.integers(0, cidr.num_addresses))
    block, _ = block.assign(taken, "old", {})
    free = tuple(o for o in order if o not in block.allocations)
    return Block(block.cidr, block.affinity, block.allocations, free, block.sequence)


@given(blocks(), _networks(BLOCK), st.integers(0, 40))
def test_assign_never_takes_a_reserved_address(block: Block, nets: list, count: int) -> None:  # type: ignore[type-arg]
    reservations = Reservations.of(nets)
    reserved = reservations.ordinals(block.cidr)
    after, got = block.assign(count, "new", {}, reserved)
    assert not any(reservations.covers(a) for a in got)
    wanted = [o for o in block.free if o not in reserved]
    assert [block.ordinal(a) for a in got] == wanted[:count]  # FIFO among the unreserved
    assert block.assignable(reserved) == len(wanted)
    # nothing lost: the reserved free ordinals stay free, in their order
    assert sorted(after.free + tuple(block.ordinal(a) for a in got)) == sorted(block.free)
    assert [o for o in after.free if o in reserved] == [o for o in block.free if o in reserved]


@given(_networks(BLOCK6))
def test_counts_agree_with_a_brute_force_count(nets: list) -> None:  # type: ignore[type-arg]
    reservations = Reservations.of(nets)
    brute = {o for o in range(BLOCK6.num_addresses) if any(BLOCK6.network_address + o in n for n in nets)}
    assert reservations.ordinals(BLOCK6) == brute
    assert reservations.count_in(BLOCK6) == len(brute)
    assert reservations.covers_all(BLOCK6) == (len(brute) == BLOCK6.num_addresses)


def test_families_do_not_mix_and_stored_documents_parse() -> None:
    doc = b'{"spec": {"reservedCIDRs": ["10.0.0.3", "10.0.0.8/29", "fd00::/126", "junk"]}}'
    reservations = Reservations.from_kvs([KeyValue("/k", doc, 1, 1, 1), KeyValue("/bad", b"[", 1, 1, 1)])
    assert reservations.ordinals(BLOCK) == {3, *range(8, 16)}
    assert reservations.ordinals(BLOCK6) == {0, 1, 2, 3}
    assert reservations.count_in(ipaddress.ip_network("10.0.0.0/24")) == 9


def _reservation(cidrs: object) -> object:
    return decode({"apiVersion": "projectcalico.org/v3", "kind": "IPReservation", "metadata": {"name": "r"},
                   "spec": {"reservedCIDRs": cidrs}}).spec


def test_calico_sample_decodes_and_bad_entries_get_one_line_errors() -> None:
    spec = _reservation(["192.168.2.3", "10.0.2.3/32", "cafe:f00d::/123"])
    assert spec.reserved_cidrs == ["192.168.2.3", "10.0.2.3/32", "cafe:f00d::/123"]  # type: ignore[attr-defined]
    for bad, message in ((["10.0.0.1/24"], "host bits set; did you mean 10.0.0.0/24"),
                         (["nope"], "reservedCIDRs[0] 'nope' is not a CIDR"),
                         ("10.0.0.1", "reservedCIDRs")):
        with pytest.raises(ValidationError) as e:
            _reservation(bad)
        assert message in str(e.value) and "\n" not in str(e.value)
