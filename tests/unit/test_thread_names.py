"""felix_agent.thread_names: the kernel sees each thread under its Python name (what top -H and
the BGP benchmark's CPU per thread read)."""

from __future__ import annotations

import threading
from pathlib import Path

from felix_agent.thread_names import ThreadNames


def comm(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def test_threads_are_named_in_the_kernel_once_and_new_ones_later() -> None:
    stop = threading.Event()
    first = threading.Thread(target=stop.wait, name="syncer", daemon=True)
    first.start()
    names = ThreadNames()
    try:
        assert names.name() >= 1
        assert first.native_id is not None and comm(first.native_id) == "syncer"
        assert names.name() == 0  # nothing new: nothing written again
        late = threading.Thread(target=stop.wait, name="a-thread-name-longer-than-15", daemon=True)
        late.start()
        assert names.name() == 1
        assert late.native_id is not None and comm(late.native_id) == "a-thread-name-l"  # the kernel's 15 bytes
    finally:
        stop.set()


def test_a_missing_proc_names_nothing_and_raises_nothing(tmp_path: Path) -> None:
    assert ThreadNames(str(tmp_path / "absent")).name() == 0
