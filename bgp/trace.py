"""Per-step timestamps of a route's way through this node's BGP (``felix-agent --bgp-trace DIR``):
where convergence time goes, measured. Off by default, and then nothing but one test per call.

Each line of ``DIR/<node>.trace`` is ``<monotonic seconds> <step> <prefix>``; the monotonic clock
is the same in every network namespace of a machine, so the lines of all nodes (and the
benchmark's own clocks: the commit, the kernel's route events) line up. Steps, in order:

- ``commit_sent``, ``commit``: the origin's agent's own IPAM sent and got back the transaction that
  claimed the block (``felix_agent.own_claims``; a pod's ADD on this node), and ``own`` when the
  agent took the claim in from that commit (not from its watch, which had brought it first);
- ``datastore``: the origin's agent has the datastore change that makes the prefix its own (the
  syncer's thread, before the speaker is told);
- ``sent``: its announce command is in ExaBGP's input pipe;
- ``read``: on a receiving node, the read of ExaBGP's output that carried the UPDATE returned;
- ``parsed``: the speaker has the route (after the JSON, the loop check and the import filters);
- ``write``: its kernel write is about to be sent (``bgp.learned``);
- ``kernel``: its kernel write was acknowledged (``bgp.learned``).

Must not change what it observes: it only appends lines, buffered, flushed per call site batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

_out: TextIO | None = None


def enable(directory: Path, node: str) -> None:
    global _out
    directory.mkdir(parents=True, exist_ok=True)
    _out = (directory / f"{node}.trace").open("a", buffering=1 << 16)


def on() -> bool:
    return _out is not None


def mark(step: str, prefixes: Iterable[str], at: float | None = None) -> None:
    """One line per prefix, at ``at`` (default: now)."""
    if _out is None:
        return
    when = f"{time.monotonic() if at is None else at:.6f}"
    _out.write("".join(f"{when} {step} {p}\n" for p in prefixes))
    _out.flush()
