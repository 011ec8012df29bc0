"""One retry budget shared by every etcd request of one piece of work (a CNI call)."""

from __future__ import annotations

import threading
import time

import pytest

from datastore.deadline import gave_up, request_deadline, retrying, shared_budget
from datastore.errors import DatastoreUnavailable


def test_without_a_shared_budget_each_request_has_its_own() -> None:
    before = time.monotonic()
    retrying(before + 1)
    gave_up(DatastoreUnavailable("https://e:2379", "connection refused"))
    assert request_deadline(4.0) >= before + 4.0  # nothing was remembered


def test_answered_requests_leave_the_budget_whole() -> None:
    with shared_budget():
        first = request_deadline(4.0)
        later = request_deadline(4.0)
    assert later >= first  # nothing failed: every request gets the full budget from its own start


def test_the_first_retrying_request_sets_the_deadline_of_the_rest() -> None:
    with shared_budget() as budget:
        deadline = request_deadline(4.0)
        retrying(deadline)
        retrying(deadline + 100)  # a later retry does not extend it
        assert budget.deadline == deadline
        assert request_deadline(4.0) == deadline
        assert request_deadline(0.001) < deadline  # a shorter budget of its own still applies


def test_after_one_request_gave_up_the_rest_give_up_at_once_with_the_same_cause() -> None:
    with shared_budget():
        error = gave_up(DatastoreUnavailable("https://e:2379", "connection refused"))
        gave_up(DatastoreUnavailable("https://f:2379", "later cause"))  # the first one is kept
        with pytest.raises(DatastoreUnavailable) as raised:
            request_deadline(4.0)
    assert (raised.value.endpoint, raised.value.cause) == (error.endpoint, error.cause)
    assert request_deadline(4.0) > time.monotonic()  # the block's end forgets it


def test_budgets_of_concurrent_calls_are_separate() -> None:
    """The agent serves calls in threads: one call's unreachable etcd must not fail another's."""
    seen: list[float] = []
    with shared_budget():
        gave_up(DatastoreUnavailable("https://e:2379", "connection refused"))

        def other_call() -> None:
            with shared_budget():
                seen.append(request_deadline(4.0))

        thread = threading.Thread(target=other_call)
        thread.start()
        thread.join()
    assert len(seen) == 1
