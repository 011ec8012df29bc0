"""Reusable threads for the CNI work: the agent's service runs each relayed call on one, and a call
runs its background steps (ADD's assignment beside the veth, DEL's veth removal) on others.

Owns keeping threads for reuse and starting one when every kept thread is busy; must not know what
runs on them. Why: starting and joining a thread cost the agent ~70 µs of CPU on the development
VM (a clone, a stack, two hand-overs of the GIL), handing a task to a waiting thread ~20 µs, and
a pod's ADD and DEL started four. A task never waits for a free thread (a thread is started when
none is idle), so a task may wait for another task without a deadlock. The threads are daemons,
as the ones they replace: a process's exit does not wait for them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Task = Callable[[], object]



def _idle_exit(default: float = 60.0) -> float:
    """Seconds a kept thread stays idle before it ends (a burst's threads do not stay forever);
    ``TORTIE_WORKERS_IDLE_EXIT`` sets it (a test waits for the end without waiting a minute)."""
    try:
        value = float(os.environ.get("TORTIE_WORKERS_IDLE_EXIT", default))
    except ValueError:
        return default
    return value if 0 < value < float("inf") else default


IDLE_EXIT = _idle_exit()


class Workers:
    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: queue.SimpleQueue[Task] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a task that no submit() has counted on yet
        self._started = 0

    def submit(self, task: Task) -> None:
        """Run ``task`` on a kept thread, or on a new one when none is idle. Its exceptions are
        its own business: wrap it to hand them over."""
        with self._lock:
            start = self._idle == 0
            if start:
                self._started += 1
                number = self._started
            else:
                self._idle -= 1  # that thread is this task's: the next submit counts on another
        self._tasks.put(task)
        if start:
            threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                task = self._tasks.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody counts on this thread: end it
                        self._idle -= 1
                        return
                continue  # a submit counted on an idle thread just now: its task is coming
            try:
                task()
            except Exception:  # the task's own wrapper should have reported it; a thread is not lost to it
                log.exception("%s: a task failed", self.name)
            with self._lock:
                self._idle += 1
