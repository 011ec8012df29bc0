"""The two things the nftables driver asks the kernel directly over nfnetlink, without ``nft``.

``nft`` builds a cache of the table before it runs any command: for one ``add element`` it dumps
every chain and every set's elements, so at 5,000 endpoints (10,000 chains, tens of thousands of set
elements) a one-address label change costs ~100 ms of ``nft`` start-up, and listing the rules back
(``nft -j list table``, the periodic resync) takes tens of seconds. So:

- :func:`write_elements` adds and deletes elements of plain or interval address sets in one
  atomic batch (a label change), the same messages ``nft`` itself sends;
- :func:`rule_tags` dumps the table's rules and keeps only what the driver compares: each rule's
  chain and the first word of its comment (the driver's hash tag).

Everything else (creating objects, rules, maps, named-port sets) goes through nft's own parser
(libnftables in the agent, see libnft; the ``nft -f`` command elsewhere).
Standard library only; runs in the caller's network namespace. Knows nothing about policy.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterable, Sequence

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_GETRULE, NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 7, 12, 13, 14
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_DATA_VALUE = 1, 1, 3, 1
NFT_SET_ELEM_INTERVAL_END = 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_USERDATA = 1, 2, 7
NFTNL_UDATA_RULE_COMMENT = 0
FAMILIES = {"inet": 1, "ip": 2, "ip6": 10}
ADDRESS_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6}
MAX_BATCH = 4 << 20  # bytes in one send (a batch must fit one message); bigger changes go through nft
CHUNK = 500  # elements per message
_seq = itertools.count(int.from_bytes(os.urandom(2), "big"))


class NetlinkError(OSError):
    """The kernel refused the batch (nothing of it was applied) or the socket failed."""


class Unsupported(ValueError):
    """A change this module does not encode: let ``nft`` do it."""


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _message(kind: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _keys(literal: str, version: int, interval: bool) -> list[tuple[bytes, bool]]:
    """An element literal as the set's keys: a host, or for an interval set its start and (flagged)
    end, one past the last address, as nft encodes it."""
    net = ipaddress.ip_network(literal, strict=False)
    if net.version != version:
        raise Unsupported(f"{literal} is not an IPv{version} element")
    if not interval:
        if net.num_addresses != 1:
            raise Unsupported(f"{literal}: a range in a set without intervals")
        return [(net.network_address.packed, False)]
    end = int(net.broadcast_address) + 1
    if end >> net.max_prefixlen:
        raise Unsupported(f"{literal} reaches the last address")  # nft leaves the end out: not encoded here
    return [(net.network_address.packed, False), (end.to_bytes(net.max_prefixlen // 8, "big"), True)]


def _element(key: bytes, end: bool) -> bytes:
    inner = _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, key))
    if end:
        inner += _attr(NFTA_SET_ELEM_FLAGS, struct.pack(">I", NFT_SET_ELEM_INTERVAL_END))
    return _attr(NFTA_LIST_ELEM | NLA_F_NESTED, inner)


Change = tuple[str, str, str, bool, Sequence[str]]  # verb ("add"/"delete"), set, key type, interval, elements


def encode(family: str, table: str, changes: Iterable[Change]) -> tuple[bytes, list[int]]:
    """The batch for ``changes`` (deletions should come first, as in nft's scripts) and the sequence
    numbers whose acknowledgement to wait for. Raises Unsupported for what it cannot encode."""
    fam = FAMILIES.get(family)
    if fam is None:
        raise Unsupported(f"family {family}")
    parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, next(_seq), 0, b"", NFNL_SUBSYS_NFTABLES)]
    acks = []
    names = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
    for verb, name, key_type, interval, elements in changes:
        version = ADDRESS_TYPES.get(key_type)
        if version is None:
            raise Unsupported(f"set {name} of type {key_type}")
        kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if verb == "add" else NFT_MSG_DELSETELEM)
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if verb == "add" else 0)
        items = list(elements)
        for start in range(0, len(items), CHUNK):
            listed = b"".join(_element(key, end) for literal in items[start:start + CHUNK]
                              for key, end in _keys(literal, version, interval))
            payload = names + _attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0") + \
                _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, listed)
            seq = next(_seq)
            acks.append(seq)
            parts.append(_message(kind, flags, seq, fam, payload))
    parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, next(_seq), 0, b"", NFNL_SUBSYS_NFTABLES))
    batch = b"".join(parts)
    if len(batch) > MAX_BATCH:
        raise Unsupported(f"a batch of {len(batch)} bytes")
    return batch, acks


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.settimeout(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_BATCH)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))
    return sock


def _messages(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in ``data``."""
    offset = 0
    while offset + 16 <= len(data):
        size, kind, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
        if size < 16:
            break
        yield kind, seq, data[offset + 16:offset + size]
        offset += (size + 3) & ~3


def write_elements(family: str, table: str, changes: Iterable[Change]) -> None:
    """Apply ``changes`` in one atomic batch; NetlinkError when the kernel refused it (nothing applied)."""
    batch, acks = encode(family, table, changes)
    if not acks:
        return
    waiting = set(acks)
    with _socket() as sock:
        try:
            sock.sendto(batch, (0, 0))
            while waiting:
                for kind, seq, payload in _messages(sock.recv(1 << 20)):
                    if kind != NLMSG_ERROR:
                        continue
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise NetlinkError(-code, f"nfnetlink refused the set elements: {os.strerror(-code)}")
                    waiting.discard(seq)
        except OSError as err:
            if isinstance(err, NetlinkError):
                raise
            raise NetlinkError(err.errno or errno.EIO, f"nfnetlink: {err}") from err


def rule_tags(family: str, table: str, chains: Iterable[str]) -> dict[str, list[str]]:
    """Per chain of ``table``, the first word of each rule's comment ("" for a rule without one), in
    the chain's order. One dump per chain: the kernel resumes a dump by skipping every rule already
    sent, so one dump of the whole table costs time quadratic in its rules (30 s at 300,000)."""
    fam = FAMILIES.get(family)
    if fam is None:
        raise Unsupported(f"family {family}")
    found: dict[str, list[str]] = {}
    with _socket() as sock:
        for chain in chains:
            request = _message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE, NLM_F_REQUEST | NLM_F_DUMP,
                               next(_seq), fam, _attr(NFTA_RULE_TABLE, table.encode() + b"\0")
                               + _attr(NFTA_RULE_CHAIN, chain.encode() + b"\0"))
            sock.sendto(request, (0, 0))
            found[chain] = _dump(sock)
    return found


def _dump(sock: socket.socket) -> list[str]:
    tags: list[str] = []
    while True:
        for kind, _, payload in _messages(sock.recv(1 << 20)):
            if kind == NLMSG_DONE:
                return tags
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code:
                    raise NetlinkError(-code, f"nfnetlink rule dump: {os.strerror(-code)}")
                continue
            tags.append(_tag(payload))


def set_keys(family: str, table: str, name: str) -> set[bytes]:
    """The keys of set ``name`` that start an element (a host's or a net's first address), as bytes:
    one cheap dump, for tests and benchmarks that wait for a member without running nft."""
    fam = FAMILIES.get(family)
    if fam is None:
        raise Unsupported(f"family {family}")
    request = _message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP, next(_seq),
                       fam, _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                       + _attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"))
    keys: set[bytes] = set()
    with _socket() as sock:
        sock.sendto(request, (0, 0))
        while True:
            for kind, _, payload in _messages(sock.recv(1 << 20)):
                if kind == NLMSG_DONE:
                    return keys
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise NetlinkError(-code, f"nfnetlink set dump: {os.strerror(-code)}")
                    continue
                elements = _nested(payload, 4).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")
                for element in _all(elements):
                    attrs = _nested(element, 0)
                    flags = struct.unpack(">I", attrs[NFTA_SET_ELEM_FLAGS])[0] if NFTA_SET_ELEM_FLAGS in attrs else 0
                    key = _nested(attrs.get(NFTA_SET_ELEM_KEY, b""), 0).get(NFTA_DATA_VALUE)
                    if key is not None and not flags & NFT_SET_ELEM_INTERVAL_END:
                        keys.add(key)


def _all(data: bytes) -> list[bytes]:
    """The payloads of the attributes in ``data``, in order."""
    found, offset = [], 0
    while offset + 4 <= len(data):
        size, _ = struct.unpack_from("=HH", data, offset)
        if size < 4:
            break
        found.append(data[offset + 4:offset + size])
        offset += (size + 3) & ~3
    return found


def _nested(data: bytes, offset: int) -> dict[int, bytes]:
    """The attributes in ``data`` from ``offset`` on, by type."""
    found: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4:offset + size]
        offset += (size + 3) & ~3
    return found


def _tag(payload: bytes) -> str:
    """The first word of the comment of one NEWRULE message's rule ("" without one)."""
    offset = 4  # after the nfgenmsg header
    while offset + 4 <= len(payload):
        size, kind = struct.unpack_from("=HH", payload, offset)
        if size < 4:
            break
        if kind & 0x3FFF == NFTA_RULE_USERDATA:
            return _comment(payload[offset + 4:offset + size]).split(" ", 1)[0]
        offset += (size + 3) & ~3
    return ""


def _comment(udata: bytes) -> str:
    i = 0
    while i + 2 <= len(udata):
        kind, size = udata[i], udata[i + 1]
        if kind == NFTNL_UDATA_RULE_COMMENT:
            return udata[i + 2:i + 2 + size].rstrip(b"\0").decode(errors="replace")
        i += 2 + size
    return ""
