"""nftables over nfnetlink: set elements written in one atomic batch, and rules' tags read back.

``nft`` builds a cache of the table before it runs any command: for one ``add element`` it dumps
every chain and every set's elements, so at 5,000 endpoints (10,000 chains, tens of thousands of set
elements) a one-address label change costs ~100 ms of ``nft`` start-up, and listing the rules back
(``nft -j list table``, the periodic resync) takes tens of seconds. So:

- :func:`write_elements` adds and deletes elements of plain or interval address sets in one
  atomic batch (a label change), the same messages ``nft`` itself sends;
- :func:`rule_tags` dumps the table's rules and keeps only what a caller compares: each rule's
  chain and the first word of its comment;
- :func:`set_keys` dumps one set's keys;
- :func:`map_verdict` gets one element of a verdict map (where a key jumps or goes to).

A batch goes over a socket of its own, or over a :class:`KeptSocket` (the agent's: closing a
netfilter socket after a batch that deleted something waits for the kernel's grace period).

Owns these nfnetlink messages, the batch framing and its sockets; ``kernel.nfnl_batch`` adds chains,
rules and map elements of a small rule grammar (a new endpoint) on the same framing; everything else
goes through nft's own parser. Must not know what the sets and rules mean (no policy, no Tortie concept). Uses
``kernel.netlink``'s header, attributes and errors; runs in the caller's network namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
import threading
from collections.abc import Iterable, Sequence

from kernel.netlink import (
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    KernelError,
    Socket,
    attr,
    attr_list,
    attrs,
    error_code,
    message,
    messages,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_GETRULE, NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 7, 12, 13, 14
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_DATA_VALUE = 1, 1, 3, 1
NFTA_SET_ELEM_DATA, NFTA_DATA_VERDICT, NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 2, 2, 1, 2
VERDICT_WORDS = {0: "drop", 1: "accept", -1: "continue", -2: "break", -3: "jump", -4: "goto", -5: "return"}
NFT_SET_ELEM_INTERVAL_END = 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_USERDATA = 1, 2, 7
NFTNL_UDATA_RULE_COMMENT = 0
FAMILIES = {"inet": 1, "ip": 2, "ip6": 10}
ADDRESS_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6}
MAX_BATCH = 4 << 20  # bytes in one send (a batch must fit one message); bigger changes go through nft
CHUNK = 500  # elements per message
_NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big endian)
_seq = itertools.count(int.from_bytes(os.urandom(2), "big"))


class Unsupported(ValueError):
    """A change this module does not encode: let ``nft`` do it."""


def _message(kind: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    return message(kind, flags, seq, _NFGENMSG.pack(family, 0, socket.htons(res_id)) + payload)


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
    inner = attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, attr(NFTA_DATA_VALUE, key))
    if end:
        inner += attr(NFTA_SET_ELEM_FLAGS, struct.pack(">I", NFT_SET_ELEM_INTERVAL_END))
    return attr(NFTA_LIST_ELEM | NLA_F_NESTED, inner)


Change = tuple[str, str, str, bool, Sequence[str]]  # verb ("add"/"delete"), set, key type, interval, elements


def _family(family: str) -> int:
    fam = FAMILIES.get(family)
    if fam is None:
        raise Unsupported(f"family {family}")
    return fam


def element_messages(family: int, table: str, change: Change) -> list[tuple[bytes, int]]:
    """One change's messages for a batch, each with the sequence number to wait for its
    acknowledgement; Unsupported when this module does not encode it."""
    verb, name, key_type, interval, elements = change
    version = ADDRESS_TYPES.get(key_type)
    if version is None:
        raise Unsupported(f"set {name} of type {key_type}")
    names = attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
    kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if verb == "add" else NFT_MSG_DELSETELEM)
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if verb == "add" else 0)
    items = list(elements)
    out = []
    for start in range(0, len(items), CHUNK):
        listed = b"".join(_element(key, end) for literal in items[start:start + CHUNK]
                          for key, end in _keys(literal, version, interval))
        payload = names + attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0") + \
            attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, listed)
        seq = next(_seq)
        out.append((message_for(kind, flags, seq, family, payload), seq))
    return out


def message_for(kind: int, flags: int, seq: int, family: int, payload: bytes) -> bytes:
    """One nftables message of a batch (nfgenmsg header, then ``payload``)."""
    return _message(kind, flags, seq, family, payload)


def next_seq() -> int:
    return next(_seq)


def batch(messages_with_seq: Iterable[tuple[bytes, int]]) -> tuple[bytes, list[int]]:
    """Messages framed as one atomic batch (begin ... end), and the sequence numbers to wait for;
    Unsupported when it would not fit one send."""
    parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, next(_seq), 0, b"", NFNL_SUBSYS_NFTABLES)]
    acks = []
    for data, seq in messages_with_seq:
        parts.append(data)
        acks.append(seq)
    parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, next(_seq), 0, b"", NFNL_SUBSYS_NFTABLES))
    data = b"".join(parts)
    if len(data) > MAX_BATCH:
        raise Unsupported(f"a batch of {len(data)} bytes")
    return data, acks


def encode(family: str, table: str, changes: Iterable[Change]) -> tuple[bytes, list[int]]:
    """The batch for ``changes`` (deletions should come first, as in nft's scripts) and the sequence
    numbers whose acknowledgement to wait for. Raises Unsupported for what it cannot encode."""
    fam = _family(family)
    return batch(m for change in changes for m in element_messages(fam, table, change))


def _socket() -> Socket:
    return Socket(NETLINK_NETFILTER, rcvbuf=8 << 20, sndbuf=MAX_BATCH, timeout=10)


def write_elements(family: str, table: str, changes: Iterable[Change]) -> None:
    """Apply ``changes`` in one atomic batch; KernelError when the kernel refused it (nothing applied)
    or the socket failed."""
    send_batch(*encode(family, table, changes), "nfnetlink refused the set elements")


def send_batch(data: bytes, acks: Sequence[int], doing: str, kept: KeptSocket | None = None) -> None:
    """Send one batch and wait for every acknowledgement; KernelError (``doing``) when the kernel
    refused it (then nothing of it applied) or the socket failed. ``kept``: send it on that socket
    (when it serves the caller's namespace) instead of one opened and closed for this batch."""
    if not acks:
        return
    if kept is not None and kept.send_batch(data, acks, doing):
        return
    try:
        with _socket() as sock:
            _exchange(sock, data, acks, doing)
    except OSError as err:
        raise KernelError("nfnetlink", err.errno or errno.EIO) from err


def _exchange(sock: Socket, data: bytes, acks: Sequence[int], doing: str) -> None:
    waiting = set(acks)
    sock.send(data)
    while waiting:
        for kind, _, seq, payload in messages(sock.recv()):
            # Only this batch's answers: on a kept socket, those left by a refused batch may still be queued.
            if kind != NLMSG_ERROR or seq not in waiting:
                continue
            code = error_code(payload)
            if code:
                raise KernelError(doing, code)
            waiting.discard(seq)


class KeptSocket:
    """One nfnetlink socket kept open for batches, in the network namespace of its first use.

    Closing a netfilter socket waits until nf_tables has destroyed what earlier batches deleted (it
    flushes that deferred work, which waits for an RCU grace period: 8-16 ms on the 2-CPU test
    machines), so a socket per batch made every transaction that deleted an element, a rule or a chain
    block its caller that long; nft's library keeps its socket, and so does the agent with this. Used
    from any thread (one batch at a time); in another namespace than its own it declines (the caller
    opens a socket there), so a kept socket never writes into the wrong namespace."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: Socket | None = None
        self._netns: tuple[int, int] | None = None

    def send_batch(self, data: bytes, acks: Sequence[int], doing: str) -> bool:
        """False (nothing sent) when the caller is in another namespace than the socket's."""
        here = _netns_id()
        with self._lock:
            if self._netns is not None and self._netns != here:
                return False
            try:
                if self._sock is None:
                    self._sock, self._netns = _socket(), here
                _exchange(self._sock, data, acks, doing)
            except OSError as err:
                if self._sock is not None:  # a timeout or a broken socket: the next batch opens a fresh one
                    self._sock.close()
                self._sock = None
                raise KernelError("nfnetlink", err.errno or errno.EIO) from err
            return True


def _netns_id() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return (st.st_dev, st.st_ino)


def _dump(sock: Socket, kind: int, family: int, payload: bytes, doing: str) -> list[bytes]:
    seq = next(_seq)
    sock.send(_message((NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | NLM_F_DUMP, seq, family, payload))
    return list(sock.replies(seq, doing))


def rule_tags(family: str, table: str, chains: Iterable[str]) -> dict[str, list[str]]:
    """Per chain of ``table``, the first word of each rule's comment ("" for a rule without one), in
    the chain's order. One dump per chain: the kernel resumes a dump by skipping every rule already
    sent, so one dump of the whole table costs time quadratic in its rules (30 s at 300,000)."""
    fam = _family(family)
    found: dict[str, list[str]] = {}
    with _socket() as sock:
        for chain in chains:
            request = attr(NFTA_RULE_TABLE, table.encode() + b"\0") + attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
            found[chain] = [_tag(payload) for payload in _dump(sock, NFT_MSG_GETRULE, fam, request,
                                                               "nfnetlink rule dump")]
    return found


def set_keys(family: str, table: str, name: str) -> set[bytes]:
    """The keys of set ``name`` that start an element (a host's or a net's first address), as bytes:
    one cheap dump, for tests and benchmarks that wait for a member without running nft."""
    fam = _family(family)
    request = attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + attr(NFTA_SET_ELEM_LIST_SET,
                                                                           name.encode() + b"\0")
    keys: set[bytes] = set()
    with _socket() as sock:
        for payload in _dump(sock, NFT_MSG_GETSETELEM, fam, request, "nfnetlink set dump"):
            for element in attr_list(attrs(payload, _NFGENMSG.size).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
                a = attrs(element)
                flags = struct.unpack(">I", a[NFTA_SET_ELEM_FLAGS])[0] if NFTA_SET_ELEM_FLAGS in a else 0
                key = attrs(a.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
                if key is not None and not flags & NFT_SET_ELEM_INTERVAL_END:
                    keys.add(key)
    return keys


def map_verdict(family: str, table: str, name: str, key: bytes) -> str | None:
    """The verdict of the element ``key`` of verdict map ``name`` as nft prints it (``goto to-1a2b``),
    or None when the map has no such element: one element asked for, not a dump of the map (for
    tests and benchmarks that wait for one). ``key`` as the kernel holds it (an ifname padded to 16
    bytes)."""
    fam = _family(family)
    element = attr(NFTA_LIST_ELEM | NLA_F_NESTED, attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, attr(NFTA_DATA_VALUE, key)))
    request = attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + attr(
        NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0") + attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, element)
    with _socket() as sock:
        seq = next(_seq)
        sock.send(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST, seq, fam, request))
        try:
            replies = list(sock.replies(seq, "nfnetlink element get"))
        except KernelError as err:
            if err.code == errno.ENOENT:
                return None
            raise
    for payload in replies:
        for found in attr_list(attrs(payload, _NFGENMSG.size).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
            verdict = attrs(attrs(attrs(found).get(NFTA_SET_ELEM_DATA, b"")).get(NFTA_DATA_VERDICT, b""))
            if NFTA_VERDICT_CODE not in verdict:
                continue
            code = struct.unpack(">i", verdict[NFTA_VERDICT_CODE])[0]
            word = VERDICT_WORDS.get(code, str(code))
            chain = verdict.get(NFTA_VERDICT_CHAIN)
            return word if chain is None else f"{word} {chain.rstrip(bytes(1)).decode()}"
    return None


def _tag(payload: bytes) -> str:
    """The first word of the comment of one NEWRULE message's rule ("" without one)."""
    udata = attrs(payload, _NFGENMSG.size, until=NFTA_RULE_USERDATA).get(NFTA_RULE_USERDATA)
    return _comment(udata).split(" ", 1)[0] if udata is not None else ""


def _comment(udata: bytes) -> str:
    i = 0
    while i + 2 <= len(udata):
        kind, size = udata[i], udata[i + 1]
        if kind == NFTNL_UDATA_RULE_COMMENT:
            return udata[i + 2:i + 2 + size].rstrip(b"\0").decode(errors="replace")
        i += 2 + size
    return ""
