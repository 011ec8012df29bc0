"""felix-agent's side of BGP: keeps the ExaBGP speaker configured from the datastore, announces
this node's blocks, installs what peers announce (route protocol 81), and publishes the sessions
for ``netctl node status``. The BGP work itself is in the ``bgp`` package.

Without a datastore client (``client=None``: the IPIP-over-BGP test in the VM, which has no etcd)
it does the same but publishes no status."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bgp import trace
from bgp.config import exports, speaker_config
from bgp.export_inputs import ExportInputs
from bgp.learned import LearnedRoutes
from bgp.model import Export, SessionStatus, SpeakerConfig, ipv4_prefix, ipv4_within, network
from bgp.route_groups import RouteGroup
from bgp.speaker import Speaker
from bgp.status import write_status
from datastore.errors import DatastoreError
from datastore.resources import IPPoolSpec
from felix_agent.calc.snapshot import Snapshot, Update
from kernel.netlink import KernelError
from kernel.rtnl_bulk import BulkRTNL

if TYPE_CHECKING:  # the etcd client (grpc) is imported by whoever makes one, not here
    from datastore.etcd import EtcdClient, Lease

log = logging.getLogger(__name__)

# The kinds whose changes can change this node's sessions or exports.
INPUT_KINDS = frozenset({"IPPool", "Node", "Block", "Affinity", "BGPConfiguration", "BGPPeer", "BGPFilter"})
# The kinds that change only the exports: a batch of nothing else leaves the sessions as they were.
EXPORT_ONLY_KINDS = frozenset({"Block", "Affinity"})
STATUS_TTL = 15  # seconds: `node status` says "not running" this long after the agent dies
STATUS_EVERY = 5.0


class BGPRunner:
    def __init__(self, node: str, state_dir: Path, client: EtcdClient | None, trace_dir: Path | None = None,
                 nice: int = 0) -> None:
        self.node = node
        if trace_dir is not None:
            trace.enable(trace_dir, node)
        self.client = client
        # (cidr, ipipMode) of the pools that encapsulate (Always, CrossSubnet)
        self._pools: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = ()
        self._revision = -1  # of the newest datastore view applied
        self._config: SpeakerConfig | None = None
        self._export_inputs = ExportInputs(node)  # which block/affinity batches can move our exports
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._status_dirty = threading.Event()
        # Changes are applied in the speaker's thread (on_batch): the installer thread only catches
        # what no read of UPDATEs follows (a peer removed, ExaBGP gone), 50 ms later.
        self.learned = LearnedRoutes(BulkRTNL.open(), encap_for=self.encap_for, change_delay=0.05)
        self.speaker = Speaker(state_dir, on_route=self.learned.on_route, on_session=self._on_session,
                               on_end_of_rib=self.learned.on_end_of_rib, on_batch=self._install,
                               on_groups=self._on_groups, nice=nice)
        self._lease: Lease | None = None
        self._reader: int | None = None  # the thread that runs on_batch: ExaBGP's reader
        self._thread = threading.Thread(target=self._publish, name="bgp-status", daemon=True)

    def start(self, grace: int = 120) -> None:
        # Last run's learned routes stay (stale) while the sessions come back: graceful restart.
        self.learned.adopt(grace=grace)
        self.learned.start()
        if self.client is not None:
            self._thread.start()

    def stop(self) -> None:
        """Leave the kernel routes and let peers keep ours (graceful restart)."""
        self._stop.set()
        self.learned.stop()
        self.speaker.stop(graceful=True)
        if self._lease is not None:
            self._lease.revoke()

    def encap_for(self, prefix: str) -> str | None:
        if not self._pools:  # no pool encapsulates: asked for every prefix of a large table
            return None
        parsed = ipv4_prefix(prefix)
        if parsed is not None:  # without ipaddress: asked for every prefix of a large table
            for cidr, mode in self._pools:
                if ipv4_within(parsed, cidr):
                    return {"Always": "ipip", "CrossSubnet": "ipip-cross-subnet"}.get(mode)
            return None
        net = network(prefix)
        for cidr, mode in self._pools:
            if cidr.version == net.version and net.subnet_of(cidr):  # type: ignore[arg-type]
                return {"Always": "ipip", "CrossSubnet": "ipip-cross-subnet"}.get(mode)
        return None

    def on_datastore(self, updates: Iterable[Update], snapshot: Snapshot) -> None:
        """A batch of datastore changes, from the syncer's thread with its live snapshot: announce
        now, rather than after the dataplane loop has applied whatever it was applying (a policy
        transaction can take tens of milliseconds). The loop's ``update`` later sees nothing new."""
        updates = list(updates)
        kinds = frozenset(u.kind for u in updates)
        if not INPUT_KINDS.isdisjoint(kinds):
            self.update(snapshot, seen_at=time.monotonic(), sessions=not kinds <= EXPORT_ONLY_KINDS,
                        changes=[(u.kind, u.key, u.value) for u in updates])

    def update(self, snapshot: Snapshot, seen_at: float | None = None, sessions: bool = True,
               changes: list[tuple[str, str, object]] | None = None) -> None:
        """A new datastore view: reconfigure the speaker when its sessions change, announce the
        difference in this node's exports. A view no newer than one already applied is ignored:
        the dataplane loop's copy after the syncer's thread applied the same revision (nothing to
        do), or an older one (which would undo a newer announcement). ``sessions=False``: the
        caller knows that only blocks or affinities changed since the last view (a claim, on
        every agent): the sessions and pools are not derived again. ``changes``: the syncer's batch
        (kind, key, value); the exports are not worked out again for one that cannot move them
        (``bgp.export_inputs``: no block or affinity of this node's in it)."""
        with self._lock:
            # Before the revision test: every batch of the syncer's goes through, in order.
            moved = self._export_inputs.moves(changes) if changes is not None else True
            if snapshot.revision <= self._revision:
                return
            if not sessions and self._config is not None:
                if moved:
                    self._announce(snapshot, seen_at)
                self._revision = snapshot.revision
                return
            pools: list[IPPoolSpec] = [p.spec for p in snapshot.ippools.values()]
            # Only the pools that encapsulate: a route in any other needs no answer but None.
            self._pools = tuple((spec.network(), spec.ipip_mode) for spec in pools
                                if spec.ipip_mode in ("Always", "CrossSubnet"))
            config = speaker_config(snapshot, self.node)
            if config is None:
                self._revision = snapshot.revision
                return
            if config != self._config:
                self.speaker.configure(config)
                self._config = config
            self._announce(snapshot, seen_at)
            self._revision = snapshot.revision

    def announce_own(self, changes: Sequence[Update], hand_over: Callable[[Callable[[Snapshot], None]], bool],
                     seen_at: float) -> bool:
        """A block and affinity this agent's IPAM just committed (``felix_agent.own_claims``),
        announced now: ``hand_over(then)`` puts them in the syncer's snapshot and runs ``then``
        on it under the syncer's lock, where the exports are worked out. All under this runner's
        lock, so that a syncer batch applied after the hand-over (the block deleted, say) reaches
        the speaker after this announcement, never before it. Returns what ``hand_over`` did:
        False when the syncer did not take them (then its watch delivers them as usual), and
        without handing over when the runner is busy (a pod's ADD never waits for BGP's work:
        most likely it is the watch's copy of this very claim being announced)."""
        node, found = self.node, list[frozenset[Export]]()
        if not self._lock.acquire(blocking=False):
            return False
        try:
            configured = self._config is not None  # else nothing is announced yet: the sessions' view does it
            taken = hand_over(lambda snapshot: found.append(exports(snapshot, node)) if configured else None)
            if found:
                self._export_inputs.moves([(u.kind, u.key, u.value) for u in changes])  # every change, in order
                self.speaker.announce(found[0], seen_at)
            return taken
        finally:
            self._lock.release()

    def _announce(self, snapshot: Snapshot, seen_at: float | None) -> None:
        if not self._export_inputs.seeded:
            self._export_inputs.reset(snapshot.blocks)
        self.speaker.announce(exports(snapshot, self.node), seen_at)

    def _on_groups(self, groups: list[RouteGroup]) -> None:
        # On the reader's thread on_batch applies them next: no wake-up of the installer thread
        # per UPDATE (it found nothing due, and took the GIL beside the apply). Elsewhere (a peer
        # removed by a new configuration) the installer thread applies them, change_delay later.
        self.learned.on_groups(groups, wake=threading.get_ident() != self._reader)

    def _install(self) -> None:
        """What the last read of ExaBGP's output changed, into the kernel now (the speaker's thread)."""
        self._reader = threading.get_ident()
        try:
            self.learned.apply()
        except KernelError as e:  # the installer thread's resync retries
            log.warning("installing learned routes failed: %s", e)

    def _on_session(self, status: SessionStatus) -> None:
        self.learned.on_session(status, self.speaker.restart_time(status.peer))
        self._status_dirty.set()

    def _publish(self) -> None:
        assert self.client is not None
        while not self._stop.is_set():
            try:
                if self._lease is None or self._lease.expired.is_set():
                    self._lease = self.client.grant_lease(STATUS_TTL)
                    self._lease.keep_alive()
                write_status(self.client, self.node, self.speaker.sessions(), self._lease)
            except DatastoreError as e:
                log.warning("could not publish BGP status: %s", e)
            self._status_dirty.wait(STATUS_EVERY)
            self._status_dirty.clear()

    def metrics(self) -> str:
        m = self.speaker.metrics()
        lines = ["# HELP felix_bgp_sessions BGP sessions by state.", "# TYPE felix_bgp_sessions gauge"]
        lines += [f'felix_bgp_sessions{{state="{s}"}} {n}' for s, n in sorted(m.sessions.items())]
        for name, value, text in (
            ("felix_bgp_routes_announced", m.routes_announced, "Prefixes this node announces."),
            ("felix_bgp_routes_learned", m.routes_learned, "Prefixes learned from peers."),
            ("felix_bgp_last_update_timestamp_seconds", m.last_update or 0, "Time of the last UPDATE received."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
