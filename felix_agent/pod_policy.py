"""A new pod's policy, programmed while its WorkloadEndpoint is being written: the agent's side of
"no pod without its policy" for the ADDs its CNI service serves.

Owns handing the endpoint an ADD is about to write to the calculation (through the syncer, as a
provisional value), confirming it with the write's revision or withdrawing it when the write
fails, and waiting until the pod's chains are in the kernel; must not write the datastore (the
CNI operations do, and the endpoint stays their last write) nor touch the kernel (the dataplane
loop does).

Why: the endpoint's etcd write is a round trip of 2-3 ms, and programming the pod's policy 1-2 ms
more after it; the two overlap when the calculation has the endpoint before the write answers.
The provisional value is the very object the write stores, so the chains programmed for it are
the real endpoint's. It lives only in the agent's memory, never in etcd: the start-up cleanup and
the orphan sweep still see only the datastore's truth, and anything the watch brings for the key
replaces it (``felix_agent.syncer``). A failed write withdraws it and the ADD answers only after
a dataplane pass that no longer holds it has applied: no chain, map element or route is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cni_plugins.errors import TRY_AGAIN_LATER, CNIError
from datastore.model import Resource
from datastore.resources import WorkloadEndpoint
from datastore.store import ResourceStore
from felix_agent.calc.snapshot import WORKLOAD_ENDPOINT
from felix_agent.loop import DataplaneLoop
from felix_agent.syncer import Syncer

log = logging.getLogger(__name__)

# Seconds kept, of a caller's deadline, for undoing an ADD and writing the answer.
ANSWER_MARGIN = 1.0


class PodPolicy:
    """``before_write`` and ``after_add``: the hooks of ``cni_plugins.agent_call.AgentCall``.
    ``syncer`` and ``loop`` give the agent's (None before they exist); ``timeout`` is
    ``--policy-timeout``."""

    def __init__(self, syncer: Callable[[], Syncer | None], loop: Callable[[], DataplaneLoop | None],
                 timeout: float, node: str) -> None:
        self._syncer = syncer
        self._loop = loop
        self.timeout = timeout
        self.node = node
        # Endpoint objects held provisionally (by identity) → the first pass that sees them.
        self._tickets: dict[int, int] = {}

    def _budget(self, deadline: float | None) -> float:
        if deadline is None:
            return self.timeout
        return max(min(self.timeout, deadline - time.time() - ANSWER_MARGIN), 0.0)

    def before_write(self, key: str, endpoint: Resource, deadline: float | None) -> Callable[[], None] | None:
        """Hand ``endpoint``, about to be written, to the calculation; the withdrawal to call when
        the write fails, or None when it was not taken (not in sync, or the key is held already:
        then ``after_add`` does what it did before provisional values existed)."""
        syncer, loop = self._syncer(), self._loop()
        if syncer is None or loop is None:
            return None
        etcd_key = _etcd_key(endpoint)
        if not syncer.put_provisional(WORKLOAD_ENDPOINT, etcd_key, endpoint):
            return None
        self._tickets[id(endpoint)] = loop.pass_ticket()

        def withdraw() -> None:
            self._tickets.pop(id(endpoint), None)
            if not syncer.withdraw_provisional(WORKLOAD_ENDPOINT, etcd_key, endpoint):
                return  # the watch brought the key's truth meanwhile: it stays
            budget = self._budget(deadline)
            if not loop.wait_passed(loop.pass_ticket(), budget):
                log.warning("endpoint %s: its write failed and the dataplane did not drop its provisional "
                            "policy within %gs; the next pass will", key, budget)

        return withdraw

    def after_add(self, key: str, endpoint: Resource, deadline: float | None = None) -> None:
        """No pod without its policy: return only once the endpoint ``key`` ("<namespace>/<name>"),
        as written (its resourceVersion the write's revision), has its chains in the kernel; raise
        (try again later) in time to answer before the caller's ``deadline`` (Unix seconds)."""
        syncer, loop = self._syncer(), self._loop()
        assert loop is not None
        budget = self._budget(deadline)
        started = time.monotonic()
        ticket = self._tickets.pop(id(endpoint), None)
        revision = int(endpoint.metadata.resource_version or 0)
        etcd_key = _etcd_key(endpoint)
        if (syncer is not None and ticket is not None and revision
                and syncer.confirm_provisional(WORKLOAD_ENDPOINT, etcd_key, endpoint, revision)):
            # Held since before the write: the pass of the ticket computes from it (no kick: the
            # hand-over kicked). Waiting for that pass's publication, not just for the key, means
            # an earlier endpoint of the same key, still published, cannot answer for this one.
            programmed = loop.programmed.wait_since(key, ticket, budget)
        elif syncer is not None and revision and not syncer.put_own(WORKLOAD_ENDPOINT, etcd_key, endpoint, revision):
            # Not taken: the syncer's thread delivers the key (the watch's copy of the write came
            # first, or a listing brings it), and that delivery kicks the loop; another kick would
            # only cost a pass that changes nothing.
            programmed = loop.programmed.wait(key, max(budget - (time.monotonic() - started), 0.0))
        else:
            # The endpoint just written goes straight to the calculation: waiting for etcd's watch
            # to bring our own write back costs its round trip, and its decoding.
            programmed = loop.wait_programmed(key, max(budget - (time.monotonic() - started), 0.0))
        if not programmed:
            raise CNIError(TRY_AGAIN_LATER, "the pod's policy was not programmed in time",
                           f"endpoint {key}: felix-agent on {self.node} did not apply it within {budget:g}s")


def _etcd_key(endpoint: Resource) -> str:
    return ResourceStore.key(WorkloadEndpoint, endpoint.name, endpoint.namespace)
