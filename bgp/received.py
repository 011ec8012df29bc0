"""What peers send the node's BGP speaker: per peer, what its OPEN said and the paths it announces
(``PeerInfo``), and the decisions on each path of an UPDATE (``ReceivedRoutes``, a part of
``bgp.speaker.Speaker``): a looped path (our router ID as ORIGINATOR_ID, our cluster ID in
CLUSTER_LIST, our AS in an eBGP AS_PATH), one the session's import filters reject, or one for a
prefix this node announces itself counts as withdrawn; the others go to the speaker's route
callbacks and the reflector. An UPDATE is taken a group at a time (its prefixes through one next
hop, ``bgp.route_groups``): recorded with one dict update and handed on as one group, with
per-prefix work only where a decision is per prefix (import filters, reflection).

Split out of ``bgp.speaker`` by concept; the state it reads is the speaker's, under its lock. Must
not talk to ExaBGP or the kernel itself (``_send`` and ``on_route`` are the speaker's).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bgp import exabgp
from bgp.filters import Filter, accepts, has_direction
from bgp.model import Export, SpeakerConfig
from bgp.reflector import Received, Reflector
from bgp.route_groups import RouteGroup

RouteCallback = Callable[[str, str, str | None, bool, dict[str, Any]], None]


@dataclass
class PeerInfo:
    """What a peer told us in its OPEN, and the paths it sent us in this session."""

    router_id: str | None = None
    restart_time: int = 0
    families: tuple[str, ...] = exabgp.FAMILIES
    routes: dict[str, Received] = field(default_factory=dict)
    # Every prefix the peer announces now, accepted or not (import filters, own prefixes): what
    # changed import filters are applied to again, without asking the peer to send it again.
    announced: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # -> (next hop, attrs)


class ReceivedRoutes:
    """The speaker's handling of UPDATEs (a mixin of ``Speaker``, which owns the state below)."""

    _config: SpeakerConfig | None
    _exports: dict[str, Export]
    _peers: dict[str, PeerInfo]
    _reflector: Reflector | None
    _counts: dict[str, int]
    _last_update: float | None
    on_route: RouteCallback
    on_groups: Callable[[list[RouteGroup]], None] | None
    _pending: deque[tuple[Callable[..., None], tuple[Any, ...]]]

    if TYPE_CHECKING:  # the speaker's
        def _later(self, fn: Callable[..., None], *args: Any) -> None: ...
        def _send(self, commands: list[str]) -> bool: ...

    def _on_update(self, event: exabgp.UpdateEvent) -> None:
        """An UPDATE a group at a time (its prefixes through one next hop: ~800 /32s from BIRD),
        each group's accepted prefixes recorded and handed on in one piece; the per-prefix work
        left is the import filters' (when the session has some) and the reflector's."""
        self._counts["updates"] += 1
        self._last_update = time.time()
        peer, attrs = event.peer, dict(event.attrs)
        info = self._peers.setdefault(peer, PeerInfo())
        routes = info.routes
        looped = self._looped(peer, attrs)
        filters = self._import_filters(peer)
        withdrawn = list(event.withdrawn)
        commands: list[str] = []
        for next_hop, prefixes in event.groups:
            if looped:
                self._counts["looped"] += len(prefixes)
                withdrawn += prefixes
                continue
            info.announced.update(dict.fromkeys(prefixes, (next_hop, attrs)))
            commands += self._admit_group(peer, info, prefixes, next_hop, attrs, filters)
        if looped:  # a looped path withdraws only what the peer had given us before
            gone = [prefix for prefix in withdrawn if routes.pop(prefix, None) is not None]
            for prefix in withdrawn:
                info.announced.pop(prefix, None)
        else:
            gone = withdrawn
            for prefix in withdrawn:
                info.announced.pop(prefix, None)
                routes.pop(prefix, None)
        if gone:
            self._later_group(peer, gone, None, {})
        if self._reflector is not None:
            for prefix in withdrawn:
                commands += self._reflector.update(peer, prefix, None)
        self._send(commands)

    def _later_group(self, peer: str, prefixes: list[str], next_hop: str | None, attrs: dict[str, Any]) -> None:
        """Paths of ``peer`` for ``prefixes`` (withdrawn: ``next_hop`` None), to ``on_groups`` in
        one call with the other groups of this read of ExaBGP's output (or to ``on_route`` one
        by one)."""
        if self.on_groups is None:
            for prefix in prefixes:
                self._pending.append((self.on_route, (peer, prefix, next_hop, next_hop is None, attrs)))
            return
        group = RouteGroup(peer, prefixes, next_hop, attrs)
        if self._pending and self._pending[-1][0] is self.on_groups:
            self._pending[-1][1][0].append(group)
        else:
            self._pending.append((self.on_groups, ([group],)))

    def _import_filters(self, peer: str) -> tuple[Filter, ...]:
        configured = next((p for p in self._config.peers if p.address == peer), None) if self._config else None
        filters = configured.options.filters if configured is not None else ()
        return filters if has_direction(filters, "import") else ()

    def _admit_group(self, peer: str, info: PeerInfo, prefixes: tuple[str, ...], next_hop: str,
                     attrs: dict[str, Any], filters: tuple[Filter, ...]) -> list[str]:
        """Install (through the speaker's route callbacks) and reflect the announced paths of one
        group, except those the session's import filters refuse or whose prefix the node
        announces itself: those count as withdrawn."""
        exports = self._exports
        if filters or not exports.keys().isdisjoint(prefixes):
            refused = {p for p in prefixes
                       if (filters and not accepts(filters, "import", p, remote=True)) or p in exports}
        else:
            refused = set()
        commands: list[str] = []
        if refused:
            accepted = [p for p in prefixes if p not in refused]
            # accepted before, refused now
            dropped = [p for p in prefixes if p in refused and info.routes.pop(p, None) is not None]
            if dropped:
                self._later_group(peer, dropped, None, {})
                if self._reflector is not None:
                    for prefix in dropped:
                        commands += self._reflector.update(peer, prefix, None)
        else:
            accepted = list(prefixes)
        if not accepted:
            return commands
        path = Received.from_json(next_hop, attrs)
        info.routes.update(dict.fromkeys(accepted, path))
        self._later_group(peer, accepted, next_hop, attrs)
        if self._reflector is not None:
            for prefix in accepted:
                commands += self._reflector.update(peer, prefix, path)
        return commands

    def _admit(self, peer: str, info: PeerInfo, prefix: str, filters: tuple[Filter, ...],
               paths: dict[str, Received]) -> list[str]:
        """``_admit_group`` for one prefix already announced (filters or exports changed): install
        (through ``on_route``) and reflect its path, unless the session's import filters refuse it
        or the node announces that prefix itself: then it counts as withdrawn."""
        next_hop, attrs = info.announced[prefix]
        if (filters and not accepts(filters, "import", prefix, remote=True)) or prefix in self._exports:
            if info.routes.pop(prefix, None) is None:
                return []
            self._later(self.on_route, peer, prefix, None, True, {})  # accepted before, refused now
            return self._reflector.update(peer, prefix, None) if self._reflector is not None else []
        path = paths.get(next_hop)
        if path is None:
            path = paths[next_hop] = Received.from_json(next_hop, attrs)
        info.routes[prefix] = path
        self._later(self.on_route, peer, prefix, next_hop, False, attrs)
        return self._reflector.update(peer, prefix, path) if self._reflector is not None else []

    def _looped(self, peer: str, attrs: dict[str, Any]) -> bool:
        config = self._config
        assert config is not None
        if attrs.get("originator-id") == config.router_id or config.cluster_id in attrs.get("cluster-list", []):
            return True
        configured = next((p for p in config.peers if p.address == peer), None)
        if configured is None or configured.asn == config.asn:
            return False
        # eBGP: our AS in the path is a loop, unless numAllowedLocalASNumbers allows it that often.
        ours = {config.asn, configured.options.local_asn or config.asn}
        path = Received.from_json("", attrs).as_path
        return sum(1 for asn in path if asn in ours) > configured.options.allowed_local_as
