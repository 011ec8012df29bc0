"""The orphan sweep's decisions: which endpoints are due for release, given the links seen, since
when each interface has been missing and the calls in flight; and what `ipam check` makes of what
an agent publishes."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from felix_agent.cni_service import InFlight
from felix_agent.main import parse_args
from felix_agent.orphans import LocalAttachment, OrphanTracker, decide
from ipam.check import ENDPOINT_WITHOUT_INTERFACE, EndpointRecord, MissingInterface, Snapshot, analyse

GRACE = 10.0


def attachment(n: int, revision: str = "5") -> LocalAttachment:
    return LocalAttachment("default", f"node-1-tor{n:011d}", f"tor{n:011d}", "net", f"c{n}", "eth0", revision)


def by_key(*attachments: LocalAttachment) -> dict[str, LocalAttachment]:
    return {a.key: a for a in attachments}


def test_an_endpoint_whose_interface_exists_is_never_touched() -> None:
    a = attachment(1)
    for now in (0.0, GRACE, 1e9):
        d = decide(by_key(a), {a.interface}, {}, set(), set(), now, GRACE)
        assert (d.started, d.publish, d.due, d.cleared, d.next_at) == ([], [], [], [], None)


def test_a_missing_interface_is_published_then_due_after_the_grace() -> None:
    a = attachment(1)
    d = decide(by_key(a), set(), {}, set(), set(), 100.0, GRACE, publish_delay=1.0)
    assert d.started == [a] and d.due == [] and d.publish == []
    assert d.next_at == 101.0  # when it is to be published
    missing = {a.key: 100.0}
    d = decide(by_key(a), set(), missing, set(), set(), 101.0, GRACE, publish_delay=1.0)
    assert d.started == [] and d.publish == [a] and d.due == [] and d.next_at == 101.0 + GRACE - 1.0
    d = decide(by_key(a), set(), missing, {a.key}, set(), 109.9, GRACE, publish_delay=1.0)
    assert d.publish == [] and d.due == []
    d = decide(by_key(a), set(), missing, {a.key}, set(), 110.0, GRACE, publish_delay=1.0)
    assert d.due == [a]


def test_a_call_in_flight_stops_the_clock() -> None:
    a = attachment(1)
    d = decide(by_key(a), set(), {a.key: 0.0}, {a.key}, {a.interface}, 1000.0, GRACE)
    assert d.due == [] and d.started == [] and d.cleared == [a.key]


def test_an_interface_that_comes_back_or_an_endpoint_that_goes_clears_the_record() -> None:
    back, gone = attachment(1), attachment(2)
    d = decide(by_key(back), {back.interface}, {back.key: 0.0, gone.key: 0.0}, {gone.key}, set(), 5.0, GRACE)
    assert sorted(d.cleared) == sorted([back.key, gone.key]) and d.due == []


def test_a_zero_grace_releases_at_first_sight_without_publishing() -> None:
    a = attachment(1)
    d = decide(by_key(a), set(), {}, set(), set(), 7.0, 0.0, publish_delay=0.0)
    assert d.started == [a] and d.due == [a] and d.publish == []


names = st.integers(min_value=0, max_value=30)


@given(st.sets(names), st.sets(names), st.dictionaries(names, st.floats(0, 100)), st.sets(names), st.sets(names),
       st.floats(0, 200))
def test_only_missing_idle_interfaces_past_the_grace_are_due(endpoints: set[int], present: set[int],
                                                             since: dict[int, float], published: set[int],
                                                             busy: set[int], now: float) -> None:
    atts = by_key(*(attachment(n) for n in endpoints))
    links = {attachment(n).interface for n in present}
    in_flight = {attachment(n).interface for n in busy}
    missing = {attachment(n).key: t for n, t in since.items() if t <= now}
    d = decide(atts, links, missing, {attachment(n).key for n in published}, in_flight, now, GRACE)
    for a in d.due:
        assert a.interface not in links and a.interface not in in_flight
        assert now - missing.get(a.key, now) >= GRACE
    touched = {a.key for a in d.due + d.started + d.publish}
    assert all(atts[k].interface not in links | in_flight for k in touched)
    assert not touched & set(d.cleared)
    if d.next_at is not None:
        assert d.next_at > now


def test_the_resync_finds_what_a_missed_notification_did_not_say() -> None:
    tracker = OrphanTracker(GRACE, publish_delay=1.0)
    a, b = attachment(1), attachment(2)
    tracker.relist([a.interface, b.interface])
    assert tracker.decide(by_key(a, b), set(), 0.0).started == []
    tracker.link_event(a.interface, False)  # a's DELLINK was read; b's was lost
    d = tracker.decide(by_key(a, b), set(), 1.0)
    assert d.started == [a]
    tracker.missing_since[a.key] = 1.0
    tracker.relist([])  # the periodic full read
    d = tracker.decide(by_key(a, b), set(), 2.0)
    assert d.started == [b]
    tracker.missing_since[b.key] = 2.0
    assert [x.key for x in tracker.decide(by_key(a, b), set(), 1.0 + GRACE).due] == [a.key]
    tracker.link_event(b.interface, True)  # b's veth came back (a re-ADD): cancelled
    d = tracker.decide(by_key(a, b), set(), 2.0 + GRACE)
    assert b.key in d.cleared and [x.key for x in d.due] == [a.key]


def test_a_released_endpoint_still_in_the_syncer_is_not_released_twice() -> None:
    tracker = OrphanTracker(GRACE)
    a = attachment(1, revision="7")
    tracker.released[a.key] = "7"
    assert tracker.decide(by_key(a), set(), 0.0).started == []
    rewritten = attachment(1, revision="9")  # re-added under the same name, without its veth yet
    assert tracker.decide(by_key(rewritten), set(), 0.0).started == [rewritten]
    assert tracker.decide({}, set(), 0.0).started == [] and tracker.released == {}


def test_a_restart_takes_over_the_published_records() -> None:
    tracker = OrphanTracker(GRACE)
    a = attachment(1)
    tracker.restore([MissingInterface("node-1", a.namespace, a.name, a.interface, "net", "c1", "eth0", 50.0)])
    assert [x.key for x in tracker.decide(by_key(a), set(), 50.0 + GRACE).due] == [a.key]


def test_a_call_waits_while_the_sweep_holds_its_attachment() -> None:
    in_flight = InFlight()
    order: list[str] = []
    with in_flight.hold("tor1") as held:
        assert held
        call = threading.Thread(target=lambda: _serve(in_flight, "tor1", order))
        call.start()
        call.join(0.2)
        assert call.is_alive() and order == []  # kept out while the sweep releases its attachment
        order.append("released")
    call.join(5)
    assert order == ["released", "served"]
    with in_flight.serving("tor2"):
        assert in_flight.busy() == {"tor2"}
        with in_flight.hold("tor2") as held:
            assert not held
    assert in_flight.busy() == frozenset()


def _serve(in_flight: InFlight, interface: str, order: list[str]) -> None:
    with in_flight.serving(interface):
        order.append("served")


def test_ipam_check_reports_an_endpoint_without_its_interface() -> None:
    snap = Snapshot(revision=3)
    snap.endpoints[("net", "c1", "eth0")] = EndpointRecord("default/node-1-tor1", frozenset({"10.244.0.5"}))
    waiting = MissingInterface("node-1", "default", "node-1-tor1", "tor1", "net", "c1", "eth0", 1_700_000_000.0)
    stale = MissingInterface("node-1", "default", "node-1-tor2", "tor2", "net", "c2", "eth0", 1_700_000_000.0)
    snap.missing_interfaces = [waiting, stale]
    problems = [p for p in analyse(snap).problems if p.kind == ENDPOINT_WITHOUT_INTERFACE]
    assert len(problems) == 1
    text = problems[0].description
    assert "default/node-1-tor1" in text and "node-1" in text and "2023-11-14T22:13:20Z" in text
    assert MissingInterface.from_json(waiting.to_json()) == waiting


def test_orphan_grace_option(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.delenv("FELIX_ORPHANGRACE", raising=False)
    assert parse_args(["--nodename", "n"]).orphan_grace == 300.0
    assert parse_args(["--nodename", "n", "--orphan-grace", "3"]).orphan_grace == 3.0
    monkeypatch.setenv("FELIX_ORPHANGRACE", "42")
    assert parse_args(["--nodename", "n"]).orphan_grace == 42.0
    from pathlib import Path

    config = Path(str(tmp_path)) / "felix.yaml"
    config.write_text("orphan-grace: 7\n")
    assert parse_args(["--nodename", "n", "--config", str(config)]).orphan_grace == 7.0
    with pytest.raises(SystemExit):
        parse_args(["--nodename", "n", "--orphan-grace", "-1"])


def test_a_notification_said_to_change_nothing_leaves_the_decision_as_it_was() -> None:
    """The sweep skips a look after notifications ``link_event`` calls idle (a pod's ADD makes many):
    for each of those, the decision must be what it was before."""
    rng = random.Random(7)
    atts = [attachment(i) for i in range(6)]
    names = [a.interface for a in atts] + ["eth0", "tortieothers"]
    for _ in range(200):
        tracker = OrphanTracker(GRACE, publish_delay=1.0)
        tracker.relist(rng.sample(names, rng.randrange(len(names) + 1)))
        live = by_key(*rng.sample(atts, rng.randrange(len(atts) + 1)))
        now = 5.0
        for _ in range(10):
            before = tracker.decide(live, set(), now)
            for a in before.started:  # what the sweep records after a look
                tracker.missing_since[a.key] = now
            for key in before.cleared:
                tracker.forget(key)
            before = tracker.decide(live, set(), now)
            if not tracker.link_event(rng.choice(names), rng.random() < 0.6):
                assert tracker.decide(live, set(), now) == before
