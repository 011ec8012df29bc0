"""Link notifications as the kernel sends them, read by the two readers that share
``kernel.rtnl.link_event``: the orphan sweep's (``kernel.rtnl_bulk.parse_link_events``, then
``OrphanTracker``) and DEL's wait (``kernel.unlisting``). A bridge port leaving its bridge is an
RTM_DELLINK of family AF_BRIDGE: neither takes it for the link's deletion."""

from __future__ import annotations

import errno
import socket
import struct
from types import SimpleNamespace

import pytest

from felix_agent.orphans import OrphanTracker
from kernel import unlisting
from kernel.netlink import NLMSG_ERROR, attr, message, u32
from kernel.rtnl import AF_BRIDGE, AF_UNSPEC, RTM_DELLINK, RTM_NEWLINK
from kernel.rtnl_bulk import parse_link_events

AF_INET6 = 10
IFLA_IFNAME, IFLA_MTU, IFLA_TXQLEN, IFLA_OPERSTATE, IFLA_LINKMODE = 3, 4, 13, 16, 17

# What Linux 6.18 multicast to RTMGRP_LINK for `ip link set vA nomaster` (vA: index 4, in br0,
# index 2), byte for byte: nlmsghdr (type 17, seq 0, port 0), ifinfomsg (family 7, ARPHRD_ETHER,
# index 4, IFF_UP|IFF_BROADCAST|IFF_MULTICAST), IFLA_IFNAME "vA", IFLA_MASTER 2, IFLA_MTU 1500,
# IFLA_OPERSTATE, IFLA_ADDRESS, IFLA_LINK.
BRIDGE_PORT_LEFT = bytes.fromhex(
    "5400000011000000000000000000000007000100040000000210000000000000070003007641000008000a0002000000"
    "08000400dc05000005001000020000000a000100b27f5903864c00000800050003000000")


def link_message(kind: int, index: int, name: str, family: int = AF_UNSPEC) -> bytes:
    """A notification in the kernel's layout: ifinfomsg, then IFLA_IFNAME first and the
    attributes that follow it in ``rtnl_fill_ifinfo``."""
    body = struct.pack("=BxHiII", family, 1, index, 0x1003, 0)
    body += attr(IFLA_IFNAME, name.encode() + b"\0") + attr(IFLA_TXQLEN, u32(1000))
    body += attr(IFLA_OPERSTATE, b"\x06") + attr(IFLA_LINKMODE, b"\x00") + attr(IFLA_MTU, u32(1500))
    return message(kind, 0, 0, body)


def answer(seq: int, code: int) -> bytes:
    """The kernel's answer to request ``seq``: an NLMSG_ERROR with ``-code`` and the request's header."""
    return message(NLMSG_ERROR, 0, seq, struct.pack("=i", -code) + struct.pack("=IHHII", 32, RTM_DELLINK, 5, seq, 0))


def sweep_reads(*datagrams: bytes) -> list[tuple[str, int, bool]]:
    """What the orphan sweep's ``LinkEvents.receive`` makes of ``datagrams``."""
    return [(e.name, e.index, e.present) for data in datagrams for e in parse_link_events(data)]


def unlisting_reads(index: int, *datagrams: bytes) -> bool:
    """What DEL's wait for link ``index`` concludes from ``datagrams`` on its socket, followed by
    its request's answer ENODEV ("no such link": False, unless a notification decided first)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        ours.setblocking(False)
        seq = 41
        for data in (*datagrams, answer(seq, errno.ENODEV)):
            theirs.send(data)
        request = SimpleNamespace(sock=ours, index=index, name=f"link {index}", seq=seq, sent=False)
        return unlisting._wait(request, 5.0)  # type: ignore[arg-type]


def test_the_recorded_bridge_port_leave_differs_from_a_deletion_in_its_family_only() -> None:
    """The recording is what it says: as family AF_UNSPEC, the same bytes are vA's deletion."""
    assert BRIDGE_PORT_LEFT[16] == AF_BRIDGE
    as_deletion = BRIDGE_PORT_LEFT[:16] + bytes([AF_UNSPEC]) + BRIDGE_PORT_LEFT[17:]
    assert sweep_reads(as_deletion) == [("vA", 4, False)]
    assert unlisting_reads(4, as_deletion) is True


def test_a_deleted_link_is_a_deletion_to_both() -> None:
    data = link_message(RTM_DELLINK, 4, "vA")
    assert sweep_reads(data) == [("vA", 4, False)]
    assert unlisting_reads(4, data) is True


def test_a_bridge_port_leaving_its_bridge_is_nothing_to_either() -> None:
    assert sweep_reads(BRIDGE_PORT_LEFT) == []
    assert unlisting_reads(4, BRIDGE_PORT_LEFT) is False  # the request's answer decided
    tracker = OrphanTracker(10.0)
    tracker.relist({"vA"})
    for name, _, present in sweep_reads(BRIDGE_PORT_LEFT):
        tracker.link_event(name, present)
    assert tracker.links == {"vA"}


def test_a_new_link_is_present_to_the_sweep_and_no_deletion_to_the_wait() -> None:
    data = link_message(RTM_NEWLINK, 4, "vA")
    assert sweep_reads(data) == [("vA", 4, True)]
    assert unlisting_reads(4, data) is False


@pytest.mark.parametrize("family", [AF_BRIDGE, AF_INET6])
@pytest.mark.parametrize("kind", [RTM_NEWLINK, RTM_DELLINK])
def test_other_families_speak_of_a_port_or_a_setting_not_of_the_link(family: int, kind: int) -> None:
    data = link_message(kind, 4, "vA", family)
    assert sweep_reads(data) == []
    assert unlisting_reads(4, data) is False


def test_several_messages_in_one_buffer() -> None:
    """As `ip link del vA` of a bridge port sends them (in one buffer here, in the kernel's order):
    the port's bridge news, the bridge's change, then the pair's deletions."""
    data = (link_message(RTM_NEWLINK, 4, "vA", AF_BRIDGE) + BRIDGE_PORT_LEFT + link_message(RTM_NEWLINK, 2, "br0")
            + link_message(RTM_DELLINK, 4, "vA") + link_message(RTM_DELLINK, 3, "vB"))
    assert sweep_reads(data) == [("br0", 2, True), ("vA", 4, False), ("vB", 3, False)]
    assert unlisting_reads(4, data) is True
    assert unlisting_reads(3, data) is True
    assert unlisting_reads(7, data) is False  # another link's deletion ends nobody else's wait
    leave = BRIDGE_PORT_LEFT + link_message(RTM_NEWLINK, 4, "vA")  # `nomaster`: the port leaves, the link stays
    assert sweep_reads(leave) == [("vA", 4, True)]
    assert unlisting_reads(4, leave) is False
