"""The netlink transport: one socket type, the message header, attributes, errors and batches.

Owns what every netlink family shares: packing and walking ``nlmsghdr`` and ``nlattr``, turning
an ``NLMSG_ERROR`` into :class:`KernelError`, and the three ways of talking to the kernel (one
request and its acknowledgement, a dump, and many requests per ``sendmsg`` with their
acknowledgements read afterwards). Must not know any message family's payload (that is
``kernel.rtnl`` and ``kernel.nfnl``) nor any Tortie concept. Standard library only, and cheap to
import: the in-process CNI path loads it on every call.

A socket works in the network namespace it was opened in. Not thread-safe: one per thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct

# typing costs milliseconds at import and is only needed by the type checker (mypy reads this idiom).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_GET_STRICT_CHK = 270, 10, 12
NETLINK_DROP_MEMBERSHIP = 2
SO_RCVBUFFORCE = 33

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
ATTR = struct.Struct("=HH")  # nlattr: length, type
_ERROR = struct.Struct("=i")
_U32 = struct.Struct("=I")


class KernelError(Exception):
    """The kernel refused a request (or the socket failed); ``code`` is the errno, the message
    names the request."""

    def __init__(self, doing: str, code: int) -> None:
        super().__init__(f"{doing}: {os.strerror(code)}")
        self.code = code


def attr(kind: int, data: bytes) -> bytes:
    """One attribute, padded to four bytes."""
    length = ATTR.size + len(data)
    return ATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def u32(value: int) -> bytes:
    return _U32.pack(value)


def attrs(data: bytes, offset: int = 0, until: int | None = None) -> dict[int, bytes]:
    """The attributes in ``data`` from ``offset``, by type (the nested flag masked off); with
    ``until``, the walk ends at the first attribute of that type (what a caller looks for first)."""
    found: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, kind = ATTR.unpack_from(data, offset)
        if length < 4:
            break
        kind &= 0x3FFF
        found[kind] = data[offset + 4:offset + length]
        if kind == until:
            break
        offset += (length + 3) & ~3
    return found


def attr_list(data: bytes) -> list[bytes]:
    """The payloads of the attributes in ``data``, in order (a list of nested elements)."""
    found, offset = [], 0
    while offset + 4 <= len(data):
        length, _ = ATTR.unpack_from(data, offset)
        if length < 4:
            break
        found.append(data[offset + 4:offset + length])
        offset += (length + 3) & ~3
    return found


def message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    """One netlink message: the header and ``payload``."""
    return HEADER.pack(HEADER.size + len(payload), kind, flags, seq, 0) + payload


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, sequence number, payload) of each message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, flags, seq, _ = HEADER.unpack_from(data, offset)
        if length < 16:
            break
        yield kind, flags, seq, data[offset + 16:offset + length]
        offset += (length + 3) & ~3


def error_code(payload: bytes) -> int:
    """The errno an ``NLMSG_ERROR`` carries (0: an acknowledgement)."""
    code: int = _ERROR.unpack_from(payload)[0]
    return -code


class Socket:
    """One netlink socket of ``protocol`` in the namespace of the thread that opened it.

    ``strict``: dump requests' headers are filters the kernel applies (Linux 4.20+; silently off
    before, so callers filter what they read as well). ``cap_ack``: acknowledgements without a copy
    of the request, so that a batch's acks fit the receive buffer. ``groups``: multicast groups to
    listen to (then the socket is non-blocking)."""

    CHUNK = 512  # requests per sendmsg in a batch; the next chunk waits for the kernel's answer to it

    def __init__(self, protocol: int, *, strict: bool = False, cap_ack: bool = False, groups: int = 0,
                 rcvbuf: int = 1 << 20, sndbuf: int = 0, timeout: float | None = None) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            if cap_ack:
                self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            if strict:
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            try:  # root may exceed rmem_max; anyone else gets what rmem_max allows
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if sndbuf:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            self._sock.bind((0, groups))
            if groups:
                self._sock.setblocking(False)
            elif timeout is not None:
                self._sock.settimeout(timeout)
        except BaseException:
            self._sock.close()
            raise
        self._seq = int.from_bytes(os.urandom(2), "big")

    def fileno(self) -> int:
        return self._sock.fileno()

    def leave_group(self, group: int) -> None:
        """Stop listening to multicast ``group`` (a number, not a bit mask)."""
        self._sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, group)

    def close(self) -> None:
        self._sock.close()

    def next_seq(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq

    def recv(self, size: int = 1 << 20) -> bytes:
        return self._sock.recv(size)

    def send(self, data: bytes) -> None:
        """Raw bytes (one or many messages, e.g. an nfnetlink batch)."""
        self._sock.sendall(data)

    def _send(self, kind: int, flags: int, payload: bytes) -> int:
        seq = self.next_seq()
        self._sock.sendall(message(kind, flags | NLM_F_REQUEST, seq, payload))
        return seq

    def replies(self, seq: int, doing: str) -> Iterator[bytes]:
        """The payload of each reply to ``seq`` until its acknowledgement or the end of its dump;
        KernelError when the kernel refused it."""
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except OSError as e:
                raise KernelError(doing, e.errno or errno.EIO) from e
            for kind, flags, msg_seq, payload in messages(data):
                if msg_seq != seq:
                    continue  # a late answer to an earlier request
                if kind == NLMSG_ERROR:
                    code = error_code(payload)
                    if code:
                        raise KernelError(doing, code)
                    return
                if kind == NLMSG_DONE:
                    return
                yield payload
                if not flags & NLM_F_MULTI:
                    return

    def request(self, kind: int, flags: int, payload: bytes, doing: str) -> None:
        """A request that changes something: waits for its acknowledgement."""
        for _ in self.replies(self._send(kind, flags | NLM_F_ACK, payload), doing):
            pass

    def get(self, kind: int, payload: bytes, doing: str) -> list[bytes]:
        """A request answered by messages (not a dump): their payloads."""
        return list(self.replies(self._send(kind, 0, payload), doing))

    def dump(self, kind: int, payload: bytes, doing: str) -> Iterator[bytes]:
        """The payload of every message a dump request answers."""
        return self.replies(self._send(kind, NLM_F_DUMP, payload), doing)

    def batch(self, requests: Sequence[tuple[int, int, bytes] | None]) -> list[int]:
        """Many (type, flags, payload) requests, ``CHUNK`` per ``sendmsg``: the errno of each (0:
        done). None requests are skipped (their code is -1). Only the last request of a chunk asks
        for an acknowledgement: the kernel answers a failed request whatever its flags and handles
        a chunk in order, so that ack says every earlier one is done, each failure reported before
        it (10,000 routes: no 10,000 acks to queue and parse). A socket failure counts as the
        failure of every request of the chunk not known to have failed already."""
        codes = [-1] * len(requests)
        todo = [i for i, r in enumerate(requests) if r is not None]
        for start in range(0, len(todo), self.CHUNK):
            chunk = todo[start:start + self.CHUNK]
            seqs = [self.next_seq() for _ in chunk]
            by_seq = dict(zip(seqs, chunk, strict=True))
            pack, size = HEADER.pack, HEADER.size
            parts = []
            for seq, i in zip(seqs, chunk, strict=True):
                kind, flags, payload = requests[i]  # type: ignore[misc]
                parts.append(pack(size + len(payload), kind, flags | NLM_F_REQUEST, seq, 0))
                parts.append(payload)
            kind, flags, payload = requests[chunk[-1]]  # type: ignore[misc]
            parts[-2] = pack(size + len(payload), kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0)
            data = b"".join(parts)
            last, answered = seq, False
            try:
                self._sock.sendall(data)
                while not answered:
                    for kind, _, seq, payload in messages(self._sock.recv(1 << 16)):
                        if kind == NLMSG_ERROR and seq in by_seq:
                            codes[by_seq[seq]] = error_code(payload)
                            answered = answered or seq == last
            except OSError as e:  # the ack lost (ENOBUFS) or none coming: what is not known counts as failed
                for i in chunk:
                    if codes[i] == -1:
                        codes[i] = e.errno or errno.EIO
                continue
            for i in chunk:
                if codes[i] == -1:
                    codes[i] = 0
        return codes

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
