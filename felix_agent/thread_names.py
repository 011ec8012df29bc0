"""The agent's threads under their own names in the kernel (``/proc/<pid>/task/<tid>/comm``), so
that ``top -H``, ``ps -L`` and the benchmarks can tell the syncer's CPU from the BGP reader's or the
dataplane loop's (Python names its threads for itself only: the kernel sees ``felix-agent`` for
all). Owns that copy of the names and nothing else; must not touch another process's threads
(ExaBGP, a child process, keeps its own).
"""

from __future__ import annotations

import threading


class ThreadNames:
    """``name()``: gives every running Python thread not named yet its name in the kernel (the
    first 15 bytes: the kernel's limit). Call it again to catch threads started since (the BGP
    channel's reader starts when ExaBGP connects); a thread is written once."""

    def __init__(self, proc: str = "/proc/self/task") -> None:
        self._proc = proc
        self._named: set[int] = set()

    def name(self) -> int:
        """How many threads were named by this call."""
        count = 0
        alive: set[int] = set()
        for thread in threading.enumerate():
            tid = thread.native_id
            if tid is None:
                continue
            alive.add(tid)
            if tid in self._named:
                continue
            try:
                with open(f"{self._proc}/{tid}/comm", "wb") as comm:
                    comm.write(thread.name.encode("utf-8", "replace")[:15])
            except OSError:  # the thread ended meanwhile, or no /proc: a name is a convenience
                continue
            self._named.add(tid)
            count += 1
        self._named &= alive  # a reused thread id is a new thread
        return count
