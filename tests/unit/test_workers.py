"""cni_plugins.workers: every task runs, a task may wait for another task (ADD's call waits for its
assignment on the same pool) without a deadlock, threads are reused, and a failing task does not
cost the pool its thread."""

from __future__ import annotations

import threading

from cni_plugins.workers import Workers

TIMEOUT = 10.0


def test_a_task_waiting_for_another_task_of_the_pool_is_not_a_deadlock() -> None:
    pool = Workers("test")
    done = threading.Event()

    def outer() -> None:
        inner_done = threading.Event()
        pool.submit(inner_done.set)
        assert inner_done.wait(TIMEOUT)
        done.set()

    for _ in range(3):  # nested, while earlier outer tasks still hold their threads
        pool.submit(outer)
    assert done.wait(TIMEOUT)


def test_many_concurrent_tasks_all_run_at_once() -> None:
    pool = Workers("test")
    n = 20
    barrier = threading.Barrier(n, timeout=TIMEOUT)  # each task waits for all the others
    finished = threading.Semaphore(0)

    def task() -> None:
        barrier.wait()
        finished.release()

    for _ in range(n):
        pool.submit(task)
    for _ in range(n):
        assert finished.acquire(timeout=TIMEOUT)


def test_threads_are_reused_and_survive_a_failing_task() -> None:
    pool = Workers("test")
    names: set[str] = set()
    ran = threading.Semaphore(0)

    def failing() -> None:
        names.add(threading.current_thread().name)
        ran.release()
        raise RuntimeError("a task's own failure")

    def named() -> None:
        names.add(threading.current_thread().name)
        ran.release()

    for i in range(50):  # one after another: each finds the thread of the one before idle, or nearly
        pool.submit(failing if i % 2 else named)
        assert ran.acquire(timeout=TIMEOUT)
    # A thread per task (or per failing task) would be 50 (or 25) names; a task signals a moment
    # before its thread is idle again, so a few more than one may be started.
    assert len(names) <= 10, names
