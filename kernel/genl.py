"""Generic netlink: the family look-up and the ``genlmsghdr`` every generic family's message starts with.

Owns resolving a family's name ("wireguard", ...) to the message type the kernel gave it
(``CTRL_CMD_GETFAMILY`` to ``nlctrl``) and framing a command (the 4-byte header after ``nlmsghdr``).
The header, attribute and error codec is ``kernel.netlink``'s; each family's attributes are its own
module's (``kernel.wireguard``). Must not know any Tortie concept. Standard library only.

A socket works in the network namespace it was opened in. Not thread-safe: one per thread.
"""

from __future__ import annotations

import errno
import struct

from kernel.netlink import KernelError, Socket, attr, attrs

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2

GENL_HEADER = struct.Struct("=BBxx")  # cmd, version, reserved


class FamilyMissing(KernelError):
    """The kernel has no such generic netlink family (its module is not there)."""


class GenericSocket:
    """One generic netlink socket talking to one family, resolved by name at construction."""

    def __init__(self, family: str, version: int, *, timeout: float | None = 10.0) -> None:
        self.family_name = family
        self.version = version
        self.sock = Socket(NETLINK_GENERIC, cap_ack=True, timeout=timeout)
        try:
            self.family = resolve(self.sock, family)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GenericSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def header(self, cmd: int) -> bytes:
        return GENL_HEADER.pack(cmd, self.version)

    def request(self, cmd: int, body: bytes, doing: str) -> None:
        self.sock.request(self.family, 0, self.header(cmd) + body, doing)

    def dump(self, cmd: int, body: bytes, doing: str) -> list[dict[int, bytes]]:
        """The attributes of each message the dump answers."""
        return [attrs(payload, GENL_HEADER.size) for payload in self.sock.dump(self.family, self.header(cmd) + body,
                                                                              doing)]


def resolve(sock: Socket, family: str) -> int:
    """The message type of the generic netlink ``family``; FamilyMissing when the kernel has none."""
    body = GENL_HEADER.pack(CTRL_CMD_GETFAMILY, 1) + attr(CTRL_ATTR_FAMILY_NAME, family.encode() + b"\0")
    try:
        replies = sock.get(GENL_ID_CTRL, body, f"looking up the generic netlink family {family!r}")
    except KernelError as e:
        if e.code == errno.ENOENT:
            raise FamilyMissing(f"looking up the generic netlink family {family!r} (is its module loaded?)",
                                e.code) from None
        raise
    for payload in replies:
        found = attrs(payload, GENL_HEADER.size)
        if CTRL_ATTR_FAMILY_ID in found:
            family_id: int = struct.unpack("=H", found[CTRL_ATTR_FAMILY_ID][:2])[0]
            return family_id
    raise FamilyMissing(f"looking up the generic netlink family {family!r}", errno.ENOENT)
