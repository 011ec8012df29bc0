"""One piece of work's budget for waiting on an unreachable etcd, shared by all its requests.

Each etcd request retries transient failures for the client's ``retry_budget``. A CNI call makes
several requests in a row (DEL: release the handle, then read and delete the endpoint), so without
a shared budget an unreachable etcd costs that budget once per request: DEL took twice as long as
ADD to answer "try again later". Inside :func:`shared_budget` the first request that has to retry
fixes the deadline of every later one, and once one request has given up on an unreachable etcd
the later ones give up at once with the same cause. Time spent in answered requests (or waiting
for a lock) is not counted: a busy but healthy call is never cut short.

Both clients (gRPC and the JSON gateway) consult it; it does no I/O and imports neither of them.
The budget is per context (``contextvars``): a thread serving one call never sees another call's.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

from datastore.errors import DatastoreUnavailable


class Budget:
    """The shared state: the deadline the first retrying request set, and the first give-up."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.failure: DatastoreUnavailable | None = None


_CURRENT: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("tortie_etcd_budget", default=None)


@contextlib.contextmanager
def shared_budget() -> Iterator[Budget]:
    """Every etcd request made in this block (in this thread or task) shares one retry budget."""
    budget = Budget()
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


def request_deadline(retry_budget: float) -> float:
    """When a request starting now must stop retrying. Raises the shared budget's failure at once
    when an earlier request of the same work already found etcd unreachable."""
    deadline = time.monotonic() + retry_budget
    budget = _CURRENT.get()
    if budget is None:
        return deadline
    if budget.failure is not None:
        raise DatastoreUnavailable(budget.failure.endpoint, budget.failure.cause)
    return deadline if budget.deadline is None else min(deadline, budget.deadline)


def retrying(deadline: float) -> None:
    """A request hit a transient failure and will retry until ``deadline``: the first one to do
    so sets the deadline of the whole work."""
    budget = _CURRENT.get()
    if budget is not None and budget.deadline is None:
        budget.deadline = deadline


def gave_up(error: DatastoreUnavailable) -> DatastoreUnavailable:
    """Record that a request gave up on an unreachable etcd; returns ``error`` to raise."""
    budget = _CURRENT.get()
    if budget is not None and budget.failure is None:
        budget.failure = error
    return error
