"""The orphan sweep: releasing the attachments whose runtime never said DEL.

When a container's network namespace goes without a DEL (containerd 1.6's ``ctr`` removing a killed
detached container, a runtime that crashed), the kernel removes the veth with it, but the
addresses, the handle and the WorkloadEndpoint stay. The agent notices that a local endpoint's host
interface is gone, from link notifications and, in case one was missed, from a full read of the
links on every resync. It publishes since when (``keys.orphan_key``, which ``netctl ipam check``
reports from any host) and, once the interface has been missing for the grace period, releases the
attachment as a DEL would: addresses and handle, then the endpoint at the revision read (a re-ADD
that rewrote it keeps it). Routes and policy chains follow through the dataplane when the endpoint
leaves the syncer.

An ADD writes its endpoint only after its veth exists, so "endpoint present, interface missing" is
never an ADD half-way; a relayed call for the attachment (``CNIService.in_flight``) cancels the
clock, and right before releasing, the endpoint is read again and the interface looked up again.

Owns the decision (:func:`decide`, pure, and :class:`OrphanTracker`, its state) and carrying it out
(:class:`OrphanSweeper`). Must not release an attachment whose interface exists or whose call is
being served, and must not touch the kernel beyond reading links.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cni_plugins.naming import HOST_IF_PREFIX
from datastore import keys
from datastore.errors import Conflict, DatastoreError, NotFound
from datastore.etcd import EtcdClient
from datastore.model import Resource
from datastore.resources import WorkloadEndpoint
from datastore.store import ResourceStore
from felix_agent.cni_service import InFlight
from ipam.allocator import IPAM
from ipam.check import MissingInterface
from ipam.errors import IPAMError

if TYPE_CHECKING:
    from kernel.rtnl_bulk import BulkRTNL

log = logging.getLogger(__name__)

DEFAULT_GRACE = 300.0  # seconds (CONTRACT: felix-agent --orphan-grace)
# An interface missing for less than this is not published: a DEL removes the veth a moment before
# the endpoint, and that must not cost two etcd writes or show in `ipam check`.
PUBLISH_DELAY = 1.0
RETRY_DELAY = 1.0  # after a release that failed (datastore unreachable): try again this much later
LINK_BATCH = 0.5  # seconds: how often at most the link notifications are read (OrphanSweeper._run)


@dataclass(frozen=True)
class LocalAttachment:
    """One of this node's endpoints, as the sweep needs it."""

    namespace: str
    name: str
    interface: str  # the host end of its veth
    network: str
    container_id: str
    ifname: str
    revision: str  # the endpoint's resource version as seen

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def local_attachments(endpoints: Iterable[Resource], node: str) -> dict[str, LocalAttachment]:
    """This node's endpoints by ``namespace/name``."""
    out = {}
    for endpoint in endpoints:
        spec = endpoint.spec
        if spec.node != node or not spec.interface_name:
            continue
        attachment = LocalAttachment(endpoint.namespace or "", endpoint.name, spec.interface_name, spec.network,
                                     spec.container_id, spec.endpoint, endpoint.metadata.resource_version)
        out[attachment.key] = attachment
    return out


@dataclass
class Decision:
    started: list[LocalAttachment] = field(default_factory=list)  # newly missing: their clock starts now
    publish: list[LocalAttachment] = field(default_factory=list)  # missing long enough to be published
    due: list[LocalAttachment] = field(default_factory=list)  # missing for the grace period: release
    cleared: list[str] = field(default_factory=list)  # keys no longer missing (back, gone, in flight)
    next_at: float | None = None  # when the next of these steps falls due (None: nothing pending)


def decide(attachments: Mapping[str, LocalAttachment], links: AbstractSet[str], missing_since: Mapping[str, float],
           published: AbstractSet[str], busy: AbstractSet[str], now: float, grace: float,
           publish_delay: float = PUBLISH_DELAY) -> Decision:
    """What to do now, from this node's endpoints, the host interfaces present, since when each
    missing one has been seen missing, which of those are published, and the interfaces whose call
    the CNI service is serving. An endpoint is due when its interface has been missing for
    ``grace`` seconds and no call for it is in flight."""
    d = Decision()
    for key in sorted(set(missing_since) | set(published)):
        attachment = attachments.get(key)
        if attachment is None or attachment.interface in links or attachment.interface in busy:
            d.cleared.append(key)
    wake: list[float] = []
    for key, attachment in sorted(attachments.items()):
        if attachment.interface in links or attachment.interface in busy:
            continue
        since = missing_since.get(key)
        if since is None:
            d.started.append(attachment)
            since = now
        if now - since >= grace:
            d.due.append(attachment)
            continue
        wake.append(since + grace)
        if key not in published:
            if now - since >= publish_delay:
                d.publish.append(attachment)
            else:
                wake.append(since + publish_delay)
    d.next_at = min(wake) if wake else None
    return d


class OrphanTracker:
    """The sweep's memory: the host interfaces present (from a full read, then notifications), and
    since when each endpoint's interface has been missing; the decisions are :func:`decide`'s."""

    def __init__(self, grace: float, publish_delay: float = PUBLISH_DELAY) -> None:
        self.grace = grace
        self.publish_delay = min(publish_delay, grace)
        self.links: set[str] = set()
        self.missing_since: dict[str, float] = {}
        self.published: set[str] = set()
        # endpoints released, by key → the revision deleted: the syncer may still show them a moment
        self.released: dict[str, str] = {}

    def relist(self, names: Iterable[str]) -> None:
        self.links = set(names)

    def link_event(self, name: str, present: bool) -> bool:
        """Record a notification; whether it can change a decision: a link that went away, or one
        that appeared while an endpoint is watched as missing (the many notifications of a pod's
        ADD, for links already known or never missed, change nothing)."""
        if present:
            if name in self.links:
                return False
            self.links.add(name)
            return bool(self.missing_since or self.published)
        if name not in self.links:
            return False
        self.links.discard(name)
        return True

    def restore(self, markers: Iterable[MissingInterface]) -> None:
        """Take over what a previous run of the agent published."""
        for marker in markers:
            key = f"{marker.namespace}/{marker.name}"
            self.missing_since[key] = marker.since
            self.published.add(key)

    def decide(self, attachments: Mapping[str, LocalAttachment], busy: AbstractSet[str], now: float) -> Decision:
        self.released = {k: r for k, r in self.released.items() if k in attachments}
        live = {k: a for k, a in attachments.items() if self.released.get(k) != a.revision}
        return decide(live, self.links, self.missing_since, self.published, busy, now, self.grace,
                      self.publish_delay)

    def forget(self, key: str) -> None:
        self.missing_since.pop(key, None)
        self.published.discard(key)


class HostLinks(Protocol):
    """The kernel's side: which host interfaces exist (``wiring``'s rtnetlink client in the agent)."""

    def names(self) -> set[str]: ...

    def exists(self, name: str) -> bool: ...


class KernelHostLinks:
    """:class:`HostLinks` of the namespace the agent runs in, through the dataplane's netlink
    driver (its name-only dump: a resync at 10,000 veths must not parse every attribute). Used
    by the sweep's thread only."""

    def __init__(self) -> None:
        self._netlink: BulkRTNL | None = None

    def _driver(self) -> BulkRTNL:
        if self._netlink is None:
            from kernel.rtnl_bulk import BulkRTNL

            self._netlink = BulkRTNL.open()
        return self._netlink

    def names(self) -> set[str]:
        return {name for name in self._driver().link_indexes() if name.startswith(HOST_IF_PREFIX)}

    def exists(self, name: str) -> bool:
        return self._driver().link(name) is not None

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None


class OrphanSweeper:
    """The sweep's thread: waits for link notifications, its next deadline or the resync, then
    decides and acts. ``endpoints()`` gives every endpoint the syncer holds, or None before the
    first "in sync" (nothing is decided before it)."""

    def __init__(self, node: str, client: EtcdClient, *, grace: float, resync_interval: float,
                 endpoints: Callable[[], Iterable[Resource] | None], in_flight: InFlight,
                 links: HostLinks | None = None, clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.client = client
        self.store = ResourceStore(client)
        self.ipam = IPAM(client)
        self.resync_interval = resync_interval
        self.endpoints = endpoints
        self.in_flight = in_flight
        self._own_links = links is None
        self.links: HostLinks = links or KernelHostLinks()
        self.clock = clock
        self.tracker = OrphanTracker(grace)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._recheck = False  # the last sweep skipped a missing interface because its call ran
        self.released = 0  # attachments released since start

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="orphans", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.kick()
        if self._thread is not None:
            self._thread.join(timeout=10)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def pending(self) -> bool:
        """Whether an endpoint is being watched for release: only then does an endpoint change
        (deleted by a late DEL, say) need a look before the next notification or resync."""
        return bool(self.tracker.missing_since or self.tracker.published)

    def kick(self) -> None:
        """Look again soon; from any thread, never blocks."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        from kernel.rtnl_bulk import EventsLost, LinkEvents

        os.set_blocking(self._wake_w, False)
        with LinkEvents() as events:  # subscribed before the first read: nothing falls in between
            self._restore()
            relist = True
            next_resync = 0.0
            next_at: float | None = None
            look = True  # whether anything since the last sweep can change its decision
            # Link notifications are read at most every LINK_BATCH seconds, all that queued at once:
            # each pod's ADD and DEL make several, and waking this thread for each one cost the agent
            # as much CPU as the sweep's work (a wake-up is a GIL hand-over on busy cores). The
            # socket's buffer holds thousands; an overflow re-reads the links (EventsLost).
            events_from = 0.0  # time.monotonic() from which the notifications are waited on again
            while not self._stop.is_set():
                now = self.clock()
                try:
                    if relist or now >= next_resync:
                        self.tracker.relist(self.links.names())
                        next_resync = now + self.resync_interval
                        relist = False
                        look = True
                    if look or (next_at is not None and now >= next_at):
                        look = False
                        next_at = self.sweep(now)
                except (DatastoreError, IPAMError, OSError) as e:
                    log.warning("orphan sweep failed; trying again in %gs: %s", RETRY_DELAY, e)
                    next_at = now + RETRY_DELAY
                except Exception:  # a bug in one sweep must not end the sweeping
                    log.exception("orphan sweep failed; trying again in %gs", RETRY_DELAY)
                    next_at = now + RETRY_DELAY
                deadline = min(next_resync, next_at) if next_at is not None else next_resync
                timeout = max(0.0, deadline - self.clock())
                pause = events_from - time.monotonic()
                if pause > 0:
                    ready, _, _ = select.select([self._wake_r], [], [], min(timeout, pause))
                else:
                    ready, _, _ = select.select([events.fileno(), self._wake_r], [], [], timeout)
                if self._wake_r in ready:
                    look = True
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                if events.fileno() in ready:
                    events_from = time.monotonic() + LINK_BATCH
                    look |= self._recheck  # an interface missing while its call ran: look once it ended
                    try:
                        for event in events.receive():
                            look |= self.tracker.link_event(event.name, event.present)
                    except EventsLost:
                        relist = True
        if isinstance(self.links, KernelHostLinks) and self._own_links:
            self.links.close()

    def _restore(self) -> None:
        try:
            kvs, _ = self.client.list(keys.orphan_prefix(self.node))
        except DatastoreError as e:
            log.warning("could not read this node's orphan records: %s", e)
            return
        markers = []
        for kv in kvs:
            try:
                markers.append(MissingInterface.from_json(kv.value))
            except (ValueError, KeyError, TypeError):
                self.client.delete(kv.key)  # ours, and unreadable: it means nothing to anyone
        self.tracker.restore(markers)

    def sweep(self, now: float) -> float | None:
        """One decision and its steps; when the next step falls due (None: nothing pending)."""
        endpoints = self.endpoints()
        if endpoints is None:
            return now + RETRY_DELAY  # not in sync yet
        attachments = local_attachments(endpoints, self.node)
        tracker = self.tracker
        busy = self.in_flight.busy()
        decision = tracker.decide(attachments, busy, now)
        self._recheck = bool(busy) and any(a.interface in busy and a.interface not in tracker.links
                                           for a in attachments.values())
        for key in decision.cleared:
            if key in tracker.published:
                namespace, name = key.split("/", 1)
                self.client.delete(keys.orphan_key(self.node, namespace, name))
            tracker.forget(key)
        for attachment in decision.started:
            if self.links.exists(attachment.interface):  # a notification not read yet: it is there
                tracker.link_event(attachment.interface, True)
                continue
            tracker.missing_since[attachment.key] = now
            log.info("endpoint %s: host interface %s is gone; releasing it in %gs unless it comes back",
                     attachment.key, attachment.interface, tracker.grace)
        for attachment in decision.publish:
            since = tracker.missing_since[attachment.key]
            marker = MissingInterface(self.node, attachment.namespace, attachment.name, attachment.interface,
                                      attachment.network, attachment.container_id, attachment.ifname, since)
            self.client.put(marker.key, marker.to_json())
            tracker.published.add(attachment.key)
        retry = False
        for attachment in decision.due:
            if attachment.key not in tracker.missing_since:
                continue  # found present above
            try:
                retry |= not self.release(attachment, now)
            except (DatastoreError, IPAMError) as e:
                log.warning("could not release the orphaned endpoint %s yet: %s", attachment.key, e)
                retry = True
        if retry:
            return now + RETRY_DELAY if decision.next_at is None else min(decision.next_at, now + RETRY_DELAY)
        return decision.next_at

    def release(self, attachment: LocalAttachment, now: float) -> bool:
        """Release one attachment as DEL would, after checking again; False to try again later."""
        key = attachment.key
        with self.in_flight.hold(attachment.interface) as held:
            if not held:
                return False  # a call for it is being served: the next sweep decides again
            current = self.store.get(WorkloadEndpoint, attachment.name, attachment.namespace)
            if current is None or current.spec.container_id != attachment.container_id:
                self._cancel(key, "its endpoint is gone or belongs to another container now")
                return True
            if self.links.exists(attachment.interface):
                self.tracker.link_event(attachment.interface, True)
                self._cancel(key, f"{attachment.interface} is back")
                return True
            handles, addresses = self.ipam.release_attachment(attachment.network, attachment.container_id,
                                                              attachment.ifname)
            try:
                self.store.delete(WorkloadEndpoint, attachment.name, attachment.namespace,
                                  current.metadata.resource_version)
                self.tracker.released[key] = current.metadata.resource_version
            except (Conflict, NotFound):
                if self.store.get(WorkloadEndpoint, attachment.name, attachment.namespace) is not None:
                    log.warning("endpoint %s was rewritten while its orphaned attachment was released; kept", key)
        missing_for = now - self.tracker.missing_since.get(key, now)
        if key in self.tracker.published:
            self.client.delete(keys.orphan_key(self.node, attachment.namespace, attachment.name))
        self.tracker.forget(key)
        self.released += 1
        log.info("released orphaned endpoint %s (container %s, interface %s missing for %.1fs): handles %s, "
                 "addresses %s", key, attachment.container_id, attachment.interface, missing_for,
                 handles, ", ".join(map(str, addresses)) or "none")
        return True

    def _cancel(self, key: str, why: str) -> None:
        log.info("endpoint %s is not released: %s", key, why)
        if key in self.tracker.published:
            namespace, name = key.split("/", 1)
            self.client.delete(keys.orphan_key(self.node, namespace, name))
        self.tracker.forget(key)
