"""Waiting in a lab: poll a condition until it holds, and fail saying what was awaited.

The one wait helper of the lab harness, its tests and its benchmarks: nothing in a lab sleeps for
a fixed time instead of waiting for what it needs (a socket, a route, a session, a process gone).
Owns only the polling; must not know what it waits for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What was awaited did not happen in time (an AssertionError: tests report it as a failure)."""


def wait_for(condition: Callable[[], T], timeout: float, what: str = "the condition", interval: float = 0.05, *,
             describe: Callable[[], str] | None = None) -> T:
    """Poll ``condition()`` until it returns something true and return that; raise
    :class:`WaitTimeout` naming ``what`` (and what ``describe()`` says of the state then) after
    ``timeout`` seconds. ``condition`` may raise to stop waiting early (a process that died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            last = f"; last value {value!r}" if value not in (None, False) else ""
            detail = f"\n{describe()}" if describe is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}{last}{detail}")
        time.sleep(interval)
