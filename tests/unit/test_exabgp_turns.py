"""ExaBGP's fixed costs per command and per UPDATE sent, cut in our wrapper (``bgp.exabgp_turns``):
each patch is held to what ExaBGP's own code does with the same input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bgp.exabgp_turns import synchronous_callbacks


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
