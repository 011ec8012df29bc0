"""Telling this process about the blocks its IPAM has just claimed for a node, at the commit's
return: the felix-agent that served the claim (a pod's ADD through its CNI service) hands the
block and its affinity to its syncer and its BGP speaker at once, instead of waiting for its own
write to come back through etcd's watch (``felix_agent.own_claims``).

Owns the registry of listeners, by node, and calling them; must not decide or write anything
(``ipam.batch`` commits, then reports), and a listener must not make the claim fail: what it
raises is logged and swallowed (the claim is in etcd: the watch still brings it).

Only committed writes are reported: a transaction that failed, lost its compare-and-swap or
whose outcome is unknown (an error) reports nothing, so nothing can be announced that etcd does
not hold. What is reported is exactly what was written: each key with its bytes, the commit's
revision, and the monotonic times the transaction was sent and returned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """One committed transaction that created blocks for ``node``: the blocks' and affinities'
    ``(key, stored bytes)``, its ``revision``, and when it was ``sent`` and ``returned``
    (``time.monotonic()``)."""

    node: str
    writes: Sequence[tuple[str, bytes]]
    revision: int
    sent: float
    returned: float


Listener = Callable[[Claimed], None]

_listeners: dict[str, list[Listener]] = {}
_guard = threading.Lock()


def listen(node: str, listener: Listener) -> Callable[[], None]:
    """Call ``listener`` for every claim of ``node`` committed in this process, on the claiming
    thread; returns what unregisters it."""
    with _guard:
        _listeners.setdefault(node, []).append(listener)

    def stop() -> None:
        with _guard:
            held = _listeners.get(node, [])
            if listener in held:
                held.remove(listener)
            if not held:
                _listeners.pop(node, None)

    return stop


def wanted(node: str) -> bool:
    """Whether anyone listens for ``node`` (the batch skips building the report otherwise)."""
    return node in _listeners


def committed(claimed: Claimed) -> None:
    """Report a committed claim to the node's listeners."""
    with _guard:
        listeners = list(_listeners.get(claimed.node, ()))
    for listener in listeners:
        try:
            listener(claimed)
        except Exception:  # the claim is committed: a listener's bug must not fail the ADD
            log.exception("a listener of %s's block claims failed", claimed.node)
