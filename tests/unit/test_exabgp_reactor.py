"""The poller ExaBGP runs with (``bgp.exabgp_reactor``): a descriptor closed while registered is
forgotten instead of waking every ``poll()`` with POLLNVAL (which made ExaBGP's reactor sleep on
every turn); everything else is reported as ``select.poll`` reports it."""

from __future__ import annotations

import os
import select

import pytest

from bgp.exabgp_reactor import ClosedDescriptorsDropped, fast_nlri_decoding, fast_update_json, quiet_debug

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


# -- a received UPDATE's NLRIs -----------------------------------------------------------------------


def _decode(data: bytes, afi: int, safi: int, addpath: bool) -> list[tuple[object, ...]] | tuple[int, int]:
    """NLRIs as ExaBGP's UPDATE decoder takes them apart (``NLRI.unpack_nlri`` until the data is
    used up), or the (code, subcode) of the NOTIFICATION it would send."""
    from exabgp.bgp.message import Action
    from exabgp.bgp.message.notification import Notify
    from exabgp.bgp.message.update.nlri.nlri import NLRI
    from exabgp.protocol.family import AFI, SAFI

    out: list[tuple[object, ...]] = []
    try:
        while data:
            nlri, data = NLRI.unpack_nlri(AFI.create(afi), SAFI.create(safi), data, Action.ANNOUNCE, addpath)
            out.append((type(nlri), nlri.afi, nlri.safi, nlri.action, nlri.cidr, nlri.path_info.json(),
                        nlri.nexthop, sorted(vars(nlri))))
    except Notify as e:
        return e.code, e.subcode
    return out


def test_fast_nlri_decoding_makes_the_same_nlris_and_refuses_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    from exabgp.bgp.message.update.nlri.nlri import NLRI
    from exabgp.logger import _log
    from exabgp.protocol.family import AFI, SAFI
    from exabgp.reactor.peer import Peer

    v4 = b"".join(bytes([32, 10, 100, i // 250, i % 250 + 1]) for i in range(500)) + bytes([26, 10, 244, 1, 64])
    v6 = bytes([64, 0xFD, 0, 0, 0x10, 0, 0x44, 0, 0]) + bytes([128, *range(16)])
    cases = [
        (v4, 1, 1, False), (v6, 2, 1, False), (v4, 1, 2, False),  # unicast, IPv6, multicast
        (b"\0\0\0\7" + bytes([24, 10, 0, 0]), 1, 1, True),  # add-path
        (bytes([33, 10, 0, 0, 0, 0]), 1, 1, False),  # a mask longer than IPv4
        (bytes([24, 10, 0]), 1, 1, False),  # truncated
        (bytes([8, 10]), 99, 1, False),  # a family nobody decodes
        (bytes([8, 10]) * 3, 1, 1, False),  # asked again, once the family is known
        (bytes([0, 24, 10, 0, 0, 32, 10, 0, 0, 1]), 1, 1, False),  # a default route among others
        (bytes([24]), 1, 1, False), (bytes([0]), 2, 1, False),  # a mask and nothing after it
        (bytes([129, *range(16)]), 2, 1, False), (bytes([33, 10, 0, 0, 0, 0]), 1, 2, False),  # too long
        (bytes([25, 10, 0, 0, 0x80, 27, 10, 0, 0]), 1, 1, False),  # a prefix cut short after a good one
    ]
    for cls, name in ((NLRI, "unpack_nlri"), (AFI, "create"), (SAFI, "create"), (Peer, "id"), (_log, "debug")):
        monkeypatch.setattr(cls, name, cls.__dict__[name])  # put back after the test
    quiet_debug()  # ExaBGP's logger is not set up here: its debug calls must not reach it
    theirs = [_decode(*case) for case in cases]
    fast_nlri_decoding()
    assert [_decode(*case) for case in cases] == theirs
    assert [_decode(*case) for case in cases] == theirs  # with every family's class cached
    assert AFI.create(1) is AFI.ipv4 and SAFI.create(1) is SAFI.unicast and AFI.create(77) == 77


def test_debug_calls_are_dropped_while_debug_is_off_and_logged_when_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from exabgp.logger import _log, log
    from exabgp.logger.option import option

    logged: list[str] = []
    monkeypatch.setattr(_log, "debug", _log.__dict__["debug"])  # put back after the test
    monkeypatch.setattr(option, "logit", {"DEBUG": False})
    monkeypatch.setattr(log, "logger", lambda logger, message, source, level: logged.append(message()))
    monkeypatch.setattr(option, "logger", type("Logger", (), {"debug": None})())
    quiet_debug()
    log.debug(lambda: "dropped", "parser")
    option.logit["DEBUG"] = True
    log.debug(lambda: "kept", "parser")
    assert logged == ["kept"]
