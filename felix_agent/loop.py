"""The agent's main loop: syncer → calculation graph → dataplane managers.

Owns when the dataplane is computed and applied, and telling the ADDs that wait for their policy
when it is in the kernel; must not touch the kernel itself (the managers do) nor decide what the
node needs (the calculation does).

Updates from the syncer only mark the state dirty; one thread recomputes and applies, batching
whatever arrived meanwhile. Nothing touches the kernel before the syncer's first "in sync" (the
``view`` callable returns None until then). A periodic resync re-applies everything so that
out-of-band changes are repaired by the same code path. Waiters (the CNI service's "no pod without
its policy") are woken once an apply has put a given endpoint's chains in the kernel. Passes are
numbered as they take their view, so that a waiter can ask for one that saw its change
(:meth:`DataplaneLoop.pass_ticket`: a provisional endpoint, or its withdrawal).

The manager contract (:class:`Manager`; every manager in ``felix_agent.dataplane`` follows it):

- ``on_update(state)`` receives each computed :class:`DesiredState`, records what its concern
  needs of it and returns; it does no I/O (no kernel, no file, no datastore) and does not raise for
  a state it cannot program (``apply`` reports that).
- ``apply(*, resync)`` reconciles its concern against the kernel from the last recorded state and
  writes only the difference; ``resync=True`` (the periodic resync) means it must not trust what
  it believes the kernel holds and reads it back first (a manager that reads the kernel back on
  every apply ignores the flag). It raises when it could not do its work; the loop retries the
  whole apply with a backoff. The value it returns is for tests and logs only.
- The managers are applied in the order given, all of them after every ``on_update``. A manager
  that programs endpoints is given a callback at construction (``PolicyManager``'s
  ``on_programmed``, the loop's :meth:`ProgrammedEndpoints.publish`) and calls it when an apply has
  put the endpoints in the kernel; the loop also publishes them after the last manager.

Consumers of the datastore view itself (BGP's speaker: its configuration and exports come from the
view, not from the desired state) are the loop's ``feeds``: called on the loop's thread with each
view, after the calculation and before the managers; a failure fails the apply like a manager's.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from felix_agent.calc.model import DesiredState, Endpoint
from felix_agent.calc.snapshot import Snapshot
from felix_agent.metrics import Metrics

log = logging.getLogger(__name__)


class Manager(Protocol):
    """One concern of the dataplane (see the module docstring for the contract)."""

    def on_update(self, state: DesiredState) -> None: ...

    def apply(self, *, resync: bool) -> object: ...


class Gated:
    """A manager applied only when its part of the state changed (or on a resync): ``part`` picks
    that part out of the state. Reading the kernel back costs milliseconds a pod's ADD waits for.
    ``pending``, when given, says the manager has work of its own all the same (a background
    read-back of the kernel to adopt)."""

    def __init__(self, manager: Manager, part: Callable[[DesiredState], object], *,
                 pending: Callable[[], bool] | None = None) -> None:
        self.manager = manager
        self.part = part
        self.pending = pending
        self._wanted: object = None
        self._applied: object = _NEVER

    def on_update(self, state: DesiredState) -> None:
        wanted = self.part(state)
        if self._applied is not _NEVER and wanted == self._wanted:
            return  # its part did not move: the manager's last update stands (it may be O(routes))
        self._wanted = wanted
        self.manager.on_update(state)

    def apply(self, *, resync: bool = False) -> object:
        if self._wanted == self._applied and not resync and not (self.pending is not None and self.pending()):
            return None
        self._applied = _NEVER  # a failure below leaves it to be tried again
        out = self.manager.apply(resync=resync)
        self._applied = self._wanted
        return out


_NEVER = object()
SLOW_APPLY = 1.0  # seconds; slower applies are logged at info with the time per manager


def _name(manager: Manager) -> str:
    inner = manager.manager if isinstance(manager, Gated) else manager
    return type(inner).__name__


class ProgrammedEndpoints:
    """The endpoints whose policy is in the kernel as of the last publication, and the ADDs
    waiting for theirs. Published by the policy manager (through the callback it is given) and by
    the loop after each apply; waited on by the CNI service."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._cond = threading.Condition()
        self._keys: frozenset[str] = frozenset()
        self._from: object = None
        self._pass = 0  # the loop's pass being applied (DataplaneLoop numbers them as they take their view)
        self._published_pass = 0  # the pass of the last publication

    def publish(self, endpoints: Collection[Endpoint]) -> None:
        """Wake the ADDs whose endpoints are in ``endpoints``: their policy is in the kernel."""
        with self._cond:
            if endpoints is not self._from:  # the calculator keeps the same set when unchanged
                self._keys = frozenset(e.key for e in endpoints)
                self._from = endpoints
            self._published_pass = max(self._published_pass, self._pass)
            self._cond.notify_all()

    def begin_pass(self, number: int) -> None:
        """The loop's pass ``number`` took its view: what is published from now on is its state."""
        with self._cond:
            self._pass = number

    def wait_since(self, endpoint_key: str, ticket: int, timeout: float) -> bool:
        """Block until a pass numbered ``ticket`` or later has published ``endpoint_key`` (True),
        or ``timeout`` passes (see :meth:`DataplaneLoop.pass_ticket`)."""
        deadline = self.clock() + timeout
        with self._cond:
            while self._published_pass < ticket or endpoint_key not in self._keys:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wait(self, endpoint_key: str, timeout: float) -> bool:
        """Block until ``endpoint_key`` is published (True) or ``timeout`` passes."""
        deadline = self.clock() + timeout
        with self._cond:
            while endpoint_key not in self._keys:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


class DataplaneLoop:
    """``view()`` is the datastore view to compute from (None: not in sync yet); ``calculate``
    turns it into the desired state; ``feeds`` and ``managers`` act on them (module docstring)."""

    def __init__(self, view: Callable[[], Snapshot | None], calculate: Callable[[Snapshot], DesiredState],
                 managers: Sequence[Manager], metrics: Metrics, *, feeds: Sequence[Callable[[Snapshot], None]] = (),
                 programmed: ProgrammedEndpoints | None = None, resync_interval: float = 90.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.view = view
        self.calculate = calculate
        self.managers = list(managers)
        self.feeds = list(feeds)
        self.metrics = metrics
        self.programmed = programmed if programmed is not None else ProgrammedEndpoints(clock)
        self.resync_interval = resync_interval  # every manager's, unless set apart (set_resync_interval)
        self._intervals: dict[int, float] = {}  # manager index → its own period
        self._schedule_lock = threading.Lock()
        self._next: list[float] = []  # manager index → when its next resync is due (clock time)
        self.clock = clock
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self.first_apply = threading.Event()
        self._frozen = False
        self._thread: threading.Thread | None = None
        # Passes numbered as they take their view; the last one to finish (see pass_ticket).
        self._passes = threading.Condition()
        self._viewed = 0
        self._finished = 0

    def kick(self) -> None:
        """Something changed: recompute and apply soon (from any thread; never blocks)."""
        self._dirty.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dataplane", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait_programmed(self, endpoint_key: str, timeout: float) -> bool:
        """Block until an apply has programmed ``endpoint_key`` (True) or ``timeout`` passes."""
        # One kick: the change that adds the endpoint kicks the loop itself; kicking on every
        # wake-up would recompute and re-apply for nothing until it arrives.
        self.kick()
        return self.programmed.wait(endpoint_key, timeout)

    # ---- waiting for a pass that saw a change (felix_agent.pod_policy) ---------------------------
    def pass_ticket(self) -> int:
        """The number of the first pass that will see every change made to the view before this
        call; kicks the loop for it. :meth:`wait_passed` waits until that pass has applied,
        ``programmed.wait_since`` until it has published an endpoint's policy."""
        with self._passes:
            ticket = self._viewed + 1
        self.kick()
        return ticket

    def wait_passed(self, ticket: int, timeout: float) -> bool:
        """Block until the pass numbered ``ticket``, or a later one, has applied (True) or ``timeout`` passes."""
        with self._passes:
            return self._passes.wait_for(lambda: self._finished >= ticket, max(timeout, 0.0))

    def _take_view(self) -> tuple[int, Snapshot | None]:
        with self._passes:
            self._viewed += 1
            number = self._viewed
        self.programmed.begin_pass(number)
        return number, self.view()

    def _passed(self, number: int) -> None:
        with self._passes:
            self._finished = max(self._finished, number)
            self._passes.notify_all()

    def set_resync_interval(self, seconds: float, managers: Collection[Manager] | None = None) -> None:
        """The period of the periodic resync of ``managers`` (default: all of them; 0 or less: none),
        from any thread; the next resync of each comes ``seconds`` from now (FelixConfiguration's
        routeRefreshInterval and nftablesRefreshInterval, applied live)."""
        chosen = [i for i, m in enumerate(self.managers) if managers is None or any(m is c for c in managers)]
        with self._schedule_lock:
            if managers is None:
                self.resync_interval = seconds
            now = self.clock()
            for i in chosen:
                self._intervals[i] = seconds
                if i < len(self._next):  # else the loop has not started: it schedules from the periods
                    self._next[i] = now + self._period(i)
        self._dirty.set()  # the loop's wait is cut short, to wait for the new schedule

    def _period(self, i: int) -> float:
        seconds = self._intervals.get(i, self.resync_interval)
        return seconds if seconds > 0 else math.inf

    def _run(self) -> None:
        start = self.clock()
        with self._schedule_lock:  # one clock reading: managers of one period resync in one apply
            self._next = [start + self._period(i) for i in range(len(self.managers))]
        backoff = 0.05
        while not self._stop.is_set():
            with self._schedule_lock:
                first = min(self._next, default=math.inf)
            self._dirty.wait(timeout=None if first == math.inf else max(0.0, first - self.clock()))
            if self._stop.is_set():
                return
            now = self.clock()
            with self._schedule_lock:
                due = frozenset(i for i, t in enumerate(self._next) if now >= t)
            self._dirty.clear()
            try:
                self._apply_once(due)
                backoff = 0.05
            except Exception:  # one failed apply must not kill the loop; the next one retries
                log.exception("dataplane apply failed; retrying in %.2fs", backoff)
                self.metrics.errors += 1
                # Quick at first (a pod waits for its policy), slower if the failure persists.
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                self._dirty.set()
            if due or not self._frozen:
                self._freeze()
            ended = self.clock()
            with self._schedule_lock:
                for i in due:
                    self._next[i] = ended + self._period(i)

    def _freeze(self) -> None:
        """Move what the agent holds so far out of the cyclic garbage collector's sight. At 5,000
        endpoints it tracks millions of objects (rendered chains, rules, sets): a collection of the
        oldest generation then stops the loop for ~100 ms every dozen new pods, more as they grow.
        Those objects live as long as their endpoints do; refcounting still frees them."""
        if self.first_apply.is_set():
            gc.collect(1)  # the young garbage first (cheap): what is frozen is never collected
            gc.freeze()
            self._frozen = True

    def _apply_once(self, due: Collection[int] = ()) -> None:
        """One apply; the managers at the indexes ``due`` resync (read the kernel back) this time."""
        resync = bool(due)
        number, view = self._take_view()
        if view is None:  # not in sync yet: the kernel is left alone
            self._passed(number)
            return
        state = self._update(view)
        started = time.perf_counter()
        spent: list[tuple[str, float]] = []
        for i, manager in enumerate(self.managers):
            if resync and self._dirty.is_set():
                # A change arrived during this resync (a new pod waits for its policy): apply it to
                # every manager first, then resync the remaining ones against the newer state.
                self._dirty.clear()
                number, fresh = self._take_view()
                state = self._update(fresh or view)
                for each in self.managers:
                    each.apply(resync=False)
                self.programmed.publish(state.endpoints)
                self._passed(number)  # a pass of its own for pass_ticket's waiters
            before = time.perf_counter()
            manager.apply(resync=i in due)  # a resync re-reads the kernel first
            spent.append((_name(manager), time.perf_counter() - before))
        elapsed = time.perf_counter() - started
        self.metrics.observe_apply(elapsed, state, resync)
        # A slow apply delays every change queued behind it (and a pod's ADD): say where the time went.
        log.log(logging.INFO if elapsed > SLOW_APPLY else logging.DEBUG, "applied %d endpoints in %.1f ms%s: %s",
                len(state.endpoints), elapsed * 1000, " (resync)" if resync else "",
                ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in spent if seconds >= 0.001))
        self.programmed.publish(state.endpoints)
        self.first_apply.set()
        self._passed(number)

    def _update(self, view: Snapshot) -> DesiredState:
        state = self.calculate(view)  # works on what changed since the last call
        for feed in self.feeds:
            feed(view)
        for manager in self.managers:
            manager.on_update(state)
        return state
