"""What felix-agent adds to a CNI call it serves: the hooks the operations call, handed to them in
the call's ``Datastores`` view as the warm connections are.

Owns the hook types and what an ADD leaves for the relay (its undo); must not do any of the work
(the agent supplies the functions, ``tortie_ops`` and ``ipam_ops`` decide when to call them). In a
plugin process there is no agent call (``Datastores.call`` is None) and the operations skip them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datastore.model import Resource

# (endpoint key "<namespace>/<name>", the WorkloadEndpoint as written, the caller's deadline in
# Unix seconds or None) -> None; raises CNIError when the pod's policy was not programmed in time.
AfterAdd = Callable[[str, "Resource", "float | None"], None]
# (endpoint key, the WorkloadEndpoint about to be written, the caller's deadline) -> what takes it
# back when the write fails, or None when the agent did not take it.
BeforeWrite = Callable[[str, "Resource", "float | None"], "Callable[[], None] | None"]


@dataclass
class AgentCall:
    """One relayed call's hooks; ``undo`` is filled by an ADD that made a new attachment."""

    deadline: float | None = None  # the caller's answer deadline (Unix seconds); None: no deadline
    # After a successful ADD of ``tortie``, before the answer: the agent hands the endpoint to its
    # calculation and waits until its policy is in the kernel ("no pod without its policy").
    after_add: AfterAdd | None = None
    # Right before ADD writes the endpoint: the agent starts programming its policy while the
    # write is in flight (``felix_agent.pod_policy``); the withdrawal runs when the write fails,
    # before the veth goes. The object handed over is the one written: never changed afterwards
    # except for the identity the write stamps on it (uid, creationTimestamp, resourceVersion).
    before_write: BeforeWrite | None = None
    # Entered around the work on one attachment, by its host interface: the orphan sweep leaves
    # an attachment alone while a call for it runs (``felix_agent.cni_service.InFlight``).
    serving: Callable[[str], AbstractContextManager[None]] | None = None
    # Told each valid call's command (metrics).
    on_request: Callable[[str], None] | None = None
    # What takes a new attachment back when the caller can no longer be told (never a repeated
    # ADD's: its addresses belong to the live attachment the runtime is repeating).
    undo: Callable[[], None] | None = None
