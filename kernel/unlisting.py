"""Deleting a link and returning once the kernel has unlisted it, not once it has freed it.

Owns :func:`delete_unlisted`: an RTM_DELLINK sent on a worker thread while the calling thread
watches the namespace's link notifications for that link's index. Must not know what the link is
for nor which threads run the request (the caller hands in ``submit``); the plain, synchronous
deletion stays ``RTNL.delete_link``. Standard library only.

Why: the kernel deletes a link in two parts. Under the rtnl lock it unlists it (and, for a veth,
its peer, in the same pass: names freed, addresses, routes and sysctls gone) and multicasts
RTM_DELLINK to RTNLGRP_LINK; after one more expedited RCU grace period (still under the lock)
``rtnl_unlock`` runs ``netdev_run_todo`` (an ``rcu_barrier()``, waiting for the last references,
freeing) in the *requester's* ``sendmsg``, without the lock, before the netlink acknowledgement
is queued. On the development VM the notification comes ~0.6 ms after the request, the
acknowledgement 15-40 ms after it (``bench/unlisting.py``; bench/README.md, cni_bench, branch
i13-unlisted). Every later request that changes links takes the rtnl lock, so after the
notification a link of the very same name can be created again at once, in either namespace of
the pair (measured: every time, while the first deletion's system call was still in flight).
Nothing a user or a runtime can observe is left; the request's own answer only says that the
memory is freed.

The notification is matched by index, never by name: names are reused at once (the next ADD of
the attachment makes a link of the same name), indexes are not (the kernel allocates them
cyclically). A bridge port's RTM_DELLINK (family AF_BRIDGE) says it left its bridge, not that it
is gone: only family AF_UNSPEC counts.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import threading
import time

from kernel.netlink import KernelError, Socket, messages
from kernel.rtnl import NETLINK_ROUTE, RTM_DELLINK, RTMGRP_LINK, RTNL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Submit = Callable[[Callable[[], object]], None]

log = logging.getLogger(__name__)

WAIT = 30.0  # seconds: the bound on waiting for either the notification or the request's answer
_IFINFO_HEAD = struct.Struct("=BxHi")  # family, type, index (the start of an ifinfomsg)
_AF_UNSPEC = 0
_SIOCGIFINDEX = 0x8933
_IFNAMSIZ = 16  # with the terminating NUL
_IFREQ = struct.Struct("=16si20x")  # struct ifreq: the name, then ifr_ifindex in the 24-byte union
_MONITOR_RCVBUF = 1 << 16  # link notifications of a busy node for a few ms; overflow only costs the early return
_MONITOR_READ = 1 << 15  # one notification per datagram, a few KiB; a 1 MiB read buffer is an mmap each time


class _Request:
    """The RTM_DELLINK on its worker thread, and who closes what: the waiter may leave before the
    request returns, so the eventfd the worker signals is closed by whichever of the two is last
    (under ``lock``), never while the other may still use it (a closed descriptor's number is
    reused at once, by anything)."""

    def __init__(self, rtnl: RTNL, index: int, name: str) -> None:
        self.rtnl, self.index, self.name = rtnl, index, name
        self.lock = threading.Lock()
        self.event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.outcome: bool | KernelError | None = None  # None: not returned yet
        self.left = False  # the waiter has returned

    def run(self) -> None:
        try:
            outcome: bool | KernelError = self.rtnl.delete_link(self.index)
        except KernelError as e:
            outcome = e
        except OSError as e:  # the send itself failed: reported as the kernel's refusal would be
            outcome = KernelError(f"deleting link {self.index}", e.errno or errno.EIO)
        finally:
            self.rtnl.close()
        with self.lock:
            self.outcome = outcome
            if not self.left:
                os.eventfd_write(self.event, 1)
                return
            os.close(self.event)
        # The waiter returned at the notification, so the link was unlisted, and the kernel cannot
        # fail a deletion after that (the rest is freeing memory). Said out loud, not assumed:
        if isinstance(outcome, KernelError):
            log.error("deleting %s (index %d) failed after it was unlisted: %s", self.name, self.index, outcome)

    def leave(self) -> None:
        with self.lock:
            self.left = True
            if self.outcome is not None:
                os.close(self.event)


def delete_unlisted(name: str, submit: Submit, *, wait: float = WAIT) -> bool:
    """Delete the link ``name`` of the calling thread's namespace; return True once the kernel has
    unlisted it (its RTM_DELLINK notification), False when there was no such link. The request
    itself runs through ``submit`` (on another thread, which may still be in its system call
    when this returns). When the notification cannot be read (ENOBUFS, any socket trouble), the
    request's own answer decides, as it does when it comes first. KernelError when the kernel
    refused, or (ETIMEDOUT) when neither came within ``wait`` seconds; the request goes on then,
    and logs its failure if it fails."""
    # Both sockets are opened here, in the caller's namespace: a netlink socket works in the
    # namespace it was opened in, whatever thread uses it, so the worker's own namespace does not
    # matter. The monitor is bound before the request is sent: the notification cannot be missed.
    monitor = Socket(NETLINK_ROUTE, groups=RTMGRP_LINK, rcvbuf=_MONITOR_RCVBUF)
    try:
        if len(name.encode()) >= _IFNAMSIZ:
            return False  # no link has such a name (the ifreq below would cut it to another's)
        try:
            # SIOCGIFINDEX on the monitor, in its namespace: cheaper than an RTM_GETLINK, whose
            # answer's ~50 attributes are parsed in Python (socket.if_nametoindex would do as
            # well but loses the errno: a failure would read as "no such link").
            ifreq = fcntl.ioctl(monitor.fileno(), _SIOCGIFINDEX, _IFREQ.pack(name.encode(), 0))
            index = _IFREQ.unpack(ifreq)[1]
        except OSError as e:
            if e.errno == errno.ENODEV:
                return False
            raise KernelError(f"looking up link {name}", e.errno or errno.EIO) from e
        rtnl = RTNL()
        try:
            request = _Request(rtnl, index, name)  # owns rtnl from here: the worker closes it
        except BaseException:
            rtnl.close()
            raise
        try:
            submit(request.run)
        except BaseException:
            rtnl.close()
            os.close(request.event)
            raise
        try:
            return _wait(monitor, request, wait)
        finally:
            request.leave()
    finally:
        monitor.close()


def _wait(monitor: Socket, request: _Request, wait: float) -> bool:
    deadline = time.monotonic() + wait
    poller = select.poll()
    poller.register(request.event, select.POLLIN)
    poller.register(monitor.fileno(), select.POLLIN)
    watching = True
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KernelError(f"deleting link {request.name}: no answer in {wait:g} s", errno.ETIMEDOUT)
        ready = dict(poller.poll(left * 1000))
        if request.event in ready:
            outcome = request.outcome
            if isinstance(outcome, KernelError):
                raise outcome
            assert outcome is not None
            return outcome
        if not watching or monitor.fileno() not in ready:
            continue
        try:
            data = monitor.recv(_MONITOR_READ)
        except BlockingIOError:
            continue
        except OSError as e:  # ENOBUFS: notifications were lost, perhaps ours; the request's answer decides
            log.debug("link notifications lost while deleting %s: %s", request.name, e)
            poller.unregister(monitor.fileno())
            watching = False
            continue
        for kind, _, _, payload in messages(data):
            if kind == RTM_DELLINK and len(payload) >= _IFINFO_HEAD.size:
                family, _, index = _IFINFO_HEAD.unpack_from(payload)
                if index == request.index and family == _AF_UNSPEC:
                    return True
