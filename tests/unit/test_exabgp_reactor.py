"""The poller ExaBGP runs with (``bgp.exabgp_reactor``): a descriptor closed while registered is
forgotten instead of waking every ``poll()`` with POLLNVAL (which made ExaBGP's reactor sleep on
every turn); everything else is reported as ``select.poll`` reports it."""

from __future__ import annotations

import os
import select

from bgp.exabgp_reactor import ClosedDescriptorsDropped

MASK = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLNVAL | select.POLLERR


def test_a_closed_descriptor_is_dropped_and_the_live_ones_still_reported() -> None:
    dead_r, dead_w = os.pipe()
    live_r, live_w = os.pipe()
    poller = ClosedDescriptorsDropped()
    try:
        poller.register(dead_r, MASK)
        poller.register(live_r, MASK)
        os.close(dead_r)  # what ExaBGP does to a peer's socket without unregistering it
        os.write(live_w, b"x")
        assert poller.poll(0) == [(live_r, select.POLLIN)]
        os.read(live_r, 1)
        assert poller.poll(0) == []  # nothing ready: neither the dead one nor the drained one
        poller.unregister(dead_r)  # ExaBGP's own clean-up of what was dropped is no error
        poller.register(dead_w, MASK)  # a descriptor registered later is watched as usual
    finally:
        for fd in (dead_w, live_r, live_w):
            os.close(fd)


def test_only_a_dead_descriptor_waits_for_the_timeout_instead_of_waking() -> None:
    r, w = os.pipe()
    poller = ClosedDescriptorsDropped()
    poller.register(r, MASK)
    os.close(r)
    os.close(w)
    assert poller.poll(10) == []  # the loop's idle wait, not an immediate POLLNVAL
