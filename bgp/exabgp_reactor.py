"""ExaBGP as the speaker runs it: ``python -m bgp.exabgp_reactor server CONFIG`` is ``exabgp server
CONFIG`` with one repair to its reactor's poller. Must not change what ExaBGP says or does on the
wire; it only decides when its loop wakes up.

The repair: ExaBGP 5.0.15 registers a peer's socket in its ``poll()`` object when the peer waits
for data, and never unregisters it when that connection is closed (a collision, a neighbour a
configuration reload changed, an outgoing attempt to a passive peer). From then on every
``poll()`` returns at once with POLLNVAL for the dead descriptor; the reactor takes that for a
spinning loop and sleeps its idle period (``exabgp.reactor.speed`` / 100 s) on every turn. Every
UPDATE such an ExaBGP sends or receives then waits for that sleep: measured in the BGP benchmark's
lab, two of ten ExaBGPs in that state after start-up, their routes 60-80 ms behind the others'
(speed 10) or ~10 ms (speed 1). Here a descriptor reported closed is unregistered, and the rest of
what ``poll()`` reported is returned as usual; ExaBGP registers a new connection's socket itself.
"""

from __future__ import annotations

import contextlib
import select
import sys
from pathlib import Path
from typing import Any


class ClosedDescriptorsDropped:
    """A ``select.poll()`` object that unregisters what it reports as closed (POLLNVAL) instead of
    reporting it on every call; unregistering a descriptor it already dropped is not an error."""

    def __init__(self, poller: Any = None) -> None:
        self._poll = poller if poller is not None else select.poll()

    def register(self, fd: int, mask: int = select.POLLIN | select.POLLPRI | select.POLLOUT) -> None:
        self._poll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._poll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError):
            self._poll.unregister(fd)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        events: list[tuple[int, int]] = self._poll.poll(timeout)
        closed = [fd for fd, event in events if event & select.POLLNVAL]
        if not closed:
            return events
        for fd in closed:
            self.unregister(fd)
        live = [(fd, event) for fd, event in events if not event & select.POLLNVAL]
        # Only dead descriptors woke us: wait again, as the loop asked, for the living ones.
        return live if live else list(self._poll.poll(timeout))


def patch_reactor() -> None:
    """Give every ExaBGP reactor made from now on the repaired poller. An ExaBGP whose reactor is
    shaped otherwise (another 5.x release) runs as it is: the repair is for speed, never needed."""
    try:
        from exabgp.reactor.loop import Reactor
    except ImportError:
        return

    made = Reactor.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        poller = getattr(self, "_poller", None)
        if poller is not None and hasattr(poller, "poll"):
            self._poller = ClosedDescriptorsDropped(poller)

    Reactor.__init__ = __init__


def main() -> int:
    patch_reactor()
    from exabgp.application.main import main as exabgp_main

    # ExaBGP runs `sys.executable sys.argv[0]` for its CLI pipe helper: the plain `exabgp` script
    # beside the interpreter (the helper has no reactor to repair).
    script = Path(sys.executable).parent / "exabgp"
    sys.argv[0] = str(script) if script.exists() else "exabgp"
    return int(exabgp_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
