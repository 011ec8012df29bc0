"""The poller ExaBGP runs with (``bgp.exabgp_reactor``): a descriptor closed while registered is
forgotten instead of waking every ``poll()`` with POLLNVAL (which made ExaBGP's reactor sleep on
every turn); everything else is reported as ``select.poll`` reports it."""

from __future__ import annotations

import os
import select

import pytest

from bgp.exabgp_reactor import ClosedDescriptorsDropped, fast_update_json

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


# -- a received UPDATE's JSON ------------------------------------------------------------------------


def _inet(prefix: str, action: object, next_hop: str | None = None, path_id: int | None = None) -> object:
    import ipaddress

    from exabgp.bgp.message.update.nlri.cidr import CIDR
    from exabgp.bgp.message.update.nlri.inet import INET
    from exabgp.bgp.message.update.nlri.qualifier.path import PathInfo
    from exabgp.protocol.family import AFI, SAFI
    from exabgp.protocol.ip import IP

    net = ipaddress.ip_network(prefix)
    nlri = INET(AFI.ipv4 if net.version == 4 else AFI.ipv6, SAFI.unicast, action)
    nlri.cidr = CIDR(net.network_address.packed, net.prefixlen)
    if next_hop is not None:
        nlri.nexthop = IP.create(next_hop)
    if path_id is not None:
        nlri.path_info = PathInfo(integer=path_id)
    return nlri


def test_the_fast_update_json_is_exabgps_own_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from exabgp.bgp.message import Action
    from exabgp.bgp.message.update import EOR, Update
    from exabgp.bgp.message.update.attribute import Attributes
    from exabgp.bgp.message.update.attribute.localpref import LocalPreference
    from exabgp.bgp.message.update.attribute.origin import Origin
    from exabgp.protocol.family import AFI, SAFI
    from exabgp.reactor.api.response.json import JSON

    attributes = Attributes()
    attributes.add(Origin(Origin.IGP))
    attributes.add(LocalPreference(200))
    a, w = Action.ANNOUNCE, Action.WITHDRAW
    updates = [
        # two next hops, two families, an add-path NLRI among plain ones, and withdrawals
        Update([_inet("10.0.0.0/24", a, "192.0.2.1"), _inet("10.0.1.0/24", a, "192.0.2.2"),
                _inet("fd00::/64", a, "fd00::1"), _inet("10.9.0.0/16", w), _inet("10.0.2.0/24", a, "192.0.2.1", 7),
                _inet("fd00:1::/64", w), _inet("10.0.3.0/24", a, "192.0.2.1")], attributes),
        Update([_inet(f"10.100.{i // 250}.{i % 250 + 1}/32", a, "198.18.0.21") for i in range(600)], attributes),
        Update([_inet(f"10.100.{i // 250}.{i % 250 + 1}/32", w) for i in range(600)], Attributes()),
        EOR(AFI.ipv4, SAFI.unicast),
    ]
    encoder = JSON("5.0.0")
    theirs = [encoder._update(u) for u in updates]
    monkeypatch.setattr(JSON, "_update", JSON._update)  # put back after the test
    fast_update_json()
    assert [encoder._update(u) for u in updates] == theirs
    encoder.compact = True  # exabgp.api.compact: a plain NLRI is its prefix alone, as ExaBGP writes it
    compact = encoder._update(updates[0])["message"]
    assert '"192.0.2.1": [ "10.0.0.0/24", { "nlri": "10.0.2.0/24", "path-information": "0.0.0.7" }' in compact
