"""How set elements are encoded for nfnetlink: the keys nft itself would send."""

from __future__ import annotations

import struct

import pytest

from kernel import nfnl
from kernel.netlink import NLM_F_ACK, NLM_F_CREATE, messages
from kernel.nfnl import Unsupported, _keys, encode


def test_interval_elements_are_a_start_and_a_flagged_end_one_past_the_last_address() -> None:
    assert _keys("10.0.0.1", 4, True) == [(bytes([10, 0, 0, 1]), False), (bytes([10, 0, 0, 2]), True)]
    assert _keys("10.2.0.0/24", 4, True) == [(bytes([10, 2, 0, 0]), False), (bytes([10, 2, 1, 0]), True)]
    assert _keys("fd00::1", 6, True)[1] == (bytes.fromhex("fd00" + "00" * 13 + "02"), True)
    assert _keys("10.0.0.1", 4, False) == [(bytes([10, 0, 0, 1]), False)]


@pytest.mark.parametrize(("literal", "version", "interval"), [
    ("0.0.0.0/0", 4, True),  # no end past the last address: left to nft
    ("10.0.0.0/24", 4, False),  # a range in a plain set
    ("fd00::1", 4, True),  # the other family
])
def test_what_is_not_encoded_is_left_to_nft(literal: str, version: int, interval: bool) -> None:
    with pytest.raises(Unsupported):
        _keys(literal, version, interval)


def test_a_batch_is_begin_messages_end_with_an_ack_asked_for_each_message() -> None:
    batch, acks = encode("inet", "tortie", [("delete", "s-a-v4", "ipv4_addr", True, ["10.0.0.1"]),
                                            ("add", "s-b-v4", "ipv4_addr", True, ["10.0.0.1"])])
    kinds = [kind for kind, _, _, _ in messages(batch)]
    assert kinds == [nfnl.NFNL_MSG_BATCH_BEGIN, (10 << 8) | nfnl.NFT_MSG_DELSETELEM,
                     (10 << 8) | nfnl.NFT_MSG_NEWSETELEM, nfnl.NFNL_MSG_BATCH_END]
    assert [seq for _, _, seq, _ in messages(batch)][1:3] == acks
    flags = [struct.unpack_from("=H", batch, offset + 6)[0] for offset in _offsets(batch)]
    assert flags[1] & NLM_F_ACK and flags[2] & NLM_F_CREATE
    with pytest.raises(Unsupported):
        encode("inet", "tortie", [("add", "np-x-v4", "ipv4_addr . inet_proto . inet_service", False, ["x"])])


def _offsets(batch: bytes) -> list[int]:
    offsets, offset = [], 0
    while offset < len(batch):
        offsets.append(offset)
        offset += (struct.unpack_from("=I", batch, offset)[0] + 3) & ~3
    return offsets


@pytest.mark.parametrize("body", [
    "meta l4proto tcp accept", "ip saddr @s-x-v4 accept", "ct state bogus accept", "jump",
    "meta mark & 0x1 == 0x2 drop", "log prefix \"x\"", "meta mark set meta mark | 0x02000000 return",
])
def test_rules_outside_the_direct_grammar_are_left_to_nft(body: str) -> None:
    from kernel.nfnl_batch import compile_rule
    with pytest.raises(Unsupported):
        compile_rule(body)


def test_interface_wildcards_and_long_names_are_left_to_nft() -> None:
    from kernel.nfnl_batch import MapElements
    from kernel.nfnl_batch import encode as encode_ops
    for key in ('"tor*"', '"' + "x" * 16 + '"'):
        with pytest.raises(Unsupported):
            encode_ops("inet", "tortie", [MapElements("add", "to-wl", ((key, "goto c"),))])
