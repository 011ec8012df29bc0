"""What peers send the node's BGP speaker: per peer, what its OPEN said and the paths it announces
(``PeerInfo``), and the decisions on each path of an UPDATE (``ReceivedRoutes``, a part of
``bgp.speaker.Speaker``): a looped path (our router ID as ORIGINATOR_ID, our cluster ID in
CLUSTER_LIST, our AS in an eBGP AS_PATH), one the session's import filters reject, or one for a
prefix this node announces itself counts as withdrawn; the others go to ``on_route`` and the
reflector.

Split out of ``bgp.speaker`` by concept; the state it reads is the speaker's, under its lock. Must
not talk to ExaBGP or the kernel itself (``_send`` and ``on_route`` are the speaker's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bgp import exabgp
from bgp.filters import Filter, accepts, has_direction
from bgp.model import Export, SpeakerConfig
from bgp.reflector import Received, Reflector

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

    if TYPE_CHECKING:  # the speaker's
        def _later(self, fn: Callable[..., None], *args: Any) -> None: ...
        def _send(self, commands: list[str]) -> bool: ...

    def _on_update(self, event: exabgp.UpdateEvent) -> None:
        self._counts["updates"] += 1
        self._last_update = time.time()
        peer, attrs = event.peer, dict(event.attrs)
        info = self._peers.setdefault(peer, PeerInfo())
        routes = info.routes
        looped = self._looped(peer, attrs)
        filters = self._import_filters(peer)
        paths: dict[str, Received] = {}  # by next hop: one UPDATE shares its attributes
        withdrawn = list(event.withdrawn)
        commands: list[str] = []
        for prefix, next_hop in event.announced:
            if looped:
                self._counts["looped"] += 1
                withdrawn.append(prefix)
                continue
            info.announced[prefix] = (next_hop, attrs)
            commands += self._admit(peer, info, prefix, filters, paths)
        for prefix in withdrawn:
            info.announced.pop(prefix, None)
            if routes.pop(prefix, None) is not None or not looped:
                self._later(self.on_route, peer, prefix, None, True, {})
            if self._reflector is not None:
                commands += self._reflector.update(peer, prefix, None)
        self._send(commands)

    def _import_filters(self, peer: str) -> tuple[Filter, ...]:
        configured = next((p for p in self._config.peers if p.address == peer), None) if self._config else None
        filters = configured.options.filters if configured is not None else ()
        return filters if has_direction(filters, "import") else ()

    def _admit(self, peer: str, info: PeerInfo, prefix: str, filters: tuple[Filter, ...],
               paths: dict[str, Received]) -> list[str]:
        """Install (through ``on_route``) and reflect an announced path, unless the session's
        import filters refuse it or the node announces that prefix itself: then it counts as
        withdrawn."""
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
