"""Block maths (ipam.block): addresses and ordinals, assign and release, sequence numbers, the codec.

Pure: a Block is a value, so these need no etcd. The property test drives a block through any
sequence of assigns and releases and checks what IPAM promises: no ordinal is ever handed out
twice while it is held, and every ordinal is either free or allocated, never both, never neither.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipam.block import Block

V4 = ipaddress.ip_network("10.244.1.0/29")
V6 = ipaddress.ip_network("fd00:10:244::/125")


def test_an_empty_block_is_all_free_and_affine_to_its_node() -> None:
    block = Block.empty(V4, "node-1")
    assert block.size == 8 and block.free == tuple(range(8)) and not block.allocations
    assert block.node == "node-1" and block.affinity == "host:node-1"
    assert Block.empty(V4, None).node is None


@pytest.mark.parametrize("net", [V4, V6])
def test_address_and_ordinal_are_inverse(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    block = Block.empty(net, "n")
    for ordinal in range(block.size):
        assert block.ordinal(block.address(ordinal)) == ordinal
    with pytest.raises(ValueError, match="is not in block"):
        block.ordinal(net.broadcast_address + 1)


def test_assign_takes_from_the_head_and_stamps_the_sequence() -> None:
    block, got = Block.empty(V4, "n").assign(2, "h1", {"k": "v"})
    assert got == [V4[0], V4[1]] and block.sequence == 1
    assert block.allocation_of(V4[0]).handle == "h1"  # type: ignore[union-attr]
    assert block.handles() == {"h1": 2} and block.addresses_of("h1") == [V4[0], V4[1]]
    full, more = block.assign(100, "h2", {})
    assert len(more) == 6 and full.free == ()  # fewer when the block runs out


def test_the_address_freed_longest_ago_is_reused_first() -> None:
    block, _ = Block.empty(V4, "n").assign(8, "h", {})
    block, _ = block.release([3])
    block, _ = block.release([5])
    _, again = block.assign(2, "h2", {})
    assert again == [V4[3], V4[5]]


def test_a_specific_address_is_taken_once() -> None:
    block = Block.empty(V4, "n").assign_address(V4[4], "h", {})
    assert 4 not in block.free and block.allocation_of(V4[4]) is not None
    with pytest.raises(ValueError, match="already assigned"):
        block.assign_address(V4[4], "other", {})


def test_releasing_twice_is_not_an_error_and_changes_nothing() -> None:
    block, _ = Block.empty(V4, "n").assign(1, "h", {})
    once, freed = block.release([0])
    assert freed == {"h": 1}
    twice, freed_again = once.release([0])
    assert twice is once and freed_again == {}


def test_a_late_release_leaves_a_reallocated_address_alone() -> None:
    block, _ = Block.empty(V4, "n").assign(1, "old", {})
    read_seq = block.allocations[0].sequence
    block, _ = block.release([0])
    block = block.assign_address(V4[0], "new", {})
    after, freed = block.release([0], expected={0: read_seq})
    assert freed == {} and after.allocations[0].handle == "new"


def test_release_handle_frees_exactly_its_addresses() -> None:
    block, _ = Block.empty(V4, "n").assign(2, "a", {})
    block, _ = block.assign(1, "b", {})
    block, gone = block.release_handle("a")
    assert gone == [V4[0], V4[1]] and block.handles() == {"b": 1}


def test_the_codec_round_trips() -> None:
    block, _ = Block.empty(V6, "n").assign(3, "h", {"timestamp": "1"})
    block, _ = block.release([1])
    again = Block.from_json(block.to_json())
    assert again == block and again.to_json() == block.to_json()


def test_a_block_is_never_changed_in_place() -> None:
    block = Block.empty(V4, "n")
    block.assign(3, "h", {})
    block.with_affinity("other")
    assert block == Block.empty(V4, "n")


# An operation: ("assign", count), ("address", ordinal), ("release", ordinals) or ("handle", index).
operations = st.lists(st.one_of(
    st.tuples(st.just("assign"), st.integers(0, 10)),
    st.tuples(st.just("address"), st.integers(0, 15)),
    st.tuples(st.just("release"), st.lists(st.integers(0, 15), max_size=5)),
    st.tuples(st.just("handle"), st.integers(0, 30)),
), max_size=40)


@given(operations)
def test_no_ordinal_is_ever_handed_out_twice(ops: list[tuple[str, object]]) -> None:
    block = Block.empty(ipaddress.ip_network("10.244.2.0/28"), "n")
    held: dict[int, str] = {}  # ordinal → the handle the model says holds it
    for step, (op, arg) in enumerate(ops):
        handle = f"h{step}"
        if op == "assign":
            block, got = block.assign(arg, handle, {})  # type: ignore[arg-type]
            for address in got:
                ordinal = block.ordinal(address)
                assert ordinal not in held, f"{address} handed out while {held.get(ordinal)} holds it"
                held[ordinal] = handle
        elif op == "address":
            address = block.address(arg)  # type: ignore[arg-type]
            if arg in held:
                with pytest.raises(ValueError):
                    block.assign_address(address, handle, {})
            else:
                block = block.assign_address(address, handle, {})
                held[arg] = handle  # type: ignore[index]
        elif op == "release":
            block, _ = block.release(arg)  # type: ignore[arg-type]
            for ordinal in arg:  # type: ignore[attr-defined]
                held.pop(ordinal, None)
        else:
            names = sorted(set(held.values()))
            if names:
                name = names[arg % len(names)]  # type: ignore[operator]
                block, _ = block.release_handle(name)
                held = {o: h for o, h in held.items() if h != name}
        assert {o: a.handle for o, a in block.allocations.items()} == held
        assert sorted(block.free) == sorted(set(range(block.size)) - set(held))
        assert len(block.free) == len(set(block.free))
