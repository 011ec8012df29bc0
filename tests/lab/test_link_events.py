"""The orphan sweep's link notifications (``kernel.rtnl_bulk.LinkEvents``, read into its
``OrphanTracker``) in a namespace of the test's own: a bridge port leaving its bridge
(`ip link set dev X nomaster`, which the kernel announces with an RTM_DELLINK of family
AF_BRIDGE) is no deletion, while `ip link del` of the same link is one."""

from __future__ import annotations

import os
import select
import time
import uuid
from collections.abc import Iterator

import pytest

from felix_agent.orphans import OrphanTracker
from kernel.netns import netns
from kernel.rtnl import LinkEvent
from kernel.rtnl_bulk import LinkEvents
from netlab import netns as ip_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

PORT, PEER, BRIDGE = "torlabport", "torlabpeer", "brlab"
ROUNDS = 5
WAIT = 10.0


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"tle-{uuid.uuid4().hex[:8]}"
    ip_netns.add(name)
    try:
        yield name
    finally:
        ip_netns.delete(name)


def ip(ns: str, *args: str) -> None:
    ip_netns.ip("-n", ns, *args)


def read_until(events: LinkEvents, name: str, present: bool) -> list[LinkEvent]:
    """The notifications up to and including the first that says link ``name`` is ``present``
    (or deleted)."""
    seen: list[LinkEvent] = []
    deadline = time.monotonic() + WAIT
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no such notification within {WAIT:g} s; seen: {seen}"
        if select.select([events.fileno()], [], [], left)[0]:
            for event in events.receive():
                seen.append(event)
                if event.name == name and event.present == present:
                    return seen


def test_a_bridge_port_leaving_its_bridge_is_no_deletion_a_real_deletion_is(namespace: str) -> None:
    ip(namespace, "link", "add", BRIDGE, "type", "bridge")
    ip(namespace, "link", "add", PORT, "type", "veth", "peer", "name", PEER)
    with netns(f"/run/netns/{namespace}"):
        events = LinkEvents()  # subscribed in the namespace, before anything below happens
    with events:
        tracker = OrphanTracker(10.0)
        tracker.relist({BRIDGE, PORT, PEER})
        index = None
        for n in range(ROUNDS):
            ip(namespace, "link", "set", "dev", PORT, "master", BRIDGE)
            ip(namespace, "link", "set", "dev", PORT, "nomaster")
            # A link made after both: the kernel queues its notification after theirs, so once it
            # is read, every notification of the port's joining and leaving has been read too.
            marker = f"mark{n}"
            ip(namespace, "link", "add", marker, "type", "bridge")
            seen = read_until(events, marker, present=True)
            for event in seen:
                tracker.link_event(event.name, event.present)
            port = [e for e in seen if e.name == PORT]
            assert port, f"round {n}: no notification of {PORT} at all: {seen}"
            assert all(e.present for e in port), f"round {n}: a port leaving its bridge read as deleted: {port}"
            assert {PORT, PEER} <= tracker.links
            index = port[0].index
        ip(namespace, "link", "del", "dev", PORT)
        seen = read_until(events, PORT, present=False)
        for event in seen:
            tracker.link_event(event.name, event.present)
        assert seen[-1].index == index
        assert PORT not in tracker.links
