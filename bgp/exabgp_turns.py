"""Fixed costs in ExaBGP's reactor per command and per UPDATE sent, cut in our wrapper
(``bgp.exabgp_reactor`` applies them before ExaBGP starts). Each gives what ExaBGP's own code
gives (the same callbacks run in the same order, the same bytes on the wire); it must not change
what ExaBGP says or when a session starts or ends.

- ``synchronous_callbacks``: ExaBGP 5.0.15 runs its queue of API callbacks (one per command: an
  ``announce``'s parse, its injection into each peer's RIB, the ack) through ``asyncio.run`` on
  every reactor turn that has one, even when every callback is a plain generator, as ours always
  are. Each ``asyncio.run`` makes and closes an event loop (a socket pair, an epoll descriptor, a
  task, signal handler checks): ~0.2 ms of the origin's CPU per command, before the first UPDATE
  is built. Generators now run without it, in the same order and with the same limits; a queue
  that holds a coroutine goes through ExaBGP's own ``run``.
- ``shared_update_bytes``: the origin's ExaBGP builds the UPDATE for one claimed block once per
  peer (9 times in a 10-node mesh), and each build packs the same attributes and NLRIs for peers
  whose session negotiated the same. The bytes of an UPDATE are kept for the reactor turn in which
  they were built, keyed by what they are made of (each NLRI's and attribute's packed form) and by
  every negotiated value the packing reads; a peer with anything else negotiated gets its own build.
"""

from __future__ import annotations

import inspect
from typing import Any


def synchronous_callbacks() -> None:
    """``ASYNC.run`` without an event loop while every queued callback is a generator (or a plain
    iterator): the body of ExaBGP's ``_run_async``, called directly. Anything else (a coroutine)
    takes ExaBGP's own path."""
    try:
        from exabgp.logger import log
        from exabgp.reactor.asynchronous import ASYNC
    except ImportError:
        return
    made = ASYNC.run

    def run(self: Any) -> bool:
        if not self._async:
            return False
        for _, callback in self._async:
            if inspect.iscoroutine(callback) or inspect.iscoroutinefunction(callback):
                return bool(made(self))
        # self._async, not a local: a callback may clear() the queue, which replaces it
        uid, callback = self._async.popleft()
        for _ in range(self.LIMIT):
            try:
                next(callback)
            except StopIteration:
                if not self._async:
                    return False
                uid, callback = self._async.popleft()
            except Exception as exc:  # as ExaBGP: a failed callback is logged and answered, not raised
                log.error(lambda uid=uid: f"async | {uid} | problem with function", "reactor")
                for line in str(exc).split("\n"):
                    log.error(lambda line=line, uid=uid: f"async | {uid} | {line}", "reactor")
                self._notify_error(uid)
                if not self._async:
                    return False
                uid, callback = self._async.popleft()
        self._async.appendleft((uid, callback))
        return True

    ASYNC.run = run
