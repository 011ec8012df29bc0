"""Deleting a link and returning once the kernel has unlisted it, not once it has freed it.

Owns :func:`delete_unlisted`: an RTM_DELLINK sent on a worker thread while the calling thread
reads the same socket, bound to the namespace's link notifications, for that link's RTM_DELLINK
or the request's answer. Must not know what the link is
for nor which threads run the request (the caller hands in ``submit``); the plain, synchronous
deletion stays ``RTNL.delete_link``. Standard library only.

Why: the kernel deletes a link in two parts. Under the rtnl lock it unlists it (and, for a veth,
its peer, in the same pass: names freed, addresses, routes and sysctls gone) and multicasts
RTM_DELLINK to RTNLGRP_LINK; after one more expedited RCU grace period (still under the lock)
``rtnl_unlock`` runs ``netdev_run_todo`` (an ``rcu_barrier()``, waiting for the last references,
freeing) in the *requester's* ``sendmsg``, without the lock, before the netlink acknowledgement
is queued. On the development VM the notification comes ~0.6 ms after the request, the
acknowledgement 15-50 ms after it (``bench/unlisting.py``; bench/README.md, cni_bench, branch
i13-unlisted). Every later request that changes links takes the rtnl lock, so after the
notification a link of the very same name can be created again at once, in either namespace of
the pair (measured: every time, while the first deletion's system call was still in flight).
Nothing a user or a runtime can observe is left; the request's own answer only says that the
memory is freed.

The notification is matched by index, never by name: names are reused at once (the next ADD of
the attachment makes a link of the same name), indexes are not (the kernel allocates them
cyclically). It is read by ``kernel.rtnl.link_event``, as the agent's orphan sweep reads its link
notifications: a bridge port's RTM_DELLINK (family AF_BRIDGE) says it left its bridge, not that it
is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import select
import struct
import threading
import time

from kernel.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, KernelError, Socket, error_code, message, messages
from kernel.rtnl import NETLINK_ROUTE, RTM_DELLINK, RTMGRP_LINK, ifinfo, link_event

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Submit = Callable[[Callable[[], object]], None]

log = logging.getLogger(__name__)

WAIT = 30.0  # seconds: the bound on waiting for either the notification or the request's answer
# How often the waiter looks whether the request has returned without an answer it could read (its
# send failed, or the answer was lost with the notifications): only then does the wait need it.
_SLICE = 0.02
RTNLGRP_LINK = 1  # the group RTMGRP_LINK's bit stands for
_SIOCGIFNAME, _SIOCGIFINDEX = 0x8910, 0x8933
_IFNAMSIZ = 16  # with the terminating NUL
_IFREQ = struct.Struct("=16si20x")  # struct ifreq: the name, then ifr_ifindex in the 24-byte union
_RCVBUF = 1 << 16  # link notifications of a busy node for a few ms; overflow only costs the early return
_READ = 1 << 15  # one message per datagram, a few KiB; a 1 MiB read buffer is an mmap each time


class _Request:
    """The RTM_DELLINK, sent on a worker thread; the waiter reads its answer. The waiter may
    leave before the request returns, so the socket is closed by whichever of the two is last
    (under ``lock``), never while the other may still use it (a closed descriptor's number is
    reused at once, by anything)."""

    def __init__(self, sock: Socket, index: int, name: str) -> None:
        self.sock, self.index, self.name = sock, index, name
        self.seq = sock.next_seq()
        self.lock = threading.Lock()
        self.sent: bool | OSError = False  # True: the request returned; an OSError: its send failed
        self.left = False  # the waiter has returned

    def run(self) -> None:
        # Only a send: the kernel handles the request inside it (the deletion, the notification,
        # netdev_run_todo) and queues the answer before it returns; the waiter reads both.
        try:
            body = ifinfo(self.index)
            self.sock.send(message(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, self.seq, body))
            sent: bool | OSError = True
        except OSError as e:
            sent = e
        with self.lock:
            self.sent = sent
            if not self.left:
                return
            code = self._queued_answer() if sent is True else None
            self.sock.close()
        # The waiter returned at the notification, so the link was unlisted, and the kernel cannot
        # fail a deletion after that (the rest is freeing memory). Said out loud, not assumed.
        # ENODEV is no failure: another hand (the runtime's `ip netns del`, a racing GC) deleted
        # it between the lookup and this request, and its notification ended the wait.
        if code and code != errno.ENODEV:
            log.error("deleting %s (index %d) failed after it was unlisted: %s", self.name, self.index,
                      KernelError("the kernel answered", code))

    def _queued_answer(self) -> int | None:
        """The errno of the request's answer, read without waiting (None: not found)."""
        while True:
            try:
                data = self.sock.recv(_READ)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue  # said once; what was queued before the overflow is still there
                return None  # EAGAIN: nothing more
            for kind, _, seq, payload in messages(data):
                if kind == NLMSG_ERROR and seq == self.seq:
                    return error_code(payload)

    def leave(self) -> None:
        with self.lock:
            self.left = True
            if self.sent is not False:
                self.sock.close()
                return
            # The worker reads the answer later: the node's other link news need not queue meanwhile.
            with contextlib.suppress(OSError):
                self.sock.leave_group(RTNLGRP_LINK)


def delete_unlisted(name: str, submit: Submit, *, wait: float = WAIT) -> bool:
    """Delete the link ``name`` of the calling thread's namespace; return True once the kernel has
    unlisted it (its RTM_DELLINK notification), False when there was no such link. The request
    itself runs through ``submit`` (on another thread, which may still be in its system call
    when this returns). When the notification cannot be read (ENOBUFS, any socket trouble), the
    request's own answer decides, as it does when it comes first; when that is lost too, the
    kernel's list of links once the request has returned. KernelError when the kernel refused,
    or (ETIMEDOUT) when nothing came within ``wait`` seconds; the request goes on then, and logs
    its failure if it fails."""
    # One socket, opened here, in the caller's namespace (a netlink socket works in the namespace
    # it was opened in, whatever thread uses it, so the worker's own namespace does not matter),
    # bound to the link notifications before the request is sent: ours cannot be missed. The
    # kernel multicasts it to the requesting socket too (no NLM_F_ECHO: none is left out).
    sock = Socket(NETLINK_ROUTE, groups=RTMGRP_LINK, rcvbuf=_RCVBUF)
    try:
        index = _index(sock, name)
    except BaseException:
        sock.close()
        raise
    if index is None:
        sock.close()
        return False
    request = _Request(sock, index, name)  # owns the socket from here: see leave()
    try:
        submit(request.run)
    except BaseException:
        sock.close()
        raise
    try:
        return _wait(request, wait)
    finally:
        request.leave()


def _index(sock: Socket, name: str) -> int | None:
    """The index of link ``name`` in the socket's namespace, None when there is none. SIOCGIFINDEX:
    cheaper than an RTM_GETLINK, whose answer's ~50 attributes are parsed in Python
    (``socket.if_nametoindex`` would do as well but loses the errno: a failure would read as
    "no such link")."""
    if len(name.encode()) >= _IFNAMSIZ:
        return None  # no link has such a name (the ifreq would cut it to another's)
    try:
        index: int = _IFREQ.unpack(fcntl.ioctl(sock.fileno(), _SIOCGIFINDEX, _IFREQ.pack(name.encode(), 0)))[1]
    except OSError as e:
        if e.errno == errno.ENODEV:
            return None
        raise KernelError(f"looking up link {name}", e.errno or errno.EIO) from e
    return index


def _wait(request: _Request, wait: float) -> bool:
    sock, doing = request.sock, f"deleting link {request.name}"
    deadline = time.monotonic() + wait
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    lost = False  # messages were dropped (ENOBUFS): perhaps the notification, perhaps the answer
    while True:
        sent = request.sent
        if isinstance(sent, OSError):
            raise KernelError(doing, sent.errno or errno.EIO)
        if lost and sent:
            # The request has returned: its answer, if it was not lost too, else the kernel's list
            # of links says.
            code = request._queued_answer()
            if code is not None:
                return _decided(code, doing)
            try:
                _IFREQ.unpack(fcntl.ioctl(sock.fileno(), _SIOCGIFNAME, _IFREQ.pack(b"", request.index)))
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return True
                raise KernelError(doing, e.errno or errno.EIO) from e
            raise KernelError(doing, errno.EIO)  # still there: refused, the reason lost
        left = deadline - time.monotonic()
        if left <= 0:
            raise KernelError(f"{doing}: no answer in {wait:g} s", errno.ETIMEDOUT)
        if not poller.poll(min(left, _SLICE) * 1000):
            continue
        try:
            data = sock.recv(_READ)
        except BlockingIOError:
            continue
        except OSError as e:  # ENOBUFS: messages were lost; the next ones still come
            log.debug("link notifications lost while %s: %s", doing, e)
            lost = True
            continue
        for kind, _, seq, payload in messages(data):
            if kind == NLMSG_ERROR and seq == request.seq:
                return _decided(error_code(payload), doing)
            event = link_event(kind, payload)
            if event is not None and not event.present and event.index == request.index:
                return True


def _decided(code: int, doing: str) -> bool:
    """What the request's answer ``code`` (an errno, 0: done) says."""
    if code == errno.ENODEV:
        return False
    if code:
        raise KernelError(doing, code)
    return True
