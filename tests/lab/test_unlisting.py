"""``kernel.unlisting.delete_unlisted``, in namespaces of the test's own: it returns once the
link is unlisted (gone from every listing, in both namespaces of a veth pair, names free again
at once), says False for a link that is not there, raises the kernel's refusal, falls back to the
kernel's list of links once the request has returned when no message can be read, and never waits
past its bound."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

from cni_plugins.workers import Workers
from kernel import unlisting
from kernel.netlink import KernelError, Socket
from kernel.netns import netns
from kernel.rtnl import RTNL
from kernel.unlisting import delete_unlisted

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

ROUNDS = 30
WORKERS = Workers("test-unlisting")


@pytest.fixture
def pair_of_namespaces() -> Iterator[tuple[str, str]]:
    """Two fresh namespaces ("host", "container"), removed after the test."""
    names = [f"tul-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{names[0]}", f"/run/netns/{names[1]}"
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def add_pair(host: RTNL, name: str, peer: str, container: str) -> None:
    fd = os.open(container, os.O_RDONLY | os.O_CLOEXEC)
    try:
        host.add_veth(name, "ee:ee:ee:ee:ee:ee", 1500, peer, fd)
    finally:
        os.close(fd)


def names_in(path: str) -> set[str]:
    with netns(path), RTNL() as rtnl:
        return {link.name for link in rtnl.links()}


@contextlib.contextmanager
def another_hand_first(act: Callable[[], object], *,
                       hold: float = 10.0) -> Iterator[Callable[[Callable[[], object]], None]]:
    """A ``submit`` for ``delete_unlisted`` that lets another hand act between the index lookup and
    the request: on a thread of its own, ``act()``, then the request, once the ``with`` block has
    ended (or after ``hold`` seconds); the block's end waits for that thread."""
    released = threading.Event()
    ran: list[threading.Thread] = []

    def submit(task: Callable[[], object]) -> None:
        def then_the_request() -> None:
            act()
            released.wait(hold)
            task()

        ran.append(threading.Thread(target=then_the_request))
        ran[-1].start()

    try:
        yield submit
    finally:
        released.set()
        for thread in ran:
            thread.join(10)


def test_returns_unlisted_and_the_same_names_are_free_at_once(pair_of_namespaces: tuple[str, str]) -> None:
    host_ns, container_ns = pair_of_namespaces
    with netns(host_ns), RTNL() as host:
        for n in range(ROUNDS):
            add_pair(host, "torunlisted", "eth0", container_ns)
            host.add_address(host.link("torunlisted").index, "10.244.7.1/32")  # type: ignore[union-attr]
            assert delete_unlisted("torunlisted", WORKERS.submit) is True
            # Nothing of the pair is listed any more, on either side, nor its address...
            assert "torunlisted" not in {link.name for link in host.links()}
            assert all(ip != "10.244.7.1" for _, ip, _, _ in host.address_list())
            assert names_in(container_ns) == {"lo"}
            # ...and the very same pair can be made again right away (the kernel may still be
            # freeing the first one), then deleted the plain way.
            add_pair(host, "torunlisted", "eth0", container_ns)
            assert host.delete_link("torunlisted"), f"round {n}"
    assert names_in(host_ns) == names_in(container_ns) == {"lo"}


def test_a_missing_link_is_false_and_a_refusal_raises(pair_of_namespaces: tuple[str, str]) -> None:
    host_ns, _ = pair_of_namespaces
    with netns(host_ns):
        assert delete_unlisted("tornothere", WORKERS.submit) is False
        assert delete_unlisted("x" * 20, WORKERS.submit) is False  # longer than any link name can be
        with pytest.raises(KernelError) as refused:
            delete_unlisted("lo", WORKERS.submit)  # the loopback device cannot be deleted
        assert refused.value.code == errno.EOPNOTSUPP
        assert "lo" in names_in(host_ns)


class _Deaf(Socket):
    """A socket whose messages are all lost (as if its receive buffer overflowed): the first read
    says ENOBUFS, and every message, the notification and the request's answer among them, is
    taken off the queue and thrown away."""

    overflowed = False

    def recv(self, size: int = 1 << 20) -> bytes:
        super().recv(size)  # EAGAIN when nothing is queued, as a real socket says
        if not self.overflowed:
            self.overflowed = True
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        return b""


def test_lost_messages_fall_back_to_the_list_of_links_once_the_request_returned(pair_of_namespaces: tuple[str, str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    host_ns, container_ns = pair_of_namespaces
    monkeypatch.setattr(unlisting, "Socket", _Deaf)
    with netns(host_ns), RTNL() as host:
        add_pair(host, "tordeaf", "eth0", container_ns)
        assert delete_unlisted("tordeaf", WORKERS.submit) is True
        assert host.link("tordeaf") is None
    assert names_in(container_ns) == {"lo"}


def test_the_wait_is_bounded(pair_of_namespaces: tuple[str, str]) -> None:
    """A request that never runs (no thread took it): an error after the bound, not a hang; the
    link is untouched."""
    host_ns, container_ns = pair_of_namespaces
    held: list[Callable[[], object]] = []
    with netns(host_ns), RTNL() as host:
        add_pair(host, "torheld", "eth0", container_ns)
        with pytest.raises(KernelError) as late:
            delete_unlisted("torheld", held.append, wait=0.2)
        assert late.value.code == errno.ETIMEDOUT
        assert host.link("torheld") is not None
        # The request, run late, still deletes the link and cleans up after itself.
        done = threading.Thread(target=held[0])
        done.start()
        done.join(10)
        assert host.link("torheld") is None


def test_a_deletion_by_someone_else_first_is_not_reported_as_a_failure(pair_of_namespaces: tuple[str, str],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The pair goes away by another hand (the runtime's ``ip netns del``, a GC racing the DEL)
    between the index lookup and the request: its RTM_DELLINK ends the wait, and the request,
    sent after the waiter left, is answered ENODEV. The link is gone as asked: no error logged
    (the plain deletion says False then, never an error)."""
    host_ns, container_ns = pair_of_namespaces
    with netns(host_ns), RTNL() as host, RTNL() as other:
        add_pair(host, "torother", "eth0", container_ns)
        with (caplog.at_level("WARNING", logger="kernel.unlisting"),
              # its notification comes before our request is sent
              another_hand_first(lambda: other.delete_link("torother")) as submit):
            assert delete_unlisted("torother", submit) is True
        assert host.link("torother") is None
    assert names_in(container_ns) == {"lo"}
    assert [r.getMessage() for r in caplog.records if r.name == "kernel.unlisting"] == []


def test_leaving_a_bridge_is_not_taken_for_the_deletion(pair_of_namespaces: tuple[str, str]) -> None:
    """A bridge port's RTM_DELLINK (family AF_BRIDGE: it left its bridge) for the very index,
    between the lookup and the request: the wait goes on until the link is really unlisted."""
    host_ns, container_ns = pair_of_namespaces
    name = os.path.basename(host_ns)
    with netns(host_ns), RTNL() as host:
        add_pair(host, "torport", "eth0", container_ns)
        subprocess.run(["ip", "-n", name, "link", "add", "torbr", "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "torport", "master", "torbr"], check=True)
        leave_the_bridge = ["ip", "-n", name, "link", "set", "torport", "nomaster"]
        # the request is held 1 s at most: released at once if that notification ended the wait
        with another_hand_first(lambda: subprocess.run(leave_the_bridge, check=True), hold=1.0) as submit:
            assert delete_unlisted("torport", submit) is True
            listed = host.link("torport") is not None
        assert not listed, "delete_unlisted returned while the link was still listed"
        assert host.link("torport") is None
    assert names_in(container_ns) == {"lo"}


def test_a_flood_of_link_news_overflowing_the_socket(pair_of_namespaces: tuple[str, str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The node's links churn (another hand adds and deletes veths in bulk) while pairs are
    deleted by a busy process (another thread holds the GIL most of the time): the sockets may
    overflow for real (ENOBUFS, notifications and answers dropped); each call still returns only
    once its pair is unlisted, True every time."""
    host_ns, container_ns = pair_of_namespaces
    name = os.path.basename(host_ns)
    batch = "".join(f"link add torflood{k} type veth peer name torfloodp{k}\n" for k in range(100))
    batch += "".join(f"link del torflood{k}\n" for k in range(100))
    stop = threading.Event()

    def flood(k: int) -> None:
        mine = batch.replace("torflood", f"torf{k}")
        while not stop.is_set():
            subprocess.run(["ip", "-n", name, "-batch", "-"], input=mine, text=True, check=True,
                           capture_output=True)

    def hog() -> None:  # a busy agent: the waiting thread gets the GIL only every few ms
        while not stop.is_set():
            sum(range(10_000))

    flooders = [threading.Thread(target=flood, args=(k,)) for k in range(2)] + [threading.Thread(target=hog)]
    problems = []
    with caplog.at_level("DEBUG", logger="kernel.unlisting"), netns(host_ns), RTNL() as host:
        for f in flooders:
            f.start()
        try:
            for n in range(ROUNDS * 3):
                add_pair(host, "torflooded", "eth0", container_ns)
                if delete_unlisted("torflooded", WORKERS.submit) is not True:
                    problems.append(f"round {n}: not True")
                if host.link("torflooded") is not None:
                    problems.append(f"round {n}: still listed")
        finally:
            stop.set()
            for f in flooders:
                f.join(60)
    assert not problems, problems
    assert names_in(container_ns) == {"lo"}
    lost = sum("notifications lost" in r.getMessage() for r in caplog.records)
    print(f"{lost} of {ROUNDS * 3} deletions saw their socket overflow")


def test_a_name_reused_by_another_hand_before_the_request_is_left_alone(pair_of_namespaces: tuple[str, str],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Between the lookup and the request, another hand deletes the link and makes a new one of
    the same name: the request (by index) does not touch the newcomer, and no failure is logged."""
    host_ns, container_ns = pair_of_namespaces
    with netns(host_ns), RTNL() as host, RTNL() as other:
        add_pair(host, "torreused", "eth0", container_ns)

        def replace_it() -> None:
            other.delete_link("torreused")
            add_pair(other, "torreused", "eth1", container_ns)

        with caplog.at_level("WARNING", logger="kernel.unlisting"), another_hand_first(replace_it) as submit:
            assert delete_unlisted("torreused", submit) is True
        assert host.link("torreused") is not None
    assert names_in(container_ns) == {"lo", "eth1"}
    assert [r.getMessage() for r in caplog.records if r.name == "kernel.unlisting"] == []
