"""Fixed costs in ExaBGP's reactor per command and per UPDATE sent, cut in our wrapper
(``bgp.exabgp_reactor`` applies them before ExaBGP starts). Each gives what ExaBGP's own code
gives (the same callbacks run in the same order, the same bytes on the wire); it must not change
what ExaBGP says or when a session starts or ends.

- ``synchronous_callbacks``: ExaBGP 5.0.15 runs its queue of API callbacks (one per command: an
  ``announce``'s parse, its injection into each peer's RIB, the ack) through ``asyncio.run`` on
  every reactor turn that has one, even when every callback is a plain generator, as ours always
  are. Each ``asyncio.run`` makes and closes an event loop (a socket pair, an epoll descriptor, a
  task, signal handler checks): ~0.2 ms of the origin's CPU per command, before the first UPDATE
  is built. Generators now run without it, in the same order and with the same limits; a queue
  that holds a coroutine goes through ExaBGP's own ``run``.
- ``peers_with_work``: on every wake-up ExaBGP's reactor gives every peer a turn: each runs its
  session generator, polls its socket, checks its timers and statistics (in a 10-node mesh, 9
  peers per wake-up, to receive one UPDATE from one of them). A peer now gets a turn when it has
  something to do: its socket was reported readable, it asked to be called again (``ACTION.NOW``),
  it has routes, EORs, operational or refresh messages queued, it is not established, or it is
  being torn down or reconfigured; and every peer gets one at least once per reactor idle period
  (``exabgp.reactor.speed`` / 100 s), as on an idle wake-up before, for its timers.
- ``light_injection``: an announce command's route is put into each peer's outgoing RIB as a deep
  copy made by ``Neighbor.remove_self`` (~40 us each, 9 per claim, before the first UPDATE is
  built). For a plain INET route without a ``self`` next hop, the copy is of the NLRI only (its
  own object, so its action can change per RIB as ExaBGP changes it), sharing the attributes
  and the NLRI's parts, which nothing changes in place.
- ``shared_update_bytes``: the origin's ExaBGP builds the UPDATE for one claimed block once per
  peer (9 times in a 10-node mesh), and each build packs the same attributes and NLRIs for peers
  whose session negotiated the same. The bytes of an UPDATE are kept for the reactor turn in which
  they were built, keyed by what they are made of (each NLRI's and attribute's packed form) and by
  every negotiated value the packing reads; a peer with anything else negotiated gets its own build.
- ``quiet_wakeups``: on every wake-up (two per UPDATE received: the UPDATE, then the turn its
  ``ACTION.NOW`` asks for) the reactor tries an ``accept`` on its listening sockets (EAGAIN, raised
  and caught) and, per API process, ``wait4``s it and makes a ``poll`` object to ask whether its
  pipe is readable, though the reactor's own ``poll`` watches that pipe already. The API processes
  are now read when the reactor's last ``poll`` reported their pipe readable, and the listening
  sockets and the processes' health are checked at least once per idle period as on an idle
  wake-up before: a new BGP connection is accepted up to ``speed`` / 100 s (0.1 s) later, a dead
  API process noticed up to that much later.
- ``no_empty_turns``: a peer that has just read a message asks for another turn at once
  (``ACTION.NOW``) in case more is there: after each UPDATE received, a whole reactor turn that
  reads nothing. When nothing else is in progress for the peer (no UPDATE, EOR, operational or
  refresh message being sent, none queued) and its socket has nothing to read, the answer is
  ``ACTION.LATER``: the reactor's poll gives it the turn when its next message comes.
"""

from __future__ import annotations

import copy
import inspect
import time
from typing import Any


def synchronous_callbacks() -> None:
    """``ASYNC.run`` without an event loop while every queued callback is a generator (or a plain
    iterator): the body of ExaBGP's ``_run_async``, called directly. Anything else (a coroutine)
    takes ExaBGP's own path."""
    try:
        from exabgp.logger import log
        from exabgp.reactor.asynchronous import ASYNC
    except ImportError:
        return
    made = ASYNC.run

    def run(self: Any) -> bool:
        if not self._async:
            return False
        for _, callback in self._async:
            if inspect.iscoroutine(callback) or inspect.iscoroutinefunction(callback):
                return bool(made(self))
        # self._async, not a local: a callback may clear() the queue, which replaces it
        uid, callback = self._async.popleft()
        for _ in range(self.LIMIT):
            try:
                next(callback)
            except StopIteration:
                if not self._async:
                    return False
                uid, callback = self._async.popleft()
            except Exception as exc:  # as ExaBGP: a failed callback is logged and answered, not raised
                log.error(lambda uid=uid: f"async | {uid} | problem with function", "reactor")
                for line in str(exc).split("\n"):
                    log.error(lambda line=line, uid=uid: f"async | {uid} | {line}", "reactor")
                self._notify_error(uid)
                if not self._async:
                    return False
                uid, callback = self._async.popleft()
        self._async.appendleft((uid, callback))
        return True

    ASYNC.run = run


SHARED_MAX_NLRIS = 16  # larger UPDATEs (a table) are built per peer as before: one build is the cost
SHARED_ENTRIES = 256  # UPDATEs kept; the key decides the bytes, so how long one is kept does not matter


def shared_update_bytes() -> None:
    """``Update.messages`` (the wire messages of one UPDATE for one session) reuses the bytes it
    built for an UPDATE with the same content for a session that negotiated the same.

    The content key is each NLRI's family, prefix, action and next hop, and the attributes'
    ``index()``: the key ExaBGP's own outgoing RIB groups NLRIs by, packing one attribute set for
    all of them. The session key is everything ``Update.messages`` and the attribute and NLRI
    packers read from ``Negotiated``: local and peer AS, 4-byte ASNs, message size, families,
    extended next hops, AIGP, add-path per family of the UPDATE. An UPDATE with a next hop
    ``self`` (a per-session address), an NLRI other than a plain INET without path ID, or more
    than ``SHARED_MAX_NLRIS`` NLRIs is built as before."""
    try:
        from exabgp.bgp.message.update import Update
        from exabgp.bgp.message.update.attribute import Attribute
        from exabgp.bgp.message.update.nlri.inet import INET
        from exabgp.bgp.message.update.nlri.qualifier.path import PathInfo
    except ImportError:
        return
    made = Update.messages
    nopath, next_hop_code = PathInfo.NOPATH, Attribute.CODE.NEXT_HOP
    built: dict[tuple[Any, ...], tuple[bytes, ...]] = {}

    def key(update: Any, negotiated: Any, include_withdraw: bool) -> tuple[Any, ...] | None:
        nlris, attributes = update.nlris, update.attributes
        if not nlris or len(nlris) > SHARED_MAX_NLRIS:
            return None
        content = []
        families = set()
        for nlri in nlris:
            if type(nlri) is not INET or nlri.path_info is not nopath or getattr(nlri.nexthop, "SELF", False):
                return None
            families.add((nlri.afi, nlri.safi))
            content.append((nlri.afi, nlri.safi, nlri.action, nlri.cidr.pack_nlri(), str(nlri.nexthop)))
        for value in attributes.values():
            if getattr(value, "SELF", False):
                return None
        addpath = tuple(negotiated.addpath.send(afi, safi) for afi, safi in sorted(families))
        session = (int(negotiated.local_as), int(negotiated.peer_as), negotiated.asn4, negotiated.msg_size,
                   tuple(negotiated.families), tuple(negotiated.nexthop), bool(negotiated.aigp), addpath)
        # the next hop itself too: index() is cached on the object and may predate a "self" resolved
        hop = str(attributes.get(next_hop_code, ""))
        return (tuple(content), attributes.index(), hop, session, include_withdraw)

    def messages(self: Any, negotiated: Any, include_withdraw: bool = True) -> Any:
        found_key = key(self, negotiated, include_withdraw)
        if found_key is None:
            yield from made(self, negotiated, include_withdraw)
            return
        found = built.get(found_key)
        if found is None:
            found = tuple(made(self, negotiated, include_withdraw))
            if len(built) >= SHARED_ENTRIES:
                built.clear()
            built[found_key] = found
        yield from found

    Update.messages = messages


def light_injection() -> None:
    """``_Configuration.inject_change`` (an API route into the outgoing RIB of each matching peer)
    with a copy of the NLRI per peer instead of ``remove_self``'s deep copy of the whole change,
    for a plain INET route whose next hop and attributes hold no ``self``; anything else goes
    through ExaBGP's own, as before."""
    try:
        from exabgp.bgp.message.update.nlri.inet import INET
        from exabgp.configuration.configuration import _Configuration
        from exabgp.logger import log
        from exabgp.rib.change import Change
    except ImportError:
        return
    made = _Configuration.inject_change

    def inject_change(self: Any, peers: Any, change: Any) -> bool:
        nlri, attributes = change.nlri, change.attributes
        if (type(nlri) is not INET or getattr(nlri.nexthop, "SELF", False)
                or any(getattr(value, "SELF", False) for value in attributes.values())):
            return bool(made(self, peers, change))
        family = nlri.family().afi_safi()
        result = False
        for neighbor_name in self.neighbors:
            if neighbor_name in peers:
                neighbor = self.neighbors[neighbor_name]
                if family in neighbor.families():
                    neighbor.rib.outgoing.add_to_rib(Change(copy.copy(nlri), attributes))
                    result = True
                else:
                    log.error(
                        lambda change=change, neighbor_name=neighbor_name: (
                            f"the route family ({change.nlri.short()}) is not configured on neighbor {neighbor_name}"
                        ),
                        "configuration",
                    )
        return result

    _Configuration.inject_change = inject_change


def peers_with_work() -> None:
    """The reactor's turns go to the peers with something to do (the module's docstring says which),
    and to all of them at least once per idle period (the poll timeout, ``speed`` / 100 s)."""
    try:
        from exabgp.bgp.fsm import FSM
        from exabgp.reactor.loop import Reactor
        from exabgp.reactor.peer import ACTION, Peer
    except ImportError:
        return
    made_active, made_wait, made_run = Reactor.active_peers, Reactor._wait_for_io, Peer.run

    def run(self: Any) -> Any:
        action = made_run(self)
        self._tortie_again = action == ACTION.NOW
        return action

    def _wait_for_io(self: Any, sleeptime: int) -> Any:
        ready: set[int] = set()
        self._tortie_ready = ready  # what this poll reported: the next turn's readable peers
        for fd in made_wait(self, sleeptime):
            ready.add(fd)
            yield fd

    def active_peers(self: Any) -> set[Any]:
        peers: set[Any] = made_active(self)
        now = time.monotonic()
        if now - self.__dict__.get("_tortie_round", 0.0) >= self._sleep_time:
            self._tortie_round = now  # a turn for every peer: timers, keepalives
            return peers
        ready = self.__dict__.get("_tortie_ready", ())
        return {key for key in peers if _has_work(self._peers[key], ready, FSM.ESTABLISHED)}

    Peer.run = run
    Reactor._wait_for_io = _wait_for_io
    Reactor.active_peers = active_peers


def _has_work(peer: Any, ready: Any, established: Any) -> bool:
    return bool(_unsettled(peer, established) or peer.__dict__.get("_tortie_again", True)
                or peer.socket() in ready or _queued(peer.neighbor))


def _unsettled(peer: Any, established: Any) -> bool:
    """Not an established session left alone: starting, torn down or being reconfigured."""
    return bool(peer.fsm != established or peer._teardown is not None or peer._neighbor is not None)


def _queued(neighbor: Any) -> bool:
    """Routes, an End-of-RIB, operational or refresh messages waiting to go to the peer."""
    return bool(neighbor.rib.outgoing.pending() or neighbor.eor or neighbor.messages or neighbor.refresh)


def quiet_wakeups() -> None:
    """``Listener.incoming`` (an ``accept`` attempt per listening socket) and ``Processes.received``
    (per API process a ``wait4``, a fresh ``poll`` object and its ``poll(0)``, then the read) run
    ExaBGP's own when due: the listener once per idle period (``speed`` / 100 s), the processes
    when the reactor's last ``poll`` reported one of their pipes readable, and once per idle period
    whatever it reported (for a hung-up pipe, an exited process). Anything else returns what an
    idle check returns: no connection, no command."""
    try:
        from exabgp.reactor.api.processes import Processes
        from exabgp.reactor.listener import Listener
        from exabgp.reactor.loop import Reactor
    except ImportError:
        return
    made_incoming, made_received, made_wait = Listener.incoming, Processes.received, Reactor._wait_for_io

    def _wait_for_io(self: Any, sleeptime: int) -> Any:
        processes = self.processes
        ready: set[int] = set()
        if processes is not None:  # what this poll reported: whether the next turn reads the pipes
            processes._tortie_ready, processes._tortie_period = ready, self._sleep_time
        for fd in made_wait(self, sleeptime):
            ready.add(fd)
            yield fd

    def incoming(self: Any) -> bool:
        now = time.monotonic()
        if now - self.__dict__.get("_tortie_round", float("-inf")) < self._reactor._sleep_time:
            return False
        self._tortie_round = now
        return bool(made_incoming(self))

    def received(self: Any) -> Any:
        now = time.monotonic()
        ready = self.__dict__.get("_tortie_ready")
        due = now - self.__dict__.get("_tortie_round", float("-inf")) >= self.__dict__.get("_tortie_period", 0.0)
        if ready is None or due:
            self._tortie_round = now
        elif not any(fd in ready for fd in self.fds):
            return
        yield from made_received(self)

    Reactor._wait_for_io = _wait_for_io
    Listener.incoming = incoming
    Processes.received = received


def no_empty_turns() -> None:
    """``Peer.run``'s ``ACTION.NOW`` after a message read becomes ``ACTION.LATER`` when the turn it
    asks for would only find nothing to read (the module's docstring says when). What a peer is
    sending is known from ``Protocol``'s generators for it (``new_update``, ``new_eors``,
    ``new_operational``, ``new_refresh``), counted while they run; the last message read, from
    ``read_message``. A keepalive that did not go out whole waits for the next turn (at the
    latest the reactor's next round, ``speed`` / 100 s)."""
    try:
        from exabgp.bgp.fsm import FSM
        from exabgp.bgp.message import NOP
        from exabgp.reactor.peer import ACTION, Peer
        from exabgp.reactor.protocol import Protocol
    except ImportError:
        return
    made_run, made_read = Peer.run, Protocol.read_message
    nop, now, later, established = NOP.TYPE, ACTION.NOW, ACTION.LATER, FSM.ESTABLISHED

    def read_message(self: Any) -> Any:
        for message in made_read(self):
            self._tortie_last = message.TYPE
            yield message

    def sending(made: Any) -> Any:
        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            self._tortie_sending = self.__dict__.get("_tortie_sending", 0) + 1
            try:
                yield from made(self, *args, **kwargs)
            finally:
                self._tortie_sending -= 1
        return counted

    def run(self: Any) -> Any:
        action = made_run(self)
        if action != now or _unsettled(self, established):
            return action
        proto = self.proto
        if (proto is None or proto.__dict__.get("_tortie_last", nop) == nop or proto.__dict__.get("_tortie_sending")
                or _queued(self.neighbor) or _readable(proto)):
            return action
        self._tortie_again = False  # for peers_with_work, whichever wraps the other
        return later

    Protocol.read_message = read_message
    for name in ("new_update", "new_eors", "new_operational", "new_refresh"):
        setattr(Protocol, name, sending(getattr(Protocol, name)))
    Peer.run = run


def _readable(proto: Any) -> bool:
    """Whether the peer's socket has something to read (or cannot be asked: then its turn decides)."""
    try:
        return bool(proto.connection.reading())
    except Exception:  # noqa: BLE001 - a connection closing under us: ExaBGP's own turn handles it
        return True
