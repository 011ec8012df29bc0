"""Policy and profile chains that no local endpoint uses any more, kept in the table a short while.

A rolling deployment's pods of one namespace come and go: the last pod of a profile leaves and the
next arrives a second later. Removing the profile's chains and selector sets when the last one
leaves, and making them again for the next, costs a transaction through libnftables each way
(making or deleting a set is not in ``kernel.nfnl_batch``'s grammar, and libnftables first loads its
cache of the whole ruleset: ~11 netlink dumps). The endpoint half's list chains (``to-<h>`` /
``from-<h>``, shared by the endpoints of one policy list) linger the same way. Kept a while, the next
pod's ADD is two dispatch-map elements and its set elements, straight over nfnetlink, and its DEL
the same, deleted: no chain made or deleted, no rule added or flushed.

A lingering chain is reachable from no base chain: no dispatch-map element goes to a lingering list
chain, and only lingering list chains jump to a lingering policy chain. So it allows or drops
nothing; its selector sets stay declared, emptied of members once the calculation stops asking for
them. After ``seconds`` unused it is no longer declared and the next apply removes it the usual
way, rules before sets and chains.

Owns which (policy id, direction) chains and which list chains linger and until when, and the one
timer thread that wakes the dataplane loop when the earliest of them is due. Must not render chains
or touch the kernel (``felix_agent.dataplane.policy`` does).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

from felix_agent.dataplane.nft_ruleset import Chain

Ref = tuple[str, str]  # (policy id, direction)
P = TypeVar("P")  # the policy a chain renders from (felix_agent.calc.model.Policy)
K = TypeVar("K")
V = TypeVar("V")


class _Leaving(Generic[K, V]):
    """What left its owner's wanted set less than ``seconds`` ago, by key, with the value it is
    rendered from and since when; the clock and expiry both lingers share."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._since: dict[K, tuple[float, V]] = {}

    def _moved(self, gone: Iterable[tuple[K, V]], back: Iterable[K], now: float) -> None:
        """``gone`` left the wanted set at ``now`` (a key already lingering keeps its time); ``back``
        is wanted again."""
        for key, value in gone:
            self._since.setdefault(key, (now, value))
        for key in back:
            self._since.pop(key, None)

    def _lingering(self, now: float) -> dict[K, V]:
        for key in [k for k, (since, _) in self._since.items() if now - since >= self.seconds]:
            del self._since[key]
        return {key: value for key, (_, value) in self._since.items()}

    def due(self) -> float:
        """When the earliest lingering one expires (clock time; inf when none lingers)."""
        return min(since for since, _ in self._since.values()) + self.seconds if self._since else math.inf

    def expired(self) -> bool:
        """A lingering one is due: the next render must drop it."""
        return self.clock() >= self.due()


class Linger(_Leaving[Ref, P]):
    """``keep(wanted, known)`` → the chains to declare beyond ``wanted``, with the policy each renders
    from: those that left ``wanted`` less than ``seconds`` ago. The calculation stops sending a policy
    no local endpoint uses, so the policy as last known is kept with its ref (a lingering chain is
    rendered as it was; if it is wanted again, from the policy the calculation then sends).
    ``seconds`` ≤ 0: none ever linger."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(seconds, clock)
        self._last: frozenset[Ref] = frozenset()
        self._last_known: Mapping[str, P] = {}

    def keep(self, wanted: frozenset[Ref], known: Mapping[str, P], now: float | None = None) -> Mapping[Ref, P]:
        """``now``: the render's clock reading (the list chains' linger is decided on the same one)."""
        if self.seconds <= 0:
            return {}
        now = self.clock() if now is None else now
        if wanted != self._last:
            gone = [(ref, policy) for ref in self._last - wanted
                    if (policy := known.get(ref[0]) or self._last_known.get(ref[0])) is not None]
            self._moved(gone, [ref for ref in self._since if ref in wanted], now)
            self._last = wanted
        self._last_known = known
        return self._lingering(now)


class ChainLinger(_Leaving[str, Chain]):
    """``keep(chains)`` → the endpoint half's list chains (``to-<h>``/``from-<h>``) that left
    ``chains`` less than ``seconds`` ago, by name. Such a chain jumps to policy chains: those leave
    :class:`Linger`'s ``wanted`` in the same render as the chain's last list, or later, so with the same
    ``seconds`` and one clock reading per render for both, a list chain never outlives a chain it jumps
    to (their removals may share a transaction, which flushes every chain before deleting any)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(seconds, clock)
        self._chains: tuple[Chain, ...] = ()

    def keep(self, chains: tuple[Chain, ...], now: float | None = None) -> dict[str, Chain]:
        if self.seconds <= 0:
            return {}
        now = self.clock() if now is None else now
        if chains is not self._chains:  # the endpoint half hands on the same tuple while no list moved
            names = frozenset(c.name for c in chains)
            self._moved([(c.name, c) for c in self._chains if c.name not in names],
                        [name for name in self._since if name in names], now)
            self._chains = chains
        return self._lingering(now)


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
