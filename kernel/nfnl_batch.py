"""nftables transactions over nfnetlink for the commands a new endpoint needs: chains, rules of a
small grammar, verdict-map and address-set elements, flushes and chain deletions, in one atomic batch.

``nft`` (and libnftables) loads its cache of the whole ruleset before it runs even one ``add rule``:
at 5,000 endpoints (11,000 chains) that is 50-150 ms for a two-chain transaction. The kernel needs
no cache: these are the very messages ``nft`` would send (checked against ``nft --debug=netlink``
and by reading them back with ``nft list``).

Owns the encoding of those commands and of this rule grammar only (:func:`compile_rule`):

- ``ct state <s>[,<s>...] <verdict>``
- ``meta mark & <mask> == <value> <verdict>``
- ``meta mark set meta mark & <mask>``
- ``<verdict>``: ``accept``, ``drop``, ``return``, ``jump <chain>``, ``goto <chain>``

Anything else raises :class:`kernel.nfnl.Unsupported` and the caller lets ``nft`` write the whole
transaction. Must not know what the chains mean (no Tortie concept); creating tables, sets, maps
and base chains stays with ``nft``.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kernel import nfnl
from kernel.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, attr
from kernel.nfnl import Unsupported

NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 3, 5, 6, 8
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 4, 7
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFT_CT_STATE, NFT_META_MARK = 0, 3
CT_STATES = {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64}
VERDICTS = {"drop": 0, "accept": 1, "jump": -3, "goto": -4, "return": -5}
IFNAMSIZ = 16
NFTNL_UDATA_RULE_COMMENT = 0
_BE32 = struct.Struct(">I")
_BE32S = struct.Struct(">i")
_HOST32 = struct.Struct("=I")
_CHAIN_NAME = r"[A-Za-z0-9_.-]{1,256}"


def _be32(value: int) -> bytes:
    return _BE32.pack(value)


def _expr(name: str, body: bytes) -> bytes:
    return attr(NFTA_LIST_ELEM | NLA_F_NESTED,
                attr(NFTA_EXPR_NAME, name.encode() + b"\0") + attr(NFTA_EXPR_DATA | NLA_F_NESTED, body))


def _value(data: bytes) -> bytes:
    return attr(NFTA_DATA_VALUE, data)


def _verdict_data(word: str, chain: str | None) -> bytes:
    inner = attr(NFTA_VERDICT_CODE, _BE32S.pack(VERDICTS[word]))
    if chain is not None:
        inner += attr(NFTA_VERDICT_CHAIN, chain.encode() + b"\0")
    return attr(NFTA_DATA_VERDICT | NLA_F_NESTED, inner)


def _bitwise(mask: int) -> bytes:
    return _expr("bitwise", attr(1, _be32(NFT_REG_1)) + attr(2, _be32(NFT_REG_1)) + attr(3, _be32(4))
                 + attr(4 | NLA_F_NESTED, _value(_HOST32.pack(mask)))
                 + attr(5 | NLA_F_NESTED, _value(_HOST32.pack(0))))


def _cmp(op: int, value: int) -> bytes:
    return _expr("cmp", attr(1, _be32(NFT_REG_1)) + attr(2, _be32(op))
                 + attr(3 | NLA_F_NESTED, _value(_HOST32.pack(value))))


def _meta_load(key: int) -> bytes:
    return _expr("meta", attr(1, _be32(NFT_REG_1)) + attr(2, _be32(key)))


def _verdict(words: Sequence[str]) -> bytes:
    if len(words) == 1 and words[0] in ("accept", "drop", "return"):
        return _expr("immediate", attr(1, _be32(NFT_REG_VERDICT))
                     + attr(2 | NLA_F_NESTED, _verdict_data(words[0], None)))
    if len(words) == 2 and words[0] in ("jump", "goto") and re.fullmatch(_CHAIN_NAME, words[1]):
        return _expr("immediate", attr(1, _be32(NFT_REG_VERDICT))
                     + attr(2 | NLA_F_NESTED, _verdict_data(words[0], words[1])))
    raise Unsupported(f"verdict {' '.join(words)!r}")


def _number(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError as err:
        raise Unsupported(f"number {text!r}") from err
    if not 0 <= value <= 0xFFFFFFFF:
        raise Unsupported(f"number {text!r}")
    return value


@functools.lru_cache(maxsize=8192)
def compile_rule(body: str) -> bytes:
    """The NFTA_RULE_EXPRESSIONS payload for a rule ``body`` of the grammar in the module
    docstring (without its comment); Unsupported for anything else."""
    words = body.split()
    if words[:2] == ["ct", "state"] and len(words) >= 4:
        bits = 0
        for state in words[2].split(","):
            if state not in CT_STATES:
                raise Unsupported(f"ct state {state!r}")
            bits |= CT_STATES[state]
        expr = _expr("ct", attr(1, _be32(NFT_REG_1)) + attr(2, _be32(NFT_CT_STATE)))
        return expr + _bitwise(bits) + _cmp(NFT_CMP_NEQ, 0) + _verdict(words[3:])
    if words[:5] == ["meta", "mark", "set", "meta", "mark"] and len(words) == 7 and words[5] == "&":
        return _meta_load(NFT_META_MARK) + _bitwise(_number(words[6])) + \
            _expr("meta", attr(2, _be32(NFT_META_MARK)) + attr(3, _be32(NFT_REG_1)))
    if words[:3] == ["meta", "mark", "&"] and len(words) >= 7 and words[4] == "==":
        mask, value = _number(words[3]), _number(words[5])
        if value & ~mask:
            raise Unsupported(f"{body!r} can never match")  # nft refuses it; let it say so
        return _meta_load(NFT_META_MARK) + _bitwise(mask) + _cmp(NFT_CMP_EQ, value) + _verdict(words[6:])
    return _verdict(words)


@dataclass(frozen=True)
class AddChain:
    name: str  # a regular chain: base chains (hooks) stay with nft


@dataclass(frozen=True)
class FlushChain:
    name: str


@dataclass(frozen=True)
class DeleteChain:
    name: str


@dataclass(frozen=True)
class AddRule:
    chain: str
    body: str  # the grammar of compile_rule
    comment: str  # written as the rule's comment (nft's userdata)


@dataclass(frozen=True)
class MapElements:
    """Elements of an ``ifname : verdict`` map: keys as nft prints them (``"tor1"``), values
    ``goto <chain>`` / ``jump <chain>`` / ``accept`` / ``drop``."""

    verb: str  # "add" / "delete"
    map: str
    elements: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SetElements:
    change: nfnl.Change  # address-set elements, as kernel.nfnl encodes them


Op = AddChain | FlushChain | DeleteChain | AddRule | MapElements | SetElements


def _ifname(literal: str) -> bytes:
    name = literal[1:-1] if len(literal) >= 2 and literal[0] == literal[-1] == '"' else literal
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or "*" in name or '"' in name:
        raise Unsupported(f"interface name {literal!r}")
    return raw + b"\0" * (IFNAMSIZ - len(raw))


def _userdata(comment: str) -> bytes:
    raw = comment.encode() + b"\0"
    if len(raw) > 255:
        raise Unsupported("a comment longer than 254 bytes")
    return bytes([NFTNL_UDATA_RULE_COMMENT, len(raw)]) + raw


def _msg(kind: int, flags: int, family: int, payload: bytes) -> tuple[bytes, int]:
    seq = nfnl.next_seq()
    return nfnl.message_for((nfnl.NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq,
                            family, payload), seq


def _name(kind: int, name: str) -> bytes:
    return attr(kind, name.encode() + b"\0")


def encode(family: str, table: str, ops: Sequence[Op]) -> tuple[bytes, list[int]]:
    """One atomic batch doing ``ops`` in order, and the sequence numbers to wait for."""
    fam = nfnl.FAMILIES.get(family)
    if fam is None:
        raise Unsupported(f"family {family}")
    out: list[tuple[bytes, int]] = []
    for op in ops:
        if isinstance(op, AddChain):
            out.append(_msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, fam,
                            _name(NFTA_CHAIN_TABLE, table) + _name(NFTA_CHAIN_NAME, op.name)))
        elif isinstance(op, FlushChain):
            out.append(_msg(NFT_MSG_DELRULE, 0, fam, _name(NFTA_RULE_TABLE, table) + _name(NFTA_RULE_CHAIN, op.name)))
        elif isinstance(op, DeleteChain):
            out.append(_msg(NFT_MSG_DELCHAIN, 0, fam, _name(NFTA_CHAIN_TABLE, table) + _name(NFTA_CHAIN_NAME, op.name)))
        elif isinstance(op, AddRule):
            payload = (_name(NFTA_RULE_TABLE, table) + _name(NFTA_RULE_CHAIN, op.chain)
                       + attr(NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, compile_rule(op.body)))
            if op.comment:
                payload += attr(NFTA_RULE_USERDATA, _userdata(op.comment))
            out.append(_msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, fam, payload))
        elif isinstance(op, MapElements):
            out += _map_messages(fam, table, op)
        else:
            out += nfnl.element_messages(fam, table, op.change)
    return nfnl.batch(out)


def _map_messages(family: int, table: str, op: MapElements) -> list[tuple[bytes, int]]:
    adding = op.verb == "add"
    out = []
    for start in range(0, len(op.elements), nfnl.CHUNK):
        listed = b""
        for key, value in op.elements[start:start + nfnl.CHUNK]:
            inner = attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _value(_ifname(key)))
            if adding:
                words = value.split()
                if not (len(words) == 1 and words[0] in ("accept", "drop")) and not (
                        len(words) == 2 and words[0] in ("jump", "goto") and re.fullmatch(_CHAIN_NAME, words[1])):
                    raise Unsupported(f"map value {value!r}")
                inner += attr(NFTA_SET_ELEM_DATA | NLA_F_NESTED,
                              _verdict_data(words[0], words[1] if len(words) == 2 else None))
            listed += attr(NFTA_LIST_ELEM | NLA_F_NESTED, inner)
        payload = (_name(NFTA_SET_ELEM_LIST_TABLE, table) + _name(NFTA_SET_ELEM_LIST_SET, op.map)
                   + attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, listed))
        out.append(_msg(NFT_MSG_NEWSETELEM if adding else NFT_MSG_DELSETELEM, NLM_F_CREATE if adding else 0,
                        family, payload))
    return out


def write(family: str, table: str, ops: Sequence[Op], kept: nfnl.KeptSocket | None = None) -> None:
    """Do ``ops`` in one atomic batch: all or nothing. Unsupported (before anything is sent) for
    what this module does not encode; KernelError when the kernel refused the batch. ``kept``: the
    socket to send it on (``nfnl.KeptSocket``)."""
    data, acks = encode(family, table, ops)
    nfnl.send_batch(data, acks, "nfnetlink refused the transaction", kept)
