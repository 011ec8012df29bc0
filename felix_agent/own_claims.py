"""A block this agent's own IPAM has just claimed for this node (a pod's ADD served by its CNI
service), taken in at the commit's return: into the syncer's snapshot, announced by the BGP
speaker, and the dataplane kicked for its blackhole route, without waiting for etcd's watch to
bring the agent's own write back.

Owns listening for this node's claims (``ipam.claim_listeners``) and handing each over; must not
write the datastore, decide what is announced (``bgp.config.exports`` on the syncer's snapshot
does) nor touch the kernel (the dataplane loop does).

Why: the watch's copy of the commit reaches this agent at the same moment as every other agent
of the cluster wakes for the same event, on the same busy cores, and the route only starts
spreading once the origin has it. The syncer stays the source of truth: the values go in as
``put_own`` values at the commit's revision (all or none), so the watch's copy is a no-op and
anything newer for the keys wins as usual; a claim whose commit failed is never reported
(``ipam.batch`` reports after a successful commit only), so nothing uncommitted is announced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bgp import trace
from felix_agent.bgp_runner import BGPRunner
from felix_agent.calc.snapshot import BLOCK
from felix_agent.loop import DataplaneLoop
from felix_agent.syncer import Syncer, decode
from ipam import claim_listeners
from ipam.claim_listeners import Claimed

log = logging.getLogger(__name__)


class OwnClaims:
    """``start()`` listens for ``node``'s claims in this process until ``stop()``; ``syncer``,
    ``bgp`` and ``loop`` give the agent's (None before they exist, or without BGP)."""

    def __init__(self, node: str, syncer: Callable[[], Syncer | None], bgp: Callable[[], BGPRunner | None],
                 loop: Callable[[], DataplaneLoop | None]) -> None:
        self.node = node
        self._syncer = syncer
        self._bgp = bgp
        self._loop = loop
        self._unlisten: Callable[[], None] | None = None
        self.taken = 0  # claims handed over ahead of the watch (a figure for the tests and metrics)

    def start(self) -> None:
        if self._unlisten is None:
            self._unlisten = claim_listeners.listen(self.node, self.on_claim)

    def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    def on_claim(self, claimed: Claimed) -> None:
        """One committed claim of this node's, on the claiming thread (a CNI call's)."""
        syncer = self._syncer()
        if syncer is None:
            return  # before the syncer exists its listing brings the claim
        try:
            updates = [decode(key, value, claimed.revision) for key, value in claimed.writes]
        except ValueError as e:  # our own bytes: a bug, but the watch still has its chance
            log.error("this node's claim at revision %d does not decode: %s", claimed.revision, e)
            return
        blocks = [str(u.value.cidr) for u in updates if u.kind == BLOCK and u.value is not None]
        if trace.on():
            trace.mark("commit_sent", blocks, claimed.sent)
            trace.mark("commit", blocks, claimed.returned)
        taken = False
        try:
            bgp = self._bgp()
            if bgp is not None:
                taken = bgp.announce_own(updates, lambda then: syncer.put_own_then(updates, claimed.revision, then),
                                         claimed.returned)
            else:
                taken = syncer.put_own_then(updates, claimed.revision)
        finally:
            loop = self._loop()
            if taken and loop is not None:
                loop.kick()  # the blackhole route for the block (the watch's copy will not kick)
        if taken:
            self.taken += 1
            trace.mark("own", blocks)  # taken in at the commit (else the watch had brought it first)

