"""The route manager: owns the main-table routes with protocol 80, IPv4 and IPv6.

Kinds (``Route.kind``) and the kernel routes they become (``route_desired``, which keeps the wanted
kernel routes from one state to the next, change by change):

- local:     ``<addr> dev tor… scope link`` (IPv6: scope universe, as the kernel reports it)
- blackhole: ``blackhole <block>``
- vxlan:     ``<block> via <vtep ip> dev vxlan.tortie onlink``; IPv6 blocks go via the peer VTEP's
  link-local address (see ``vxlan.vtep_link_local``) on the same device, no onlink needed
- ipip:      ``<block> via <node underlay ip> dev tunl0 onlink``
- direct:    ``<block> via <node underlay ip>`` (same L2 segment, no encapsulation)

``apply(resync=True)`` (and the first apply, and the one after a failure) reads back every
main-table route, keeps only protocol 80, diffs it against the desired set and writes the
difference. Between resyncs an apply is proportional to the change (at 5,000 endpoints the read
costs 200-900 ms, which the next pod would wait behind): it diffs only the destinations whose
desired route changed, against what the last read and the writes since left in its view, looking
up by name only the devices it has not seen; whatever it cannot settle from the view (a route
already there that it did not write, a link re-created under the same name) sends that apply
down the full path. Out-of-band changes are repaired by the next resync.
In both, a route already right (for instance the /32 the CNI plugin added
when it wired a container) is left as it is; a wrong one of ours is replaced in place; a missing
one is added with ``add`` (never ``replace``) so that a foreign route holding the same prefix is
reported as a conflict, not overwritten; stale ones are deleted by protocol, so that nothing
Tortie did not create is ever touched.

The race with the CNI plugin: a protocol-80 route ``<addr> dev torX`` (no gateway) that is not
desired is kept while ``torX`` exists, because the plugin adds it before the agent hears of the
new endpoint. It is deleted only when the endpoint is known to be gone: the manager desired it
before (it saw that route on that very link, identified by ifindex) and no longer does. A link
re-created under the same name (a retried ADD) has a new ifindex and keeps its route. When the
link itself goes, the kernel removes its routes.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from cni_plugins.naming import ROUTE_PROTOCOL
from felix_agent.calc.model import DesiredState
from felix_agent.dataplane.errors import ApplyError
from felix_agent.dataplane.route_desired import DesiredRoutes
from felix_agent.dataplane.route_read import BackgroundRead
from kernel.netlink import KernelError
from kernel.rtnl import KernelRoute, Link, write_each

log = logging.getLogger(__name__)

HOST_IF_PREFIX = "tor"  # cni_plugins.naming.HOST_IF_PREFIX (not imported: that module is the CNI fast path's)

LocalKey = tuple[str, str]  # (dst, device) of a local route


class _NeedsRead(Exception):
    """The incremental apply met a state its view cannot settle: the full apply reads the kernel."""


class RouteDriver(Protocol):
    def link_indexes(self) -> dict[str, int]: ...
    def link(self, name: str) -> Link | None: ...
    def routes(self, protocol: int | None = None, indexes: Mapping[str, int] | None = None) -> list[KernelRoute]: ...
    def add_route(self, route: KernelRoute) -> None: ...
    def replace_route(self, route: KernelRoute) -> None: ...
    def delete_route(self, route: KernelRoute) -> None: ...


@dataclass(frozen=True)
class RouteOp:
    action: Literal["add", "replace", "delete"]
    route: KernelRoute


def satisfies(have: KernelRoute, want: KernelRoute) -> bool:
    """Whether ``have`` (read back) is the route ``want`` asks for; a device left to the kernel matches any."""
    return (
        have.type == want.type
        and have.gateway == want.gateway
        and have.onlink == want.onlink
        and have.scope == want.scope
        and have.metric == want.metric
        and (want.device is None or want.type == "blackhole" or have.device == want.device)
    )


def plan(
    desired: Mapping[str, KernelRoute],
    actual: Iterable[KernelRoute],
    keep: Callable[[KernelRoute], bool] = lambda r: False,
    protocol: int = ROUTE_PROTOCOL,
) -> list[RouteOp]:
    """The writes that turn ``actual`` (every main-table route) into ``desired`` (by dst).

    Only routes of ``protocol`` are ours: others are neither deleted nor replaced. ``keep`` spares
    stale routes of ours that must stay for now (see the module docstring)."""
    ours: dict[str, list[KernelRoute]] = {}
    for r in actual:
        if r.proto == protocol:
            ours.setdefault(r.dst, []).append(r)
    ops: list[RouteOp] = []
    for dst in sorted(set(ours) - set(desired)):
        ops += [RouteOp("delete", r) for r in ours[dst] if not keep(r)]
    for dst, want in sorted(desired.items()):
        have = ours.get(dst, [])
        if any(satisfies(r, want) for r in have):
            ops += [RouteOp("delete", r) for r in have if not satisfies(r, want)]
            continue
        # A route of ours at the kernel's key (dst, default metric) is overwritten in place;
        # otherwise ``add``, which fails rather than overwrite someone else's route.
        in_place = any(r.metric is None for r in have)
        ops.append(RouteOp("replace" if in_place else "add", want.replace(proto=protocol)))
        ops += [RouteOp("delete", r) for r in have if r.metric is not None]
    return ops


class RouteManager:
    def __init__(
        self, driver: RouteDriver, *, protocol: int = ROUTE_PROTOCOL, host_if_prefix: str = HOST_IF_PREFIX,
        reader: Callable[[], Any] | None = None, wake: Callable[[], None] | None = None,
    ) -> None:
        """With ``reader`` (opens a driver of its own for another thread) and ``wake`` (the loop's
        kick), a resync reads the kernel on a thread and a later apply adopts it (``route_read``)."""
        self._driver = driver
        self._reader, self._wake = reader, wake
        self._read: BackgroundRead | None = None
        self._protocol = protocol
        self._prefix = host_if_prefix
        self._node = ""
        self._wanted = DesiredRoutes()
        self._desired = self._wanted.by_dst  # the kernel routes wanted, by destination (kept up to date in place)
        self._programmed: dict[LocalKey, int] = {}  # desired local routes seen in the kernel -> ifindex
        self._retired: dict[LocalKey, int] = {}  # ... and no longer desired: the endpoint is gone
        self._conflicts: set[str] = set()
        # The incremental path's view (None: read the kernel on the next apply): our routes by dst as
        # last read plus our writes since, the links' indexes as last read plus lookups since, and the
        # desired route each dst was last settled for.
        self._kernel: dict[str, list[KernelRoute]] | None = None
        self._links: dict[str, int] = {}
        self._applied: dict[str, KernelRoute] = {}
        # Every destination whose desired route may not be the one last settled (a superset): the
        # incremental apply looks at these, not at all 5,000.
        self._moved: set[str] = set()

    def on_update(self, state: DesiredState) -> None:
        """Record the routes ``state`` asks for; no kernel I/O. Proportional to the change
        (``route_desired``): a new pod must not cost a pass over the 5,000 routes of the others."""
        self._node = state.node
        for dst, old, new in self._wanted.update(state.routes, state.vxlan_peers, state.node):
            self._settle_local(old, new)
            self._moved.add(dst)

    def _settle_local(self, old: KernelRoute | None, new: KernelRoute | None) -> None:
        """A destination's desired route went from ``old`` to ``new``: a local route no longer desired
        is retired (its endpoint is gone, see the module docstring), one desired again is not."""
        old_key = next(iter(self._local_keys([old])), None) if old is not None else None
        new_key = next(iter(self._local_keys([new])), None) if new is not None else None
        if old_key is not None and old_key != new_key and old_key in self._programmed:
            self._retired[old_key] = self._programmed.pop(old_key)
        if new_key is not None:
            self._retired.pop(new_key, None)

    def apply(self, *, resync: bool = False) -> int:
        """Reconcile the kernel's protocol-80 routes with the last update; the number of writes.
        ``resync`` (or no view yet) reads every route back first; otherwise only the destinations
        whose desired route changed are written (see the module docstring).

        Raises ``ApplyError`` (after making every other write) when some routes could not be written."""
        read = None
        if self._read is not None and self._read.finished.is_set():
            read, self._read = self._read.adopt(), None
        elif resync and self._reader is not None and self._wake is not None and self._kernel is not None:
            if self._read is None:  # one read at a time: its end wakes the loop for the apply that adopts it
                self._read = BackgroundRead(self._reader, self._protocol, self._wake)
            resync = False  # this apply goes on from the view; the read's adoption repairs
        if not resync and read is None and self._kernel is not None:
            try:
                return self._apply_changes(self._kernel)
            except _NeedsRead:
                log.debug("%s: the route view cannot settle a change: reading the kernel", self._node)
        self._kernel = None  # a failure below leaves the next apply to read again
        if read is None:
            self._read = None  # reading now: a read still running would be older than this one
        return self._apply_all(read)

    @property
    def wants_apply(self) -> bool:
        """A background read has ended and waits for an apply to adopt it (see ``loop.Gated``)."""
        return self._read is not None and self._read.finished.is_set()

    def _apply_all(self, read: tuple[dict[str, int], list[KernelRoute]] | None = None) -> int:
        if read is not None:
            links, actual = read
            for want in self._desired.values():  # a device made since the read (a new pod's veth)
                if want.device is not None and want.device not in links:
                    link = self._driver.link(want.device)
                    if link is not None:
                        links[want.device] = link.index
        else:
            links = self._driver.link_indexes()
            actual = self._driver.routes(protocol=self._protocol, indexes=links)  # only ours: see plan()
        # A route through a device that does not exist yet (a veth being wired, vxlan.tortie before
        # the VXLAN manager's first apply, tunl0 without the ipip module) waits for the next apply.
        desired = {dst: r for dst, r in self._desired.items() if r.device is None or r.device in links}
        writes = 0
        failures: list[KernelError] = []
        deleted: set[LocalKey] = set()
        ops = plan(desired, actual, self._keep, self._protocol)
        for op, e in zip(ops, self._write(ops, links), strict=True):
            if e is not None:
                if op.action == "add" and e.code == errno.EEXIST:
                    self._conflict(op.route)
                elif e.code in (errno.ENODEV, errno.ENETDOWN) and op.action != "delete":
                    # The device went away since it was listed (a DEL racing this apply), or is not up
                    # yet: one workload's interface must not hold the node's other routes (and its
                    # readiness) hostage; the next apply adds the route once the device is there.
                    log.debug("%s: %s skipped: its device is gone", self._node, op.route)
                else:
                    failures.append(e)
                continue
            if op.action == "delete":
                deleted.add((op.route.dst, op.route.device or ""))
            writes += 1
            log.debug("%s: %s %s", self._node, op.action, op.route)
        self._conflicts &= set(desired)
        self._remember_locals(links, actual, deleted)
        if failures:
            raise ApplyError(f"route manager on {self._node}", failures)
        self._links = dict(links)
        self._kernel = self._view_after(actual, ops, deleted)
        self._applied = dict(desired)
        self._moved = {dst for dst, r in self._desired.items() if desired.get(dst) is not r}
        return writes

    def _view_after(self, actual: Iterable[KernelRoute], ops: Sequence[RouteOp],
                    deleted: set[LocalKey]) -> dict[str, list[KernelRoute]]:
        """Our routes by dst after a full apply: what was read, minus what was deleted, plus what was
        written (a route not written stays unknown: the next change at its dst reads again)."""
        view: dict[str, list[KernelRoute]] = {}
        for r in actual:
            if r.proto == self._protocol:
                view.setdefault(r.dst, []).append(r)
        for op in ops:
            if op.action == "delete" and (op.route.dst, op.route.device or "") in deleted:
                view[op.route.dst] = [r for r in view.get(op.route.dst, []) if r != op.route]
            elif op.action != "delete":
                self._note_written(view, op)
        return view

    def _note_written(self, view: dict[str, list[KernelRoute]], op: RouteOp) -> None:
        ifindex = self._links.get(op.route.device or "", op.route.ifindex)
        written = op.route.replace(proto=self._protocol, ifindex=ifindex)
        kept = [r for r in view.get(op.route.dst, []) if op.action == "add" or r.metric is not None]
        view[op.route.dst] = [*kept, written]

    def _existing(self, want: KernelRoute) -> KernelRoute | None:
        """The kernel's entry at ``want``'s dst when it is ours and already ``want`` (the route the
        CNI plugin adds before the agent hears of the pod); None when unknown."""
        lookup = getattr(self._driver, "route_at", None)
        if lookup is None:
            return None
        network = ipaddress.ip_network(want.dst)
        try:
            have: KernelRoute = lookup(str(network.network_address))
        except KernelError:
            return None
        if have.dst != want.dst or have.proto != self._protocol:
            return None
        if want.device is not None and have.ifindex == self._links.get(want.device):
            have = have.replace(device=want.device)
        return have if satisfies(have, want) else None

    def _apply_changes(self, view: dict[str, list[KernelRoute]]) -> int:
        """The incremental apply: only the dsts whose desired route is not the one last settled."""
        changed = self._moved = {dst for dst in self._moved if self._applied.get(dst) is not self._desired.get(dst)}
        if not changed:
            return 0
        desired: dict[str, KernelRoute] = {}
        for dst in changed:
            want = self._desired.get(dst)
            if want is None:
                continue
            if want.device is not None and want.device not in self._links:
                link = self._driver.link(want.device)  # a new veth: one lookup, not a listing of 5,000
                if link is None:
                    continue  # waits for its device, as in a full apply
                self._links[want.device] = link.index
                if self._read is not None:
                    self._read.note_link(want.device, link.index)
            desired[dst] = want
        actual = [r for dst in changed for r in view.get(dst, ())]
        ops = []
        for op in plan(desired, actual, self._keep, self._protocol):
            if op.action == "delete" and op.route.device and op.route.device.startswith(self._prefix):
                link = self._driver.link(op.route.device)
                if link is not None and link.index != op.route.ifindex:
                    raise _NeedsRead  # the link was made again: its route may be a new pod's
                if link is None:  # the link went, and the kernel took its routes with it
                    self._links.pop(op.route.device, None)
                    if self._read is not None:
                        self._read.note_link(op.route.device, None)
                    view[op.route.dst] = [r for r in view.get(op.route.dst, []) if r != op.route]
                    self._retired.pop((op.route.dst, op.route.device), None)
                    continue
            ops.append(op)
        writes = 0
        failures: list[KernelError] = []
        unsettled: set[str] = set()
        for op, e in zip(ops, self._write(ops, self._links), strict=True):
            if e is None:
                writes += 1
                log.debug("%s: %s %s", self._node, op.action, op.route)
                if op.action == "delete":
                    view[op.route.dst] = [r for r in view.get(op.route.dst, []) if r != op.route]
                    self._retired.pop((op.route.dst, op.route.device or ""), None)
                else:
                    self._note_written(view, op)
            elif op.action == "delete" and e.code == errno.ESRCH:
                view[op.route.dst] = [r for r in view.get(op.route.dst, []) if r != op.route]
            elif op.action == "add" and e.code == errno.EEXIST:
                # A route we did not write: the CNI plugin's own (a new pod), else read everything.
                found = self._existing(op.route)
                if found is None:
                    raise _NeedsRead
                view[op.route.dst] = [*view.get(op.route.dst, []), found]
            elif e.code in (errno.ENODEV, errno.ENETDOWN) and op.action != "delete":
                unsettled.add(op.route.dst)  # its device went since the lookup: tried again next apply
                self._links.pop(op.route.device or "", None)
            else:
                failures.append(e)
                unsettled.add(op.route.dst)
        if self._read is not None:  # a read runs: what it saw of these may be from before our writes
            for dst in changed:
                self._read.note_routes(dst, view.get(dst, ()))
        for dst in changed - unsettled:
            if dst in desired:
                self._applied[dst] = desired[dst]
                want = desired[dst]
                if (dst, want.device) in self._local_keys([want]) and want.device in self._links:
                    self._programmed[(dst, want.device or "")] = self._links[want.device or ""]
            elif dst not in self._desired:
                self._applied.pop(dst, None)
        self._moved = {dst for dst in changed if self._applied.get(dst) is not self._desired.get(dst)}
        if failures:
            self._kernel = None
            raise ApplyError(f"route manager on {self._node}", failures)
        return writes

    def _write(self, ops: Sequence[RouteOp], links: Mapping[str, int]) -> list[KernelError | None]:
        """The writes in bulk when the driver can (``BulkRTNL.write_routes``: many requests per
        system call, raw netlink), each route with its device's index as just listed; else one by one."""
        bulk = getattr(self._driver, "write_routes", None)
        if bulk is not None:
            return list(bulk([(op.action, op.route.replace(ifindex=links.get(op.route.device or "", op.route.ifindex)))
                              for op in ops]))
        return write_each(self._driver, [(op.action, op.route) for op in ops])

    def _conflict(self, route: KernelRoute) -> None:
        if route.dst not in self._conflicts:
            log.warning("%s: %s is held by a route Tortie did not make; left alone", self._node, route.dst)
        self._conflicts.add(route.dst)

    def _keep(self, route: KernelRoute) -> bool:
        if route.type != "unicast" or route.gateway is not None or not route.device:
            return False
        if not route.device.startswith(self._prefix):
            return False
        return self._retired.get((route.dst, route.device)) != route.ifindex

    def _remember_locals(self, links: Mapping[str, int], actual: Iterable[KernelRoute], deleted: set[LocalKey]) -> None:
        """Note which link incarnation each desired local route belongs to, and forget retired
        routes that are gone (deleted now, or with their link)."""
        for dst, device in self._local_keys(self._desired.values()):
            if device in links:
                self._programmed[(dst, device)] = links[device]
        present = {(r.dst, r.device) for r in actual if r.proto == self._protocol and r.device} - deleted
        self._retired = {k: i for k, i in self._retired.items() if k in present}

    def _local_keys(self, routes: Iterable[KernelRoute]) -> set[LocalKey]:
        return {
            (r.dst, r.device)
            for r in routes
            if r.type == "unicast" and r.gateway is None and r.device and r.device.startswith(self._prefix)
        }
