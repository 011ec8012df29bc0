"""ExaBGP's fixed costs per command and per UPDATE sent, cut in our wrapper (``bgp.exabgp_turns``):
each patch is held to what ExaBGP's own code does with the same input."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from bgp.exabgp_turns import shared_update_bytes, synchronous_callbacks


@pytest.fixture(autouse=True)
def _no_debug_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """ExaBGP's logger is not set up here: its debug calls (one per scheduled callback) go nowhere."""
    from exabgp.logger import log

    monkeypatch.setattr(log, "debug", classmethod(lambda cls, message, source="", level="": None))


def _script(log: list[str], name: str, steps: int, fail_at: int | None = None,
            clear: Any = None) -> Iterator[bool]:
    for i in range(steps):
        log.append(f"{name}{i}")
        if i == fail_at:
            raise ValueError(f"{name} broke\nsecond line")
        if clear is not None and i == 1:
            clear()
        yield False


def _drive(queue_of: Any) -> tuple[list[str], list[bool], list[str]]:
    """Run ExaBGP's callback queue to the end as its reactor does (one ``run`` per turn): the
    callbacks' steps in order, what each ``run`` returned, and the services told of a failure."""
    from exabgp.reactor.asynchronous import ASYNC

    steps: list[str] = []
    errors: list[str] = []
    queue = ASYNC()
    queue.set_error_handler(errors.append)
    for uid, callback in queue_of(steps, queue):
        queue.schedule(uid, "command", callback)
    returned = []
    for _ in range(100):
        returned.append(queue.run())
        steps.append("|")  # where each turn ended
        if queue.ready():
            break
    return steps, returned, errors


def _cases(steps: list[str], queue: Any) -> list[tuple[str, Any]]:
    return [
        ("a", _script(steps, "a", 3)),
        ("b", _script(steps, "b", 120)),  # longer than ASYNC.LIMIT: spread over turns
        ("c", _script(steps, "c", 5, fail_at=2)),  # logged and answered as an error, not raised
        ("d", iter([True, False])),  # not a generator: ExaBGP's fallback calls next() on it too
        ("e", _script(steps, "e", 0)),  # finishes at once
        ("f", _script(steps, "f", 60)),
    ]


def _clearing(steps: list[str], queue: Any) -> list[tuple[str, Any]]:
    # a callback that empties the queue (what a shutdown does) while others wait
    return [("g", _script(steps, "g", 4, clear=queue.clear)), ("h", _script(steps, "h", 3))]


@pytest.mark.parametrize("cases", [_cases, _clearing])
def test_callbacks_run_without_an_event_loop_as_exabgp_runs_them(monkeypatch: pytest.MonkeyPatch,
                                                                  cases: Any) -> None:
    from exabgp.logger import log
    from exabgp.reactor.asynchronous import ASYNC

    logged: list[str] = []
    monkeypatch.setattr(log, "error", classmethod(lambda cls, message, source="", level="": logged.append(message())))
    monkeypatch.setattr(ASYNC, "run", ASYNC.run)  # put back after the test
    theirs, theirs_logged = _drive(cases), list(logged)
    logged.clear()
    synchronous_callbacks()
    ours = _drive(cases)
    assert ours == theirs
    assert logged == theirs_logged
    if cases is _cases:
        assert theirs[2] == ["c"] and any("c broke" in line for line in logged)  # the case did fail


def test_a_coroutine_in_the_queue_still_runs_through_exabgps_own_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from exabgp.logger import log
    from exabgp.reactor.asynchronous import ASYNC

    # ExaBGP's own loop awaits a finished coroutine again and logs that: not ours to judge here
    monkeypatch.setattr(log, "error", classmethod(lambda cls, message, source="", level="": None))
    monkeypatch.setattr(ASYNC, "run", ASYNC.run)
    synchronous_callbacks()
    ran: list[str] = []

    async def coroutine() -> None:
        ran.append("coroutine")

    queue = ASYNC()
    queue.schedule("x", "command", _script(ran, "gen", 2))
    queue.schedule("y", "command", coroutine())
    while not queue.ready():
        queue.run()
    assert ran[:2] == ["gen0", "gen1"] and "coroutine" in ran


def _inet(prefix: str, action: object, next_hop: str | None = None, path_id: int | None = None) -> object:
    from tests.unit.test_exabgp_reactor import _inet as inet

    return inet(prefix, action, next_hop, path_id)


# -- one UPDATE's bytes, built once for the sessions that negotiated the same -------------------------


def _session(local_as: int, peer_as: int, *, asn4: bool = True, v6: bool = True, addpath: bool = False,
             msg_size: int = 4096, local: str = "198.18.0.13") -> Any:
    from exabgp.bgp.message.open.asn import ASN
    from exabgp.bgp.message.open.capability.negotiated import Negotiated
    from exabgp.protocol.family import AFI, SAFI
    from exabgp.protocol.ip import IP

    neighbor = {"capability": {"aigp": False}, "local-address": IP.create(local)}
    negotiated = Negotiated(neighbor)
    negotiated.local_as, negotiated.peer_as, negotiated.asn4 = ASN(local_as), ASN(peer_as), asn4
    negotiated.families = [(AFI.ipv4, SAFI.unicast)] + ([(AFI.ipv6, SAFI.unicast)] if v6 else [])
    negotiated.msg_size = msg_size
    if addpath:
        negotiated.addpath._send[(AFI.ipv4, SAFI.unicast)] = True
    return negotiated


def _updates() -> list[Any]:
    from exabgp.bgp.message import Action
    from exabgp.bgp.message.update import Update
    from exabgp.bgp.message.update.attribute import Attributes
    from exabgp.bgp.message.update.attribute.community.initial.communities import Communities
    from exabgp.bgp.message.update.attribute.community.initial.community import Community
    from exabgp.bgp.message.update.attribute.nexthop import NextHop
    from exabgp.bgp.message.update.attribute.origin import Origin
    from exabgp.protocol.ip import IP

    def attributes(hop: str, communities: tuple[int, ...] = ()) -> Any:
        out = Attributes()
        out.add(Origin(Origin.IGP))
        out.add(NextHop(hop, IP.pton(hop)))
        if communities:
            out.add(Communities([Community.cached(c.to_bytes(4, "big")) for c in communities]))
        return out

    a, w = Action.ANNOUNCE, Action.WITHDRAW
    return [
        # what the mesh sends per claim: one block, its node's address as next hop
        Update([_inet("10.244.1.64/26", a, "198.18.0.13")], attributes("198.18.0.13")),
        Update([_inet("10.244.1.64/26", a, "198.18.0.14")], attributes("198.18.0.14")),  # another next hop
        Update([_inet("10.244.1.64/26", a, "198.18.0.13")], attributes("198.18.0.13", (64512 << 16 | 100,))),
        Update([_inet("10.244.1.128/26", a, "198.18.0.13"), _inet("10.244.2.0/26", a, "198.18.0.13")],
               attributes("198.18.0.13")),
        Update([_inet("10.244.1.64/26", w)], attributes("198.18.0.13")),  # a withdrawal
        Update([_inet("fd00:10:244::/122", a, "fd00::13")], attributes("198.18.0.13")),  # MP_REACH
        Update([_inet("10.244.1.64/26", a, "198.18.0.13", 7)], attributes("198.18.0.13")),  # add-path: not kept
        Update([_inet(f"10.100.0.{i}/32", a, "198.18.0.13") for i in range(40)], attributes("198.18.0.13")),
    ]


def test_update_bytes_are_exabgps_own_for_every_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from exabgp.bgp.message.update import Update

    sessions = [
        _session(64512, 64512), _session(64512, 64512),  # two iBGP mesh peers: the same bytes
        _session(64512, 64512, local="198.18.0.99"),  # another local address: nothing read differs
        _session(64512, 65001), _session(65010, 65001),  # eBGP (AS_PATH, no LOCAL_PREF), a local AS of its own
        _session(64512, 64512, asn4=False), _session(64512, 65001, asn4=False),  # 2-byte AS_PATH
        _session(64512, 64512, v6=False), _session(64512, 64512, addpath=True),
        _session(64512, 64512, msg_size=65535),
    ]
    updates = _updates()
    monkeypatch.setattr(Update, "messages", Update.messages)  # put back after the test
    theirs = {(u, s, wd): list(Update.messages(updates[u], sessions[s], wd))
              for u in range(len(updates)) for s in range(len(sessions)) for wd in (True, False)}
    assert theirs[(0, 0, True)] and theirs[(0, 0, True)] != theirs[(0, 3, True)]  # sessions do differ
    shared_update_bytes()
    for rounds in range(2):  # the second time round every key is known
        for (u, s, wd), expected in theirs.items():
            assert list(Update.messages(updates[u], sessions[s], wd)) == expected, (rounds, u, s, wd)
    # a copy of the UPDATE (ExaBGP deep-copies a change per peer) for another peer: the same bytes,
    # built once
    first = list(Update.messages(updates[0], sessions[0]))
    again = list(Update.messages(copy.deepcopy(updates[0]), sessions[1]))
    assert again == theirs[(0, 1, True)] and again[0] is first[0]


# -- an announce command's route into each peer's outgoing RIB -----------------------------------------


class _Peer:
    """What ``inject_change`` reads of a neighbor: its families, its outgoing RIB, ``remove_self``."""

    def __init__(self, families: list[Any]) -> None:
        from exabgp.bgp.neighbor import Neighbor
        from exabgp.rib.outgoing import OutgoingRIB

        self._families = families
        self.rib = type("RIB", (), {})()
        self.rib.outgoing = OutgoingRIB(True, families)
        self.remove_self = Neighbor.remove_self.__get__(self)

    def families(self) -> list[Any]:
        return list(self._families)


def _inject(changes: list[Any], session: Any) -> tuple[list[list[list[bytes]]], list[Any], list[Any]]:
    """Inject each change into 3 peers (one without IPv6) as ExaBGP's configuration does; what each
    peer then sends (its UPDATEs' bytes), the NLRIs its RIB holds, and what inject_change returned."""
    from exabgp.configuration.configuration import _Configuration
    from exabgp.protocol.family import AFI, SAFI

    both = [(AFI.ipv4, SAFI.unicast), (AFI.ipv6, SAFI.unicast)]
    config = _Configuration()
    config.neighbors = {"a": _Peer(both), "b": _Peer(both), "c": _Peer(both[:1]), "d": _Peer(both)}
    returned = [config.inject_change(["a", "b", "c"], change) for change in changes]
    sent = [[list(u.messages(session)) for u in peer.rib.outgoing.updates(False)]
            for peer in config.neighbors.values()]
    held = [change.nlri for peer in config.neighbors.values() for change in peer.rib.outgoing.cached_changes()]
    return sent, held, returned


def test_routes_reach_each_peers_rib_as_exabgps_own_copies_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from exabgp.configuration.configuration import _Configuration
    from exabgp.rib.change import Change

    from bgp.exabgp_turns import light_injection

    monkeypatch.setattr("exabgp.logger.log.error", classmethod(lambda cls, message, source="", level="": None))
    monkeypatch.setattr(_Configuration, "inject_change", _Configuration.inject_change)  # put back after
    session = _session(64512, 64512)

    def changes() -> list[Any]:
        return [Change(n, u.attributes) for u in _updates() for n in u.nlris]

    theirs = _inject(changes(), session)
    light_injection()
    mine = changes()
    ours = _inject(mine, session)
    assert ours[0] == theirs[0] and ours[2] == theirs[2]
    assert [(n.cidr, n.action, str(n.nexthop)) for n in ours[1]] == [(n.cidr, n.action, str(n.nexthop))
                                                                      for n in theirs[1]]
    # each RIB holds an NLRI of its own: ExaBGP sets a held route's action per RIB
    sources = {id(change.nlri) for change in mine}
    assert len({id(n) for n in ours[1]}) == len(ours[1]) and not sources & {id(n) for n in ours[1]}


# -- the reactor's turns: the peers with work, and all of them once per idle period -----------------


class _Neighbor(dict):  # type: ignore[type-arg]
    def __init__(self, pending: bool = False) -> None:
        super().__init__(passive=False)
        self.rib = type("RIB", (), {})()
        self.rib.outgoing = type("Out", (), {"pending": lambda _self: pending})()
        self.eor: list[Any] = []
        self.messages: list[Any] = []
        self.refresh: list[Any] = []


class _ReactorPeer:
    def __init__(self, fd: int, fsm: Any, *, pending: bool = False) -> None:
        self.fd, self.fsm, self.neighbor = fd, fsm, _Neighbor(pending)
        self.proto = object()
        self._teardown = self._neighbor = None
        self._restart = True

    def stopping(self) -> bool:
        return self._teardown is not None and not self._restart

    def socket(self) -> int:
        return self.fd


def test_turns_go_to_the_peers_with_work_and_to_all_once_per_idle_period(monkeypatch: pytest.MonkeyPatch) -> None:
    from exabgp.bgp.fsm import FSM
    from exabgp.reactor.loop import Reactor
    from exabgp.reactor.peer import Peer

    from bgp.exabgp_turns import peers_with_work

    for name in ("active_peers", "_wait_for_io"):
        monkeypatch.setattr(Reactor, name, Reactor.__dict__[name])  # put back after the test
    monkeypatch.setattr(Peer, "run", Peer.run)
    established = FSM.ESTABLISHED
    peers = {
        "idle": _ReactorPeer(10, established), "readable": _ReactorPeer(11, established),
        "routes": _ReactorPeer(12, established, pending=True), "connecting": _ReactorPeer(13, FSM.CONNECT),
        "reconfigured": _ReactorPeer(14, established), "eor": _ReactorPeer(15, established),
    }
    peers["reconfigured"]._neighbor = object()
    peers["eor"].neighbor.eor.append("ipv4 unicast")
    reactor = Reactor.__new__(Reactor)
    reactor._peers, reactor._sleep_time = peers, 0.1
    reactor._poller = type("Poll", (), {"poll": lambda _self, timeout: [(11, 1)]})()  # fd 11 readable
    theirs = Reactor.active_peers(reactor)
    assert theirs == set(peers)  # ExaBGP's own: every peer, every turn
    peers_with_work()
    for peer in peers.values():  # each peer's last turn asked for nothing more (ACTION.LATER)
        peer._tortie_again = False  # type: ignore[attr-defined]
    clock = [1000.0]
    monkeypatch.setattr("bgp.exabgp_turns.time.monotonic", lambda: clock[0])
    assert reactor.active_peers() == theirs  # the first turn: a round for every peer
    assert list(reactor._wait_for_io(0)) == [11]  # what ExaBGP's own poll yields, recorded
    clock[0] += 0.05
    assert reactor.active_peers() == {"readable", "routes", "connecting", "reconfigured", "eor"}
    peers["idle"]._tortie_again = True  # type: ignore[attr-defined]  # its last turn returned ACTION.NOW
    assert "idle" in reactor.active_peers()
    peers["idle"]._tortie_again = False  # type: ignore[attr-defined]
    clock[0] += 0.1  # an idle period since the last round: every peer, for its timers
    assert reactor.active_peers() == theirs


# -- a wake-up's fixed checks: the listening sockets and the API processes, when due ------------------


def test_the_listener_accepts_at_least_once_per_idle_period_not_on_every_wake_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from exabgp.reactor.listener import Listener
    from exabgp.reactor.loop import Reactor

    from bgp.exabgp_turns import quiet_wakeups

    monkeypatch.setattr(Reactor, "_wait_for_io", Reactor.__dict__["_wait_for_io"])
    monkeypatch.setattr(Listener, "incoming", Listener.__dict__["incoming"])
    from exabgp.reactor.api.processes import Processes
    monkeypatch.setattr(Processes, "received", Processes.__dict__["received"])
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        server.setblocking(False)
        reactor = type("R", (), {"_sleep_time": 0.1})()
        listener = Listener(reactor)
        listener.serving, listener._sockets = True, {server: None}
        assert listener.incoming() is False  # ExaBGP's own: EAGAIN, nothing pending
        quiet_wakeups()
        clock = [1000.0]
        monkeypatch.setattr("bgp.exabgp_turns.time.monotonic", lambda: clock[0])
        assert listener.incoming() is False  # the first call is ExaBGP's own: nothing pending yet
        client.connect(server.getsockname())
        clock[0] += 0.05
        assert listener.incoming() is False and not listener._accepted  # within the period: not tried
        clock[0] += 0.06
        assert listener.incoming() is True and server in listener._accepted  # a period later: accepted
        listener._accepted.pop(server).close()
    finally:
        client.close()
        server.close()


def test_api_processes_are_read_when_the_reactors_poll_saw_their_pipe_and_once_per_idle_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import select
    import subprocess

    from exabgp.reactor.api.processes import Processes
    from exabgp.reactor.listener import Listener
    from exabgp.reactor.loop import Reactor

    from bgp.exabgp_turns import quiet_wakeups

    monkeypatch.setattr(Reactor, "_wait_for_io", Reactor.__dict__["_wait_for_io"])
    monkeypatch.setattr(Listener, "incoming", Listener.__dict__["incoming"])
    monkeypatch.setattr(Processes, "received", Processes.__dict__["received"])
    echo = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # a helper that answers
    try:
        assert echo.stdin is not None and echo.stdout is not None
        processes = Processes()
        processes._process = {"tortie": echo}
        processes._update_fds()
        fd = echo.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)

        def say(line: str) -> None:
            assert echo.stdin is not None
            echo.stdin.write(line.encode() + b"\n")
            echo.stdin.flush()
            assert poller.poll(5000)  # cat has echoed it: the pipe is readable

        say("announce route 10.0.0.0/26 next-hop 198.18.0.1")
        theirs = list(processes.received())  # ExaBGP's own, as the reference
        assert theirs == [("tortie", "announce route 10.0.0.0/26 next-hop 198.18.0.1")]
        quiet_wakeups()
        clock = [1000.0]
        monkeypatch.setattr("bgp.exabgp_turns.time.monotonic", lambda: clock[0])
        reactor = Reactor.__new__(Reactor)
        reactor._sleep_time, reactor.processes = 0.1, processes
        reactor._poller = type("Poll", (), {"poll": lambda _self, timeout: list(poller.poll(0))})()

        assert list(reactor._wait_for_io(0)) == []  # nothing to read
        assert list(processes.received()) == []  # the first check: ExaBGP's own (nothing there)
        say("announce route 10.0.0.64/26 next-hop 198.18.0.1")
        clock[0] += 0.01
        assert list(processes.received()) == []  # not reported by the reactor's poll yet: not read
        assert list(reactor._wait_for_io(0)) == [fd]  # the reactor's poll reports the pipe
        clock[0] += 0.01
        assert list(processes.received()) == [("tortie", "announce route 10.0.0.64/26 next-hop 198.18.0.1")]
        assert list(reactor._wait_for_io(0)) == []  # drained
        say("announce route 10.0.0.128/26 next-hop 198.18.0.1")
        clock[0] += 0.01
        assert list(processes.received()) == []  # a wake-up for something else: the pipe is left alone
        clock[0] += 0.11  # an idle period since the last check: read whatever the poll said
        assert list(processes.received()) == [("tortie", "announce route 10.0.0.128/26 next-hop 198.18.0.1")]
    finally:
        echo.kill()
        echo.wait()


# -- no turn after a message read that would only find nothing to read --------------------------------


class _Connection:
    def __init__(self) -> None:
        self.readable = False

    def reading(self) -> bool:
        return self.readable


class _Proto:
    def __init__(self) -> None:
        self.connection = _Connection()


class _RunningPeer(_ReactorPeer):
    """A peer whose session generator answers what ExaBGP's ``_main`` would: ``ACTION.NOW``."""

    def __init__(self, fsm: Any, action: Any) -> None:
        super().__init__(20, fsm)
        self.proto = _Proto()
        self.reactor = type("Reactor", (), {"processes": type("P", (), {"broken": lambda _s, _n: False})()})()
        self.generator = iter([action] * 10)


def test_a_turn_is_asked_after_a_message_only_while_something_is_left_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from exabgp.bgp.fsm import FSM
    from exabgp.bgp.message import NOP, Update
    from exabgp.reactor.peer import ACTION, Peer
    from exabgp.reactor.protocol import Protocol

    from bgp.exabgp_turns import no_empty_turns

    monkeypatch.setattr(Peer, "run", Peer.run)
    for name in ("read_message", "new_update", "new_eors", "new_operational", "new_refresh"):
        monkeypatch.setattr(Protocol, name, Protocol.__dict__[name])
    no_empty_turns()

    def after_update(fsm: Any = FSM.ESTABLISHED, action: Any = ACTION.NOW) -> _RunningPeer:
        peer = _RunningPeer(fsm, action)
        peer.proto._tortie_last = Update.TYPE  # type: ignore[attr-defined]  # the message just read
        return peer

    assert Peer.run(after_update()) == ACTION.LATER  # nothing to read, nothing to send: no turn now
    readable = after_update()
    readable.proto.connection.readable = True  # type: ignore[attr-defined]  # the next message is there
    assert Peer.run(readable) == ACTION.NOW
    sending = after_update()
    sending.proto._tortie_sending = 1  # type: ignore[attr-defined]  # an UPDATE being written
    assert Peer.run(sending) == ACTION.NOW
    queued = after_update()
    queued.neighbor.eor.append("ipv4 unicast")
    assert Peer.run(queued) == ACTION.NOW
    pending = _RunningPeer(FSM.ESTABLISHED, ACTION.NOW)
    pending.neighbor = _Neighbor(pending=True)
    pending.proto._tortie_last = Update.TYPE  # type: ignore[attr-defined]
    assert Peer.run(pending) == ACTION.NOW  # routes to send
    idle = after_update()
    idle.proto._tortie_last = NOP.TYPE  # type: ignore[attr-defined]  # NOW for another reason than a read
    assert Peer.run(idle) == ACTION.NOW
    assert Peer.run(after_update(FSM.OPENCONFIRM)) == ACTION.NOW  # not established: ExaBGP's own
    assert Peer.run(after_update(action=ACTION.LATER)) == ACTION.LATER

    # What the counted generators yield is ExaBGP's own, and the count is back to 0 when they end.
    proto = Protocol.__new__(Protocol)
    seen: list[int] = []

    def fake_eors(self: Any, afi: Any = None, safi: Any = None) -> Iterator[int]:
        for i in range(3):
            seen.append(self._tortie_sending)
            yield i

    monkeypatch.setattr(Protocol, "new_eors", fake_eors)
    no_empty_turns()  # wraps the fake, in place of ExaBGP's
    assert list(proto.new_eors()) == [0, 1, 2]
    assert seen == [1, 1, 1] and proto._tortie_sending == 0


def test_a_connection_that_cannot_be_polled_keeps_exabgps_own_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    from exabgp.bgp.fsm import FSM
    from exabgp.bgp.message import Update
    from exabgp.reactor.peer import ACTION, Peer
    from exabgp.reactor.protocol import Protocol

    from bgp.exabgp_turns import no_empty_turns

    monkeypatch.setattr(Peer, "run", Peer.run)
    for name in ("read_message", "new_update", "new_eors", "new_operational", "new_refresh"):
        monkeypatch.setattr(Protocol, name, Protocol.__dict__[name])
    no_empty_turns()
    peer = _RunningPeer(FSM.ESTABLISHED, ACTION.NOW)
    peer.proto._tortie_last = Update.TYPE  # type: ignore[attr-defined]

    def closed() -> bool:
        raise TypeError("the socket is gone")

    peer.proto.connection.reading = closed  # type: ignore[attr-defined,method-assign]
    assert Peer.run(peer) == ACTION.NOW
