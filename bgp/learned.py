"""Learned routes: what BGP peers announce, installed in the kernel's main table with protocol 81.

Owns the main-table routes with protocol 81 and nothing else. ``on_groups`` (an UPDATE's
prefixes a group at a time, ``bgp.route_groups``; ``on_route`` one by one), ``on_session`` and
``on_end_of_rib`` (the speaker's callbacks) only record paths; ``apply()`` turns the best path of
each prefix into a kernel route and writes the difference, like the dataplane managers (what the
kernel holds, as it sees it: ``bgp.learned_kernel``):

- next hop on a connected subnet: ``<prefix> via <nh> dev <that link>``;
- the prefix's pool says IPIP (``encap_for(prefix) == "ipip"``, or ``"ipip-cross-subnet"`` and
  the next hop is not on a connected subnet): ``<prefix> via <nh> dev tunl0 onlink``;
- otherwise ``<prefix> via <nh>`` and the kernel resolves it (or refuses: counted in ``failed``).

It never touches another protocol's route: a prefix some other protocol already routes is left
alone (``conflicts``), new routes are added with ``add`` (a foreign one appearing meanwhile makes
it fail, never be overwritten), and deletions name protocol 81. A prefix inside a connected subnet
(the underlay itself) is never installed: a peer exporting it would cut the node off.

Graceful restart, kept simple:
- a peer's session goes down: if the peer advertised graceful restart (``restart_time`` > 0) its
  paths stay, stale, until it re-announces them, sends End-of-RIB (stale ones left are dropped) or
  ``restart_time`` passes; otherwise they go at once (the hold timer already bounded how long a
  dead peer could keep them);
- this node restarted: ``adopt(grace)`` takes the protocol-81 routes found in the kernel as stale
  paths, so they keep forwarding until re-learned, and are removed if not within ``grace`` seconds
  (our own ``graceful-restart`` time, which our peers also wait for us).
A stale path loses to any fresh one for the same prefix, so a second reflector takes over at once.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from bgp import trace
from bgp.exabgp import as_path_length
from bgp.learned_kernel import BGP_PROTOCOL, Hop, KernelView, read_kernel, same
from bgp.model import SessionStatus, canonical, network
from bgp.route_groups import RouteGroup, groups_of, record
from kernel.netlink import KernelError
from kernel.rtnl import IPIP_FALLBACK_DEVICE as IPIP_DEVICE
from kernel.rtnl import KernelRoute, write_each

log = logging.getLogger(__name__)

ADOPTED = "kernel"  # the pseudo peer of routes found in the kernel at start
ESTABLISHED = "Established"
RESYNC_INTERVAL = 60.0

EncapFor = Callable[[str], str | None]  # prefix -> "ipip" | "ipip-cross-subnet" | None


class RouteDriver(Protocol):
    """What ``kernel.rtnl.RTNL`` offers (a fake in unit tests)."""

    def routes(self) -> list[KernelRoute]: ...
    def add_route(self, route: KernelRoute) -> None: ...
    def replace_route(self, route: KernelRoute) -> None: ...
    def delete_route(self, route: KernelRoute) -> None: ...


@dataclass(frozen=True)
class Path:
    """One peer's path for a prefix; shared by the prefixes of one UPDATE, so never mutated."""

    next_hop: str
    local_pref: int = 100
    as_path_len: int = 0
    stale_until: float | None = None  # monotonic deadline while stale

    def rank(self, peer: str) -> tuple[bool, int, int, str]:
        return (self.stale_until is not None, -self.local_pref, self.as_path_len, peer)


@dataclass(frozen=True)
class Stats:
    installed: int  # protocol-81 routes in the kernel
    stale: int  # paths kept for a peer (or our previous run) restarting gracefully
    conflicts: int  # prefixes not installed: another protocol routes them, or inside the underlay
    failed: int  # kernel writes refused so far (e.g. an unresolvable next hop; retried on resync)
    writes: int  # kernel writes so far


class LearnedRoutes:
    def __init__(self, driver: RouteDriver, *, encap_for: EncapFor | None = None,
                 clock: Callable[[], float] = time.monotonic, resync_interval: float = RESYNC_INTERVAL,
                 change_delay: float = 0.0) -> None:
        self.driver = driver
        self.encap_for = encap_for or (lambda prefix: None)
        self.clock = clock
        self.resync_interval = resync_interval
        # How long the installer thread leaves a change to whoever recorded it (felix-agent applies
        # in the speaker's thread right after each read): the two racing for one apply cost a
        # wake-up and a GIL hand-over per read, and on a busy machine the installer thread could
        # hold the apply while descheduled (tens of ms). Changes nobody applies go in this late.
        self.change_delay = change_delay
        self._dirty_since: float | None = 0.0  # when the first change not yet applied came
        self._failed_writes = 0
        self._writes = 0
        self._paths: dict[str, dict[str, Path]] = {}  # prefix -> peer -> path
        self._kernel: KernelView | None = None  # None: read back at the next apply
        self._failed: set[str] = set()
        self._lock = threading.Lock()
        self._applying = threading.Lock()  # one apply at a time: each writes from what the last recorded
        self._wake = threading.Condition(self._lock)
        self._dirty = True
        self._changed: set[str] = set()  # prefixes whose paths changed since the last apply
        self._earliest: float | None = None  # no stale path expires before this
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_resync = 0.0

    # -- what the speaker reports (never touches the kernel) ------------------------------------

    def on_route(self, peer: str, prefix: str, next_hop: str | None, withdrawn: bool,
                 attrs: Mapping[str, Any]) -> None:
        self.on_routes([(peer, prefix, next_hop, withdrawn, attrs)])

    def on_routes(self, changes: Iterable[tuple[str, str, str | None, bool, Mapping[str, Any]]], *,
                  wake: bool = True) -> None:
        """``on_route`` for many."""
        self.on_groups(groups_of((peer, canonical(prefix), next_hop, withdrawn, attrs)
                                 for peer, prefix, next_hop, withdrawn, attrs in changes), wake=wake)

    def on_groups(self, groups: Iterable[RouteGroup], *, wake: bool = True) -> None:
        """What a read of UPDATEs changed, a group (one UPDATE's prefixes through one next hop)
        at a time: one lock, one path per group; prefixes canonical, as the speaker has them.
        ``wake=False``: the caller applies them at once (the installer thread would find nothing due)."""
        made: dict[tuple[str, int], Path] = {}  # (next hop, id(attrs)) -> its path

        def path_for(next_hop: str, attrs: Mapping[str, Any]) -> Path:
            path = made.get((next_hop, id(attrs)))
            if path is None:
                rank = (int(attrs.get("local-preference", 100)), as_path_length(attrs))
                path = made[(next_hop, id(attrs))] = Path(next_hop, *rank)
            return path

        with self._lock:
            touched = record(self._paths, groups, path_for)
            self._changed.update(touched)
            self._failed.difference_update(touched)  # a new path may well be installable
            self._touch(wake=wake)

    def on_session(self, status: SessionStatus, restart_time: int = 0) -> None:
        """A session changed state; ``restart_time`` is the restart time the peer advertised in
        its graceful-restart capability (``Speaker.restart_time``), 0 if it did not."""
        if status.state == ESTABLISHED:
            return
        with self._lock:
            deadline = self.clock() + restart_time
            for prefix in list(self._paths):
                path = self._paths[prefix].get(status.peer)
                if path is None:
                    continue
                if restart_time > 0:
                    if path.stale_until is None:
                        self._paths[prefix][status.peer] = replace(path, stale_until=deadline)
                        self._stale_at(deadline)
                else:
                    del self._paths[prefix][status.peer]
                    if not self._paths[prefix]:
                        del self._paths[prefix]
                self._touch(prefix)
            self._touch()

    def on_end_of_rib(self, peer: str, family: str | None = None) -> None:
        """The peer has sent everything (for ``family``, e.g. "ipv4 unicast"): its paths still
        stale were not re-announced and go."""
        version = None if family is None else (6 if family.startswith("ipv6") else 4)
        with self._lock:
            for prefix in list(self._paths):
                path = self._paths[prefix].get(peer)
                if path is None or path.stale_until is None:
                    continue
                if version is None or network(prefix).version == version:
                    del self._paths[prefix][peer]
                    if not self._paths[prefix]:
                        del self._paths[prefix]
                    self._touch(prefix)
            self._touch()

    def adopt(self, grace: float) -> int:
        """Take the protocol-81 routes left in the kernel (by our previous run) as stale paths that
        expire after ``grace`` seconds unless re-learned. Returns how many were adopted."""
        kernel = read_kernel(self.driver.routes())
        deadline = self.clock() + grace
        with self._lock:
            self._kernel = None  # the next apply reads the kernel back and reconciles everything
            for prefix, route in kernel.ours.items():
                if route.gateway and route.type == "unicast":
                    self._paths.setdefault(prefix, {})[ADOPTED] = Path(route.gateway, stale_until=deadline)
                    self._stale_at(deadline)
                    self._touch(prefix)
            self._touch()
            return sum(1 for paths in self._paths.values() if ADOPTED in paths)

    def installed(self) -> dict[str, KernelRoute]:
        """The protocol-81 routes as this manager believes the kernel holds them."""
        with self._lock:
            return dict(self._kernel.ours) if self._kernel else {}

    # -- reconciling the kernel -----------------------------------------------------------------

    def apply(self, resync: bool = False) -> None:
        """Write what changed since the last apply; with ``resync`` (and the first time) read the
        kernel back and reconcile every prefix. Any thread may call it, one at a time: felix-agent
        calls it in the speaker's thread right after each read of UPDATEs (``on_batch``), so a
        learned route reaches the kernel without a hand-over to the installer thread (which
        waited for the GIL behind the speaker's thread); the installer thread still does stale
        deadlines and resyncs."""
        with self._applying:
            self._apply(resync)

    def _apply(self, resync: bool) -> None:
        with self._lock:
            full = resync or self._kernel is None
            changed, self._changed, self._dirty, self._dirty_since = self._changed, set(), False, None
        kernel = read_kernel(self.driver.routes()) if full else None
        with self._lock:
            if kernel is not None:
                self._kernel = kernel
                self._failed.clear()
                self._last_resync = self.clock()
            assert self._kernel is not None
            current = self._kernel
            changed |= self._expire()
            prefixes = set(self._paths) | set(current.ours) if full else changed
            ops: list[tuple[str, KernelRoute]] = []
            hops: dict[str, Hop | None] = {}  # next hop -> what its routes share: found once per apply
            ours, failed, desired = current.ours, self._failed, self._desired
            for prefix in prefixes:
                route = desired(prefix, current, hops)
                have = ours.get(prefix)
                if route is None:
                    if have is not None:
                        ops.append(("delete", have))
                elif have is None:
                    if prefix not in failed:
                        ops.append(("add", route))
                elif not same(route, have):
                    ops.append(("replace", route))
        self._write(ops)  # outside the lock: the speaker's thread keeps recording

    def stats(self) -> Stats:
        with self._lock:
            kernel = self._kernel or KernelView()
            return Stats(
                installed=len(kernel.ours),
                stale=sum(1 for paths in self._paths.values() for p in paths.values() if p.stale_until is not None),
                conflicts=sum(1 for p in self._paths if p in kernel.foreign or kernel.in_underlay(p)),
                failed=self._failed_writes,
                writes=self._writes,
            )

    def _write(self, ops: list[tuple[str, KernelRoute]]) -> None:
        """Make the writes, in bulk when the driver can (``RTNL.write_routes``: many requests
        per system call, ~60x faster than one round trip each), and record what they did."""
        if not ops:
            return
        if trace.on():
            trace.mark("write", [r.dst for a, r in ops if a != "delete"])
        bulk = getattr(self.driver, "write_routes", None)
        errors: list[KernelError | None] = bulk(ops) if bulk is not None else write_each(self.driver, ops)
        with self._lock:
            done = ops  # the usual answer: every write done
            if any(errors):
                done = []
                for op, error in zip(ops, errors, strict=True):
                    if error is None:
                        done.append(op)
                    else:
                        self._refused(*op, error)
            self._writes += len(done)
            kernel = self._kernel
            if kernel is not None:  # None: adopted meanwhile, the next apply reads the kernel again
                ours = kernel.ours
                for action, route in done:
                    if action == "delete":
                        ours.pop(route.dst, None)
                    else:
                        ours[route.dst] = route
        if trace.on():
            trace.mark("kernel", [r.dst for (a, r), e in zip(ops, errors, strict=True) if a != "delete" and e is None])

    def _refused(self, action: str, route: KernelRoute, error: KernelError) -> None:
        """What a refused write means (under ``_lock``): another protocol routes the prefix (EEXIST
        on an add), or the write failed (counted; the prefix is not added again before it changes
        or a resync)."""
        if action == "add" and error.code == errno.EEXIST:
            log.warning("not installing %s: another protocol routes it", route.dst)
            if self._kernel is not None:
                self._kernel.foreign.add(route.dst)
            return
        log.warning("BGP route %s %s failed: %s", action, route.dst, error)
        self._failed_writes += 1
        self._failed.add(route.dst)

    def _desired(self, prefix: str, kernel: KernelView, hops: dict[str, Hop | None]) -> KernelRoute | None:
        paths = self._paths.get(prefix)
        if not paths or prefix in kernel.foreign or kernel.in_underlay(prefix):
            return None
        # Most prefixes have one peer's path: no ranking.
        path = next(iter(paths.values())) if len(paths) == 1 else paths[min(paths, key=lambda p: paths[p].rank(p))]
        next_hop = path.next_hop
        hop = hops[next_hop] if next_hop in hops else hops.setdefault(next_hop, kernel.hop(next_hop))
        if hop is None or hop[1] != (6 if ":" in prefix else 4):
            return None  # a next hop of the other family (RFC 5549) is not supported
        gateway, _, link = hop
        encap = self.encap_for(prefix)
        if encap == "ipip" or (encap == "ipip-cross-subnet" and link is None):
            return KernelRoute(dst=prefix, gateway=gateway, device=IPIP_DEVICE, onlink=True, proto=BGP_PROTOCOL)
        if link is not None:
            return KernelRoute(dst=prefix, gateway=gateway, device=link.device, proto=BGP_PROTOCOL,
                               ifindex=link.ifindex)
        return KernelRoute(dst=prefix, gateway=gateway, proto=BGP_PROTOCOL)

    def _expire(self) -> set[str]:
        """Drop stale paths past their deadline; the prefixes that lost one."""
        now = self.clock()
        expired: set[str] = set()
        if self._earliest is None or self._earliest > now:
            return expired
        self._earliest = None
        for prefix in list(self._paths):
            paths = self._paths[prefix]
            for peer, path in list(paths.items()):
                if path.stale_until is None:
                    continue
                if path.stale_until <= now:
                    del paths[peer]
                    expired.add(prefix)
                else:
                    self._stale_at(path.stale_until)
            if not paths:
                del self._paths[prefix]
        return expired

    def _stale_at(self, deadline: float) -> None:
        if self._earliest is None or deadline < self._earliest:
            self._earliest = deadline

    def next_deadline(self) -> float | None:
        """When the earliest stale path may expire (a lower bound: re-learned ones do not move it)."""
        with self._lock:
            return self._earliest

    # -- the installer thread -------------------------------------------------------------------

    def start(self) -> None:
        """Apply in a thread of its own: after a change (``change_delay`` later, unless it was
        applied meanwhile), at stale deadlines, and a full resync every ``resync_interval`` s."""
        self._thread = threading.Thread(target=self._run, name="bgp-learned", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._lock:
                wake_at = self._wake_at()
                if not self._stopping and wake_at > self.clock():
                    self._wake.wait(wake_at - self.clock())  # a first change or a stop notifies
                if self._stopping:
                    return
                if self._wake_at() > self.clock():
                    continue  # woken by a change that is not due yet, or applied meanwhile
                resync = self.clock() >= self._last_resync + self.resync_interval
            try:
                self.apply(resync=resync)
            except KernelError as e:
                log.warning("reading the kernel's routes failed: %s", e)
                time.sleep(1.0)

    def _wake_at(self) -> float:
        """When the installer thread has work (under ``_lock``): a resync, a stale deadline, or a
        change left unapplied for ``change_delay``."""
        wake_at = self._last_resync + self.resync_interval
        if self._earliest is not None:
            wake_at = min(wake_at, self._earliest)
        if self._dirty and self._dirty_since is not None:
            wake_at = min(wake_at, self._dirty_since + self.change_delay)
        return wake_at

    def _touch(self, prefix: str | None = None, *, wake: bool = True) -> None:
        if prefix is not None:
            self._changed.add(prefix)
            self._failed.discard(prefix)  # a new path may well be installable
        self._dirty = True
        if self._dirty_since is None:  # only the first change wakes the installer thread
            self._dirty_since = self.clock()
            if wake:
                self._wake.notify_all()



