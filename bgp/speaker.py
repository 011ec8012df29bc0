"""The node's BGP speaker: ExaBGP as a supervised child process, driven through its API.

``Speaker(state_dir, on_route=..., on_session=..., on_end_of_rib=...)`` is what felix-agent embeds:

- ``configure(config)``: the first call starts ExaBGP; later ones re-render its configuration and
  ``reload`` it (ExaBGP touches only added, removed or changed neighbors); a new local address or
  listen port (ExaBGP's environment) restarts it.
- ``announce(exports)``: only the difference is sent, to each peer what its export filters
  accept (``bgp.outbound``); a peer whose session comes up gets all of them again (ExaBGP keeps
  no Adj-RIB-Out across sessions and gives API routes to no neighbor added later), then
  End-of-RIB (``manual-eor``), after what a reflector reflects to it.
- what peers send becomes ``on_route(peer, prefix, next_hop, withdrawn, attrs)`` (or, given
  ``on_groups``, one call per read of ExaBGP's output with its groups ``(peer, prefixes, next
  hop, attrs)``, next hop None for withdrawn ones: an UPDATE's prefixes stay together), session changes
  ``on_session(SessionStatus)``, End-of-RIB ``on_end_of_rib(peer, family)``; ``on_batch()``
  follows the callbacks of each read of ExaBGP's output (where the kernel is written at once). A looped path (our
  router ID as ORIGINATOR_ID, our cluster ID in CLUSTER_LIST, our AS in an eBGP AS_PATH) counts
  as withdrawn, and so does a path the session's import filters reject (``bgp.filters``; it
  reaches neither the kernel nor the reflector) or one for a prefix this node announces itself
  (a service CIDR every node announces must not become a route to another node). With
  ``cluster_id`` set the node reflects (``bgp.reflector``).
- TCP-MD5 keys are read from the files the peers name (``bgp.passwords``) on each ``configure``.
- ExaBGP dying is noticed and it is started again after a backoff. It does not outlive a killed
  agent for long: its API process tears the sessions down (NOTIFICATION, so peers drop our
  routes) and stops it when no agent has come back within a few seconds (``bgp.api_process``).
- ``stop(graceful=True)``: with graceful restart configured ExaBGP closes the sessions without a
  NOTIFICATION, so peers keep our routes while we restart; ``graceful=False`` withdraws first.
- Graceful restart as a helper (``restart_time(peer)``): the time the peer advertised, unless its
  session ended with a NOTIFICATION, sent or received (hold timer expired, peer torn down), which
  ends graceful restart (RFC 4724): then 0, its routes go at once.

The speaker is split by concept: this module has the sessions, configuration reloads and ExaBGP
the process; ``bgp.announced`` the announce/withdraw bookkeeping of our own prefixes;
``bgp.received`` what peers send (loop checks, import filters).

Callbacks run in the API channel's thread (or the caller's, for ``configure``), in order, outside
the speaker's lock; they must be quick. Must not touch kernel routes (``bgp.learned`` does).

Why this module is over 450 lines: it is one state machine under one lock. The sessions, the
exports, the reflector and ExaBGP's lifecycle change together (a session coming up replays the
exports, ExaBGP exiting takes every session down, a reconnecting API process restarts ExaBGP), so
a split would pass the lock and half the state between modules. What stands alone already lives
beside it: the ExaBGP protocol (``bgp.exabgp``), the process and its API channel
(``bgp.api_process``), reflection (``bgp.reflector``), the values (``bgp.model``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bgp import exabgp, outbound, trace
from bgp.announced import Announcements
from bgp.api_process import ExaBGPProcess
from bgp.channel import Channel
from bgp.model import Export, Peer, SessionStatus, SpeakerConfig
from bgp.passwords import with_keys
from bgp.received import PeerInfo, RouteCallback
from bgp.reflector import Reflector
from bgp.route_groups import RouteGroup

log = logging.getLogger(__name__)

SessionCallback = Callable[[SessionStatus], None]
GroupsCallback = Callable[[list[RouteGroup]], None]
EndOfRibCallback = Callable[[str, str], None]

BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
HEALTHY_RUN = 60.0  # a run this long resets the backoff
TICK = 0.5


@dataclass(frozen=True)
class SpeakerMetrics:
    sessions: dict[str, int]  # by state
    routes_announced: int
    routes_learned: int  # in the current sessions
    updates_received: int
    last_update: float | None  # wall-clock time of the last UPDATE received
    exabgp_starts: int
    commands_failed: int
    looped: int  # paths dropped by the loop check


class Speaker(Announcements):
    def __init__(self, state_dir: str | Path, *, on_route: RouteCallback | None = None,
                 on_session: SessionCallback | None = None, on_end_of_rib: EndOfRibCallback | None = None,
                 on_batch: Callable[[], None] | None = None, on_groups: GroupsCallback | None = None,
                 exabgp_bin: str | None = None,
                 python: str | None = None, nice: int = 0) -> None:
        self.state_dir = Path(state_dir)
        self.on_route = on_route or (lambda *a: None)
        self.on_session = on_session or (lambda s: None)
        self.on_end_of_rib = on_end_of_rib or (lambda p, f: None)
        self.on_batch = on_batch or (lambda: None)
        self.on_groups = on_groups
        self.python = python or sys.executable
        # Not the `exabgp` script: the same ExaBGP with its poller repaired (bgp.exabgp_reactor).
        self._exabgp = ExaBGPProcess([exabgp_bin] if exabgp_bin else [self.python, "-m", "bgp.exabgp_reactor"],
                                     self.state_dir,
                                     self.state_dir / exabgp.CONFIG_FILE, self.state_dir / exabgp.PID_FILE,
                                     exabgp.PIPENAME, nice=nice)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._config: SpeakerConfig | None = None
        self._key_problems: dict[str, str] = {}  # peer -> why its key file cannot be used
        self._key_kinds: dict[str, str] = {}
        self._env: dict[str, str] = {}
        self._exports: dict[str, Export] = {}
        self._status: dict[str, SessionStatus] = {}
        self._peers: dict[str, PeerInfo] = {}
        self._reflector: Reflector | None = None
        self._hello_from: int | None = None  # the ExaBGP whose API process has connected
        self._channel: Channel | None = None
        self._acks: deque[str] = deque()  # commands sent, waiting for ExaBGP's done/error
        self._restart = self._stopping = self._reload = False
        self._supervisor: threading.Thread | None = None
        self._pending: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()  # callbacks to make
        self._counts = {"updates": 0, "starts": 0, "failed": 0, "looped": 0}
        self._last_update: float | None = None

    # -- what felix-agent calls -----------------------------------------------------------------

    def configure(self, config: SpeakerConfig) -> None:
        """Apply ``config``; ``exabgp.ConfigError`` for one ExaBGP would refuse."""
        wanted = config
        config, problems = with_keys(config)
        socket_path = self.state_dir / exabgp.SOCKET_FILE
        text = exabgp.render(config, socket_path=socket_path, python=self.python)
        env = exabgp.environment(config, self.state_dir)
        with self._lock:
            first = self._config is None
            old_peers = {p.address: p for p in self._config.peers} if self._config else {}
            old_env, self._config, self._env = self._env, config, env
            self._key_problems = {p.address: problems[p.address] for p in wanted.peers if p.address in problems}
            self._key_kinds = {p.address: p.kind for p in wanted.peers if p.address in problems}
            self._set_peers(config.peers)
            self._refilter(old_peers, config.peers)
            self._set_reflector(config)
            if first:
                self._exabgp.prepare()
                self._channel = Channel(socket_path, self._on_line, self._on_hello, self._on_lost, self._on_batch)
            changed = self._exabgp.write_config(text)
            if first:
                self._supervisor = threading.Thread(target=self._supervise, name="bgp-exabgp", daemon=True)
                self._supervisor.start()
            elif env != old_env:
                self._restart = True
            elif changed and not self._send(["reload"]):
                self._reload = True  # sent once its API process is connected (a signal could kill
                # an ExaBGP still starting, before its handlers are in place)
        self._wake.set()
        self._fire()

    def sessions(self) -> list[SessionStatus]:
        """Each session's state, with its filters and prefix counts (received, accepted, sent)."""
        with self._lock:
            if self._config is None:
                return []
            out = []
            for p in self._config.peers:
                status = self._status[p.address]
                info = self._peers.get(p.address, PeerInfo())
                up = status.state == "Established"
                sent = len(outbound.for_peer(outbound.export_filters(p), self._exports)) if up else 0
                if up and self._reflector is not None:  # what we reflect to it is sent too
                    sent += self._reflector.sent_count(p.address)
                out.append(replace(status, filters=tuple(f.name for f in p.options.filters),
                                   received=len(info.announced), accepted=len(info.routes),
                                   sent=sent))
            out += [SessionStatus(a, self._key_kinds.get(a, ""), "Idle", _now(), problem)
                    for a, problem in self._key_problems.items()]
            return out

    def restart_time(self, peer: str) -> int:
        """The graceful-restart time ``peer`` advertised (0: none): how long to keep its routes."""
        with self._lock:
            info = self._peers.get(peer)
            return info.restart_time if info else 0

    def learned(self) -> dict[str, dict[str, str]]:
        """peer -> prefix -> next hop, as received in the current sessions."""
        with self._lock:
            return {peer: {p: r.next_hop for p, r in info.routes.items()} for peer, info in self._peers.items()
                    if info.routes}

    def metrics(self) -> SpeakerMetrics:
        with self._lock:
            by_state: dict[str, int] = {}
            for s in self._status.values():
                by_state[s.state] = by_state.get(s.state, 0) + 1
            c = self._counts
            return SpeakerMetrics(by_state, len(self._exports), sum(len(i.routes) for i in self._peers.values()),
                                  c["updates"], self._last_update, c["starts"], c["failed"], c["looped"])

    @property
    def exabgp_pid(self) -> int | None:
        with self._lock:
            return self._exabgp.pid if self._exabgp.running() else None

    def send(self, command: str) -> bool:
        """A raw ExaBGP API command (diagnostics); False when ExaBGP is not connected."""
        with self._lock:
            return self._send([command])

    def stop(self, graceful: bool = True) -> None:
        """Stop ExaBGP. ``graceful``: leave our routes with the peers (graceful restart), and make
        no callbacks; otherwise withdraw everything first."""
        if not graceful:
            with self._lock:
                commands = outbound.changes(self._exports, {}, self._config.peers if self._config else (),
                                            self._established())
                sent = self._send(commands + (self._reflector.withdraw_all() if self._reflector else []))
            deadline = time.monotonic() + 3.0
            while sent and self._acks and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # "done" means queued: give ExaBGP a few loops to send the UPDATEs
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    # -- peers and sessions ---------------------------------------------------------------------

    def _set_peers(self, peers: Iterable[Peer]) -> None:
        wanted = {p.address: p for p in peers}
        for address in [a for a in self._status if a not in wanted]:
            status = self._status.pop(address)
            for prefix in self._peers.pop(address, PeerInfo()).routes:
                self._later(self.on_route, address, prefix, None, True, {})
            self._later(self.on_session, replace(status, state="Idle", since=_now(), info="removed"))
        for address, peer in wanted.items():
            old = self._status.get(address)
            if old is None or old.kind != peer.kind:
                state = old.state if old else ("Idle" if not self._exabgp.running() else _waiting(peer))
                self._status[address] = SessionStatus(address, peer.kind, state, old.since if old else _now())

    def _established(self) -> list[str]:
        return [p for p, s in self._status.items() if s.state == "Established"]

    def _set_reflector(self, config: SpeakerConfig) -> None:
        if self._reflector is not None and self._reflector.cluster_id != config.cluster_id:
            self._send(self._reflector.withdraw_all())
            self._reflector = None
        if config.cluster_id is None:
            return
        if self._reflector is not None:
            self._send(self._reflector.set_peers(config.peers))
            return
        # A new reflector starts from what the sessions that are up have already sent us.
        reflector = self._reflector = Reflector(config.router_id, config.cluster_id, config.asn)
        reflector.own(self._exports)
        commands = reflector.set_peers(config.peers)
        up = [p for p, s in self._status.items() if s.state == "Established"]
        for peer in up:
            commands += reflector.session_up(peer, self._peers.get(peer, PeerInfo()).router_id)
        for peer in up:
            for prefix, path in self._peers.get(peer, PeerInfo()).routes.items():
                commands += reflector.update(peer, prefix, path)
        self._send(commands)

    def _set_state(self, peer: str, state: str, info: str = "") -> None:
        old = self._status.get(peer)
        if old is None or (old.state, old.info) == (state, info):
            return
        self._status[peer] = SessionStatus(peer, old.kind, state, _now(), info)
        if not self._stopping:
            self._later(self.on_session, self._status[peer])

    def _session_down(self, peer: str, info: str) -> None:
        if peer in self._peers:
            self._peers[peer].routes = {}
            self._peers[peer].announced = {}
            if info.startswith("notification"):  # "notification sent (4,0)", "... received (6,2)"
                self._peers[peer].restart_time = 0
        configured = next((p for p in self._config.peers if p.address == peer), None) if self._config else None
        self._set_state(peer, _waiting(configured) if self._exabgp.running() else "Idle", info)
        if self._reflector is not None:
            self._send(self._reflector.session_down(peer, self.restart_time(peer), time.monotonic()))

    # -- what ExaBGP reports --------------------------------------------------------------------

    def _on_line(self, line: str) -> None:
        event = exabgp.parse(line)
        if event is None:
            return
        with self._lock:
            if isinstance(event, exabgp.Ack):
                command = self._acks.popleft() if self._acks else "?"
                if not event.ok:
                    self._counts["failed"] += 1
                    log.warning("ExaBGP refused the command %r", command[:200])
            elif isinstance(event, exabgp.StateEvent):
                if event.state == "connected":
                    self._set_state(event.peer, "OpenSent")
                elif event.state == "up":
                    self._set_state(event.peer, "Established")
                    self._replay(event.peer)
                elif event.state == "down":
                    self._session_down(event.peer, event.reason)
            elif isinstance(event, exabgp.OpenEvent):
                self._peers[event.peer] = PeerInfo(event.router_id, event.restart_time, event.families)
            elif isinstance(event, exabgp.UpdateEvent):
                self._on_update(event)
                if trace.on() and self._channel is not None:
                    prefixes = [p for p, _ in event.announced]
                    trace.mark("read", prefixes, self._channel.read_at)
                    trace.mark("parsed", prefixes)
            elif isinstance(event, exabgp.EndOfRib):
                self._later(self.on_end_of_rib, event.peer, event.family)
                if self._reflector is not None:
                    self._send(self._reflector.end_of_rib(event.peer))
        self._fire()

    def _on_batch(self) -> None:
        try:
            self.on_batch()
        except Exception:
            log.exception("BGP callback on_batch failed")

    def _on_hello(self, pid: int) -> bool:
        """An API process connected: take it if it is our ExaBGP's. A second one from the same
        ExaBGP (respawned by it) may have missed events: ExaBGP is restarted to resync."""
        self._exabgp.prioritise_thread()  # this thread reads ExaBGP's UPDATEs: ExaBGP's priority
        with self._lock:
            if not self._exabgp.running() or pid != self._exabgp.pid:
                return False
            if self._hello_from == pid:
                log.warning("ExaBGP's API process reconnected: restarting ExaBGP to resync")
                self._restart = True
                self._wake.set()
            self._hello_from = pid
            self._acks.clear()
            self._wake.set()  # a pending reload can go now
            return True

    def _on_lost(self, size: int) -> None:
        log.warning("the API process dropped %d bytes of ExaBGP's output: restarting ExaBGP", size)
        with self._lock:
            self._restart = True
        self._wake.set()

    def _send(self, commands: list[str]) -> bool:
        """Send ``commands`` to ExaBGP (under ``_lock``). False when it is not connected: then
        nothing is lost, sessions are not up and get everything when they come up."""
        if not commands or self._channel is None:
            return bool(not commands)
        self._acks.extend(commands)
        try:
            if self._channel.send(commands):
                return True
        except OSError as e:
            log.warning("ExaBGP's API process does not take commands (%s): restarting ExaBGP", e)
            self._restart = True
            self._wake.set()
        for _ in commands:
            self._acks.pop()
        return False

    # -- ExaBGP the process ---------------------------------------------------------------------

    def _supervise(self) -> None:
        """Start ExaBGP, restart it when it dies (backoff) or when asked, stop it at the end."""
        backoff, started, ever = BACKOFF_MIN, 0.0, False
        while True:
            self._wake.wait(TICK)
            self._wake.clear()
            with self._lock:
                stopping, restart, self._restart = self._stopping, self._restart, False
            if ever and (stopping or restart or not self._exabgp.running()):
                crashed = not (stopping or restart)
                status = self._exabgp.stop()
                if crashed:
                    log.warning("ExaBGP exited (%s); see %s", status, self.state_dir / exabgp.LOG_FILE)
                self._exited(f"ExaBGP exited ({status})" if crashed else "ExaBGP restarting")
                ever = False
                if crashed:
                    healthy = time.monotonic() - started > HEALTHY_RUN
                    backoff = BACKOFF_MIN if healthy else min(backoff * 2, BACKOFF_MAX)
                    if self._sleep(BACKOFF_MIN if healthy else backoff):
                        return
            if stopping:
                return
            if not ever:
                started, ever = time.monotonic(), True
                with self._lock:
                    self._exabgp.start(self._env)
                    self._reload = False  # it reads the configuration as it is now
                    self._counts["starts"] += 1
                    if self._exabgp.nice_refused and self._counts["starts"] == 1:
                        log.warning("%s", self._exabgp.nice_refused)
                    for peer in self._config.peers if self._config else ():
                        self._set_state(peer.address, _waiting(peer))
                self._fire()
            with self._lock:
                if self._reload and self._send(["reload"]):
                    self._reload = False
                if self._reflector is not None:
                    self._send(self._reflector.expire(time.monotonic()))

    def _sleep(self, seconds: float) -> bool:
        """Wait, unless stopped meanwhile (True)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stopping:
            time.sleep(min(TICK, max(0.0, deadline - time.monotonic())))
        return self._stopping

    def _exited(self, info: str) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.drop()
            self._acks.clear()
            for peer, status in list(self._status.items()):
                if status.state == "Established":
                    self._session_down(peer, info)
                else:
                    self._set_state(peer, "Idle", info)
        self._fire()

    # -- callbacks: queued under the lock, made outside it, in order ----------------------------

    def _later(self, fn: Callable[..., None], *args: Any) -> None:
        if fn is self.on_route and self.on_groups is not None:
            peer, prefix, next_hop, withdrawn, attrs = args
            self._later_group(peer, [prefix], None if withdrawn else next_hop, attrs)
            return
        self._pending.append((fn, args))

    def _fire(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                fn, args = self._pending.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("BGP callback %s failed", getattr(fn, "__name__", fn))


def _waiting(peer: Peer | None) -> str:
    """BGP's name for a session being attempted: Active while waiting for the peer to connect."""
    return "Active" if peer is not None and peer.passive else "Connect"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

