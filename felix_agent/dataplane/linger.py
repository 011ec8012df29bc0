"""Policy and profile chains that no local endpoint uses any more, kept in the table a short while.

A rolling deployment's pods of one namespace come and go: the last pod of a profile leaves and the
next arrives a second later. Removing the profile's chains and selector sets when the last one
leaves, and making them again for the next, costs a transaction through libnftables each way
(making or deleting a set is not in ``kernel.nfnl_batch``'s grammar, and libnftables first loads its
cache of the whole ruleset: ~11 netlink dumps). Kept a while, the next pod's ADD and DEL are map
elements and list chains only, straight over nfnetlink.

A lingering chain is reachable from no base chain (no list chain jumps to it: those go with their
last endpoint), so it allows or drops nothing; its selector sets stay declared, emptied of members
once the calculation stops asking for them. After ``seconds`` unused it is no longer declared and the
next apply removes it the usual way, rules before sets and chains.

Owns which (policy id, direction) chains linger and until when, and the one timer thread that wakes
the dataplane loop when the earliest of them is due. Must not render chains or touch the kernel
(``felix_agent.dataplane.policy`` does).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Generic, TypeVar

Ref = tuple[str, str]  # (policy id, direction)
P = TypeVar("P")  # the policy a chain renders from (felix_agent.calc.model.Policy)


class Linger(Generic[P]):
    """``keep(wanted, known)`` → the chains to declare beyond ``wanted``, with the policy each renders
    from: those that left ``wanted`` less than ``seconds`` ago. The calculation stops sending a policy
    no local endpoint uses, so the policy as last known is kept with its ref (a lingering chain is
    rendered as it was; if it is wanted again, from the policy the calculation then sends).
    ``seconds`` ≤ 0: none ever linger."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._last: frozenset[Ref] = frozenset()
        self._last_known: Mapping[str, P] = {}
        self._since: dict[Ref, float] = {}  # lingering ref -> when it left `wanted`
        self._kept: dict[Ref, P] = {}

    def keep(self, wanted: frozenset[Ref], known: Mapping[str, P]) -> Mapping[Ref, P]:
        if self.seconds <= 0:
            return {}
        now = self.clock()
        if wanted != self._last:
            for ref in self._last - wanted:
                policy = known.get(ref[0]) or self._last_known.get(ref[0])
                if policy is not None and ref not in self._since:
                    self._since[ref] = now
                    self._kept[ref] = policy
            for ref in [r for r in self._since if r in wanted]:
                del self._since[ref], self._kept[ref]
            self._last = wanted
        self._last_known = known
        for ref in [r for r, since in self._since.items() if now - since >= self.seconds]:
            del self._since[ref], self._kept[ref]
        return self._kept

    def due(self) -> float:
        """When the earliest lingering chain expires (clock time; inf when none lingers)."""
        return min(self._since.values(), default=-math.inf) + self.seconds if self._since else math.inf

    def expired(self) -> bool:
        """A lingering chain is due: the next render must drop it."""
        return self.clock() >= self.due()

    @property
    def lingering(self) -> Collection[Ref]:
        return self._since.keys()


class Alarm:
    """Calls ``wake`` (from its own thread) once the time given to :meth:`at` comes. One kept thread,
    started on first use. It is woken only for a time earlier than the one it sleeps until: a time
    pushed back or withdrawn (the profile used again, then left again: every pod of a churn) is seen
    when it wakes, so a churn costs it a wake-up per linger, not one per pod."""

    def __init__(self, wake: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._wake = wake
        self._clock = clock
        self._cond = threading.Condition()
        self._when = math.inf
        self._sleeping_until = math.inf  # what the thread waits for now
        self._thread: threading.Thread | None = None

    def at(self, when: float) -> None:
        with self._cond:
            self._when = when
            if self._thread is None and when < math.inf:
                self._thread = threading.Thread(target=self._run, name="policy-linger", daemon=True)
                self._thread.start()
            elif when < self._sleeping_until:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while (left := self._when - self._clock()) > 0:
                    self._sleeping_until = self._when
                    self._cond.wait(None if left == math.inf else left)
                self._sleeping_until = self._when = math.inf
            self._wake()
