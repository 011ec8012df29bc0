"""The agent's main loop: syncer → calculation graph → dataplane managers.

Updates from the syncer only mark the state dirty; one thread recomputes and applies, batching
whatever arrived meanwhile. Nothing touches the kernel before the syncer's first "in sync". A
periodic resync re-applies everything so that out-of-band changes are repaired by the same code
path. Waiters (the CNI service's "no pod without its policy") are woken once an apply has put a
given endpoint's chains in the kernel.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from felix_agent.calc.model import DesiredState
from felix_agent.metrics import Metrics

log = logging.getLogger(__name__)


class Manager(Protocol):
    def on_update(self, state: DesiredState) -> None: ...

    def apply(self) -> object: ...


class Gated:
    """A manager applied only when its part of the state changed (or on a resync): ``part`` picks
    that part out of the state. Reading the kernel back costs milliseconds a pod's ADD waits for."""

    def __init__(self, manager: Manager, part: Callable[[DesiredState], object]) -> None:
        self.manager = manager
        self.part = part
        self._wanted: object = None
        self._applied: object = _NEVER

    def on_update(self, state: DesiredState) -> None:
        wanted = self.part(state)
        if self._applied is not _NEVER and wanted == self._wanted:
            return  # its part did not move: the manager's last update stands (it may be O(routes))
        self._wanted = wanted
        self.manager.on_update(state)

    def apply(self, resync: bool = False) -> object:
        if self._wanted == self._applied and not resync:
            return None
        self._applied = _NEVER  # a failure below leaves it to be tried again
        out = self.manager.apply(resync=True) if resync and _takes_resync(self.manager) else self.manager.apply()  # type: ignore[call-arg]
        self._applied = self._wanted
        return out


_NEVER = object()
SLOW_APPLY = 1.0  # seconds; slower applies are logged at info with the time per manager


def _name(manager: Manager) -> str:
    inner = manager.manager if isinstance(manager, Gated) else manager
    return type(inner).__name__


def _takes_resync(manager: Manager) -> bool:
    return "resync" in inspect.signature(manager.apply).parameters


class DataplaneLoop:
    def __init__(self, compute: Callable[[], DesiredState | None], managers: Sequence[Manager], metrics: Metrics,
                 *, resync_interval: float = 90.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.compute = compute
        self.managers = list(managers)
        self.metrics = metrics
        self.resync_interval = resync_interval
        self.clock = clock
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._generation = 0  # bumped by every successful apply
        self._programmed: frozenset[str] = frozenset()  # endpoint keys in the kernel as of the last apply
        self._programmed_from: object = None
        self.first_apply = threading.Event()
        self._thread: threading.Thread | None = None

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
        deadline = self.clock() + timeout
        # One kick: the change that adds the endpoint kicks the loop itself; kicking on every
        # wake-up would recompute and re-apply for nothing until it arrives.
        self.kick()
        with self._cond:
            while endpoint_key not in self._programmed:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def _run(self) -> None:
        next_resync = self.clock() + self.resync_interval
        backoff = 0.05
        while not self._stop.is_set():
            self._dirty.wait(timeout=max(0.0, next_resync - self.clock()))
            if self._stop.is_set():
                return
            resync = self.clock() >= next_resync
            self._dirty.clear()
            try:
                self._apply_once(resync)
                backoff = 0.05
            except Exception:  # one failed apply must not kill the loop; the next one retries
                log.exception("dataplane apply failed; retrying in %.2fs", backoff)
                self.metrics.errors += 1
                # Quick at first (a pod waits for its policy), slower if the failure persists.
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                self._dirty.set()
            if resync:
                next_resync = self.clock() + self.resync_interval

    def _apply_once(self, resync: bool) -> None:
        state = self.compute()
        if state is None:  # not in sync yet: the kernel is left alone
            return
        started = time.perf_counter()
        for manager in self.managers:
            manager.on_update(state)
        spent: list[tuple[str, float]] = []
        for manager in self.managers:
            before = time.perf_counter()
            if resync and _takes_resync(manager):
                manager.apply(resync=True)  # type: ignore[call-arg]  # re-read the kernel first
            else:
                manager.apply()
            spent.append((_name(manager), time.perf_counter() - before))
            if getattr(manager, "programs_endpoints", False):
                self._publish(state)
        elapsed = time.perf_counter() - started
        self.metrics.observe_apply(elapsed, state, resync)
        # A slow apply delays every change queued behind it (and a pod's ADD): say where the time went.
        log.log(logging.INFO if elapsed > SLOW_APPLY else logging.DEBUG, "applied %d endpoints in %.1f ms%s: %s",
                len(state.endpoints), elapsed * 1000, " (resync)" if resync else "",
                ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in spent if seconds >= 0.001))
        with self._cond:
            self._generation += 1
        self._publish(state)
        self.first_apply.set()

    def _publish(self, state: DesiredState) -> None:
        """Wake the ADDs whose endpoints ``state`` has: their policy is in the kernel."""
        with self._cond:
            if state.endpoints is not self._programmed_from:  # the calculator keeps it when unchanged
                self._programmed = frozenset(e.key for e in state.endpoints)
                self._programmed_from = state.endpoints
            self._cond.notify_all()
