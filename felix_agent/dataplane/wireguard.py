"""The WireGuard manager: owns the device ``wg.tortie`` (its key, port, mark, MTU, peers), the
routes of the WireGuard routing table (and its throw routes), and the rule that sends unmarked traffic to that table.

Calico's design, which this follows: the overlay's own routes (VXLAN, IPIP, direct; the route
manager's, in the main table) stay as they are. A rule ``not fwmark 0x100000/0x100000 lookup
<table>`` at ``wireguardRoutingRulePriority`` (99, before the main table's 32766) sends every
packet that is not WireGuard's own UDP to the WireGuard table, which holds only ``<cidr> dev
wg.tortie scope link`` for each peer's allowed IPs. So pod traffic to a node that has a key
enters the tunnel, whatever the pool's encapsulation; a destination the table does not hold falls
through to the main table (the overlay, unencrypted: a node without a key); and the device marks its
encrypted UDP with the same bit, so the rule skips it and it leaves through the main table's
underlay route instead of looping. When WireGuard is off the device is deleted (its routes go with
it) and the rule removed: the main table's overlay routes carry the traffic again.

``on_update`` records the state; ``apply`` reads the device, the table and the rules back and
writes only the difference. A kernel without the module is reported as ``status ==
"unsupported"`` and never fails an apply. Holds the private key (given at construction, from
``felix_agent.wireguard_key``) and never puts it in the state, a log line or an error.
"""

from __future__ import annotations

import base64
import errno
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

from cni_plugins.naming import ROUTE_PROTOCOL
from felix_agent.calc.model import DesiredState, WireGuard
from felix_agent.dataplane.mtu import underlay_mtu
from felix_agent.wireguard_key import public_key
from kernel.netlink import KernelError
from kernel.netns import netns
from kernel.rtnl import KernelRoute
from kernel.rtnl_bulk import BulkRTNL
from kernel.wireguard import Device, MarkRule, MarkRules, Peer, create_link
from kernel.wireguard import WireGuard as WireGuardFamily

log = logging.getLogger(__name__)

WIREGUARD_OVERHEAD = 60  # outer IPv4 20 + UDP 8 + WireGuard 32 (Calico's figure for an IPv4 underlay)
Status = Literal["disabled", "ok", "unsupported"]


class WireGuardManager:
    """``private_key``: 32 raw bytes; ``netns_path``: the namespace to work in (None: the thread's)."""

    def __init__(self, rtnl: BulkRTNL, private_key: bytes, *, underlay_ip: str | None = None,
                 netns_path: str | None = None, clock: Callable[[], float] = time.time,
                 on_key_ready: Callable[[], None] | None = None) -> None:
        self._rtnl = rtnl
        self._on_key_ready = on_key_ready
        self._private = private_key
        self._public = public_key(private_key)
        self._underlay_ip = underlay_ip
        self._netns_path = netns_path
        self._clock = clock
        self._wanted = WireGuard()
        self._family: WireGuardFamily | None = None
        self._rules: MarkRules | None = None
        self._stale_interface: str | None = None
        self.status: Status = "disabled"
        self.device: Device | None = None  # as last read back (handshakes, counters: observability)

    @property
    def holds_key(self) -> bool:
        """Whether the device, as last read back, has this node's private key: only then may the
        public key be published. Peers that learn a key before the device holds it handshake, are
        refused, and retry only after WireGuard's rekey timeout (5 s): a rotation's whole gap."""
        device = self.device
        return device is not None and device.private_key_set and device.public_key == self._public

    def on_update(self, state: DesiredState) -> None:
        if state.wireguard.interface != self._wanted.interface and self._wanted.enabled:
            self._stale_interface = self._wanted.interface  # renamed: the old device goes
        self._wanted = state.wireguard

    # -- apply ------------------------------------------------------------------------------------
    def apply(self, *, resync: bool = False) -> int:
        wanted = self._wanted
        writes = 0
        if self._stale_interface is not None:
            writes += int(self._rtnl.delete_link(self._stale_interface))
            self._stale_interface = None
        if not wanted.enabled:
            return writes + self._disable(wanted)
        link = self._rtnl.link(wanted.interface)
        if link is None:
            try:
                with self._here():
                    create_link(wanted.interface)
            except KernelError as e:
                if e.code in (errno.EOPNOTSUPP, errno.ENOENT):
                    if self.status != "unsupported":
                        log.error("this kernel has no WireGuard module: pod traffic stays unencrypted (%s)", e)
                    self.status = "unsupported"
                    return writes
                raise
            writes += 1
            link = self._rtnl.link(wanted.interface)
            if link is None:
                raise KernelError(f"creating {wanted.interface}", errno.ENODEV)
        elif link.kind != "wireguard":
            raise KernelError(f"{wanted.interface} exists and is a {link.kind} device, not WireGuard", errno.EEXIST)
        mtu = wanted.mtu or underlay_mtu(self._rtnl, self._underlay_ip) - WIREGUARD_OVERHEAD
        if link.mtu != mtu or not link.up:
            self._rtnl.set_link(link.index, mtu=mtu, up=True)
            writes += 1
        writes += self._configure(wanted)
        writes += self._routes(wanted, link.index)
        writes += self._rule(wanted)
        self.status = "ok"
        return writes

    def _configure(self, wanted: WireGuard) -> int:
        family = self._wg()
        device = family.device(wanted.interface)
        desired = {base64.b64decode(p.public_key): Peer(base64.b64decode(p.public_key), p.endpoint, p.allowed_ips,
                                                         wanted.keepalive) for p in wanted.peers}
        have = {p.public_key: p for p in device.peers}
        changed = tuple(p for key, p in desired.items() if not _same_peer(have.get(key), p))
        stale = tuple(key for key in have if key not in desired)
        key_ok = device.private_key_set and device.public_key == self._public
        port_ok = device.listen_port == wanted.listen_port
        mark_ok = device.fwmark == wanted.fwmark
        if changed or stale or not (key_ok and port_ok and mark_ok):
            family.set_device(wanted.interface, private_key=None if key_ok else self._private,
                              listen_port=None if port_ok else wanted.listen_port,
                              fwmark=None if mark_ok else wanted.fwmark, peers=changed, remove=stale)
            log.info("WireGuard %s: %d peers set, %d removed%s", wanted.interface, len(changed), len(stale),
                     "" if key_ok else ", key set")
            device = family.device(wanted.interface)
        had_key = self.holds_key
        self.device = device
        if self.holds_key and not had_key and self._on_key_ready is not None:
            self._on_key_ready()  # the key may be published now (the owner's next pass)
        return len(changed) + len(stale) + int(not (key_ok and port_ok and mark_ok))

    def _routes(self, wanted: WireGuard, index: int) -> int:
        want = {cidr: KernelRoute(cidr, device=wanted.interface, ifindex=index, scope="link", proto=ROUTE_PROTOCOL,
                                  table=wanted.table) for p in wanted.peers for cidr in p.allowed_ips}
        # A borrowed address whose holder is not a peer: out of this table, back to the main one.
        want |= {cidr: KernelRoute(cidr, type="throw", proto=ROUTE_PROTOCOL, table=wanted.table)
                 for cidr in wanted.throw}
        have = {r.dst: r for r in self._rtnl.routes(ROUTE_PROTOCOL, {}, table=wanted.table, family=socket.AF_INET)}
        ops: list[tuple[str, KernelRoute]] = [("delete", r) for dst, r in have.items() if dst not in want]
        ops += [("replace", r) for dst, r in want.items() if dst not in have or not _same_route(have[dst], r, index)]
        failed = [e for e in self._rtnl.write_routes(ops) if e is not None]
        if failed:
            raise failed[0]
        return len(ops)

    def _rule(self, wanted: WireGuard) -> int:
        rules = self._mark_rules()
        want = MarkRule(wanted.rule_priority, wanted.table, wanted.fwmark, wanted.fwmark, invert=True)
        ours = [r for r in rules.list() if r.mark == wanted.fwmark and r.invert]
        writes = 0
        for rule in ours:
            if rule != want:
                rules.delete(rule)
                writes += 1
        if want not in ours:
            rules.add(want)
            writes += 1
        return writes

    def _disable(self, wanted: WireGuard) -> int:
        writes = 0
        if self._rtnl.link(wanted.interface) is not None:
            writes += int(self._rtnl.delete_link(wanted.interface))  # its routes and peers go with it
            log.info("WireGuard off: %s deleted", wanted.interface)
        if self.status != "unsupported" or writes:
            rules = self._mark_rules()
            for rule in rules.list():
                if rule.invert and rule.mark == wanted.fwmark:
                    rules.delete(rule)
                    writes += 1
        self.status = "disabled"
        self.device = None
        return writes

    # -- sockets in the manager's namespace -----------------------------------------------------
    @contextmanager
    def _here(self) -> Iterator[None]:
        if self._netns_path is None:
            yield
        else:
            with netns(self._netns_path):
                yield

    def _wg(self) -> WireGuardFamily:
        if self._family is None:
            with self._here():
                self._family = WireGuardFamily()
        return self._family

    def _mark_rules(self) -> MarkRules:
        if self._rules is None:
            with self._here():
                self._rules = MarkRules()
        return self._rules

    def close(self) -> None:
        for sock in (self._family, self._rules):
            if sock is not None:
                sock.close()
        self._family = self._rules = None


def _same_route(have: KernelRoute, want: KernelRoute, index: int) -> bool:
    if want.type == "throw":
        return have.type == "throw"
    return have.type == want.type and have.ifindex == index and have.scope == "link"


def _same_peer(have: Peer | None, want: Peer) -> bool:
    return (have is not None and have.endpoint == want.endpoint and have.keepalive == want.keepalive
            and sorted(have.allowed_ips) == sorted(want.allowed_ips))


def render_metrics(device: Device | None) -> str:
    """Prometheus lines for the device as last read back: per peer, the last handshake (Unix seconds)
    and the bytes received and sent (Calico's ``wireguard_*`` names)."""
    if device is None:
        return ""
    lines = ["# HELP wireguard_latest_handshake_seconds Last handshake with the peer (Unix time, 0 = never).",
             "# TYPE wireguard_latest_handshake_seconds gauge",
             "# HELP wireguard_bytes_rcvd Bytes received from the peer.", "# TYPE wireguard_bytes_rcvd counter",
             "# HELP wireguard_bytes_sent Bytes sent to the peer.", "# TYPE wireguard_bytes_sent counter"]
    for peer in device.peers:
        key = base64.b64encode(peer.public_key).decode()
        labels = f'public_key="{key}",peer_endpoint="{peer.endpoint or ""}"'
        lines += [f"wireguard_latest_handshake_seconds{{{labels}}} {peer.last_handshake:.0f}",
                  f"wireguard_bytes_rcvd{{{labels}}} {peer.rx_bytes}",
                  f"wireguard_bytes_sent{{{labels}}} {peer.tx_bytes}"]
    return "\n".join(lines) + "\n"
