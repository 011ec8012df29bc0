"""Entering a network namespace: the only way any Tortie code moves a thread into one.

Owns ``netns()`` (run a block with the calling thread in a namespace, always coming back) and
opening a namespace by path. Must not create or delete namespaces nor know what runs inside them.
Standard library only (``ctypes`` for ``setns``: Python 3.11 has no ``os.setns``).
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    """A namespace could not be entered; the message says which and why."""


class NetnsNotFound(NetnsError):
    """The network namespace does not exist (its container is gone)."""


def open_netns(path: str) -> int:
    """An O_CLOEXEC descriptor of the namespace at ``path``; NetnsNotFound when there is none."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFound(f"the network namespace {path} does not exist") from None


def setns(fd: int, what: str | int) -> None:
    """Move the calling thread into the namespace ``fd`` (``what`` names it in the error)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise NetnsError(f"cannot enter the network namespace {what}: {os.strerror(code)}")


@contextmanager
def netns(path: str | int) -> Iterator[None]:
    """Run the body with the calling thread in the network namespace ``path`` (a path or an open fd).

    The thread always returns to the namespace it came from, even when the body raises. Only the
    calling thread moves: the network namespace is a per-thread attribute.
    """
    target = open_netns(path) if isinstance(path, str) else path
    origin = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(target, path)
        try:
            yield
        finally:
            setns(origin, "this thread came from")
    finally:
        os.close(origin)
        if isinstance(path, str):
            os.close(target)
