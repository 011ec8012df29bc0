"""This node's own prefixes as the speaker announces them (``Announcements``, a part of
``bgp.speaker.Speaker``): only the difference is sent, to each peer what its export filters accept
(``bgp.outbound``); a session coming up gets all of them again, then End-of-RIB; export filters
changing on a session that stays up send the difference. A prefix that becomes (or stops being)
our own re-decides peers' paths for it (``bgp.received``).

Split out of ``bgp.speaker`` by concept; the state it reads is the speaker's, under its lock. Must
not start ExaBGP or touch the kernel.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bgp import exabgp, outbound, trace
from bgp.filters import accepts
from bgp.model import Export, Peer, SessionStatus
from bgp.received import PeerInfo, ReceivedRoutes
from bgp.reflector import Received


class Announcements(ReceivedRoutes):
    """The speaker's announce/withdraw bookkeeping (a mixin of ``Speaker``)."""

    _lock: threading.RLock
    _status: dict[str, SessionStatus]

    if TYPE_CHECKING:  # the speaker's
        def _established(self) -> list[str]: ...
        def _fire(self) -> None: ...

    def announce(self, exports: Iterable[Export], seen_at: float | None = None) -> None:
        """This node's prefixes (blocks, borrowed /32s) as they should be announced now;
        ``seen_at``: when the agent had the change (``bgp.trace``)."""
        new = {_canonical(e.prefix): e for e in exports}
        with self._lock:
            old, self._exports = self._exports, new
            commands = outbound.changes(old, new, self._config.peers if self._config else (), self._established())
            # A prefix that became (or stopped being) our own: peers' paths for it go (or come back).
            changed = old.keys() ^ new.keys()
            for address, info in self._peers.items() if changed else ():
                filters, paths = self._import_filters(address), dict[str, Received]()
                for prefix in changed & info.announced.keys():
                    commands += self._admit(address, info, prefix, filters, paths)
            if self._reflector is not None:
                commands += self._reflector.own(new)
            self._send(commands)
        if trace.on() and new.keys() - old.keys():
            trace.mark("datastore", new.keys() - old.keys(), seen_at)
            trace.mark("sent", new.keys() - old.keys())
        self._fire()

    def _refilter(self, old: dict[str, Peer], new: Iterable[Peer]) -> None:
        """Sessions that stay up while their filters change: they get the difference of what
        we export, and what they announced is filtered again (no route refresh needed)."""
        up = set(self._established())
        commands: list[str] = []
        for peer in new:
            before = old.get(peer.address)
            if peer.address not in up or before is None or before.options.filters == peer.options.filters:
                continue
            commands += outbound.refilter(self._exports, peer.address, outbound.export_filters(before),
                                          outbound.export_filters(peer))
            info = self._peers.get(peer.address)
            if info is not None:
                filters, paths = self._import_filters(peer.address), dict[str, Received]()
                for prefix in list(info.announced):
                    if (prefix in info.routes) != accepts(filters, "import", prefix, remote=True):
                        commands += self._admit(peer.address, info, prefix, filters, paths)
        self._send(commands)

    def _replay(self, peer: str) -> None:
        """Everything ``peer`` should have from us, then End-of-RIB per family it negotiated."""
        info = self._peers.setdefault(peer, PeerInfo())
        families = {4 if f.startswith("ipv4") else 6 for f in info.families}
        configured = next((p for p in self._config.peers if p.address == peer), None) if self._config else None
        accepted = outbound.for_peer(outbound.export_filters(configured), self._exports)
        exports = (e for p, e in accepted.items() if ipaddress.ip_network(p).version in families)
        commands = exabgp.announce(outbound.by_route(exports), peer=peer)
        if self._reflector is not None:
            commands += self._reflector.session_up(peer, info.router_id)
        commands += [exabgp.end_of_rib(peer, f) for f in info.families if f in exabgp.FAMILIES]
        self._send(commands)


def _canonical(prefix: str) -> str:
    return str(ipaddress.ip_network(prefix, strict=False))
