"""The route-reflector role (RFC 4456), done by the agent because ExaBGP has none: ExaBGP only
encodes what its API is told. Pure: paths in, ExaBGP API commands out; no I/O, no clock of its own.

What it keeps: each iBGP peer's paths per prefix (from the parsed JSON), which peers are up and
their BGP identifiers (from their OPEN), and what was last sent to each peer, so that only
differences are sent. For every prefix it chooses one best path (highest LOCAL_PREF, shortest
AS_PATH, lowest ORIGIN and MED, shortest CLUSTER_LIST, lowest originator ID, lowest peer address;
a stale path of a restarting peer only when there is nothing fresh) and advertises it:

- learned from a client: to every other client and to every non-client;
- learned from a non-client (a mesh peer, another reflector): to clients only, so reflectors of
  one cluster never pass each other's routes around;
- never back to the peer it came from, nor to its originator (ORIGINATOR_ID = that peer's
  identifier, or NEXT_HOP = that peer's address);
- NEXT_HOP, LOCAL_PREF, MED, AS_PATH and communities unchanged; ORIGINATOR_ID set (kept if there,
  else the sender's identifier); our cluster ID prepended to CLUSTER_LIST.

A session's export filters (``BGPPeer.spec.filters``) apply to what is reflected to it, as to
routes learned from remote peers (``source: RemotePeers`` matches them); import filters were
applied before a path got here (``bgp.speaker``). eBGP peers take no part: their routes are not
reflected (every node has its own external peers) and reflected routes are not sent to them. Loop
check on receipt (``looped``): a path whose ORIGINATOR_ID is our router ID or whose CLUSTER_LIST
holds our cluster ID is treated as withdrawn.
Prefixes this node originates itself (``own``) are never reflected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from bgp.filters import Filter, accepts, has_direction
from bgp.model import CLIENT, Peer

_ORIGINS = {"igp": 0, "egp": 1, "incomplete": 2}


@dataclass(frozen=True)
class Received:
    """One path as a peer sent it, in the attributes ExaBGP's JSON carries."""

    next_hop: str
    origin: str = "igp"
    local_pref: int = 100
    med: int | None = None
    as_path: tuple[int, ...] = ()
    communities: tuple[str, ...] = ()  # "65000:100"
    large_communities: tuple[str, ...] = ()  # "65000:1:2"
    originator_id: str | None = None
    cluster_list: tuple[str, ...] = ()
    stale_until: float | None = None  # set while its peer restarts gracefully

    @classmethod
    def from_json(cls, next_hop: str, attrs: Mapping[str, Any]) -> Received:
        as_path: list[int] = []
        raw = attrs.get("as-path")
        segments = raw.values() if isinstance(raw, dict) else [{"value": raw}] if isinstance(raw, list) else []
        for seg in segments:
            if isinstance(seg, dict) and seg.get("element", "as-sequence") == "as-sequence":
                as_path += [int(a) for a in seg.get("value", [])]
        return cls(
            next_hop=next_hop,
            origin=str(attrs.get("origin", "igp")),
            local_pref=int(attrs.get("local-preference", 100)),
            med=int(attrs["med"]) if "med" in attrs else None,
            as_path=tuple(as_path),
            communities=tuple(":".join(str(x) for x in c) for c in attrs.get("community", [])),
            large_communities=tuple(":".join(str(x) for x in c) for c in attrs.get("large-community", [])),
            originator_id=attrs.get("originator-id"),
            cluster_list=tuple(attrs.get("cluster-list", [])),
        )


class Reflector:
    def __init__(self, router_id: str, cluster_id: str, asn: int) -> None:
        self.router_id = router_id
        self.cluster_id = cluster_id
        self.asn = asn
        self._clients: set[str] = set()
        self._ibgp: set[str] = set()  # every iBGP peer (clients and non-clients)
        self._up: dict[str, str] = {}  # established iBGP peer -> its BGP identifier
        self._rib: dict[str, dict[str, Received]] = {}  # prefix -> sender -> path
        self._sent: dict[str, dict[str, str]] = {}  # peer -> prefix -> route text it holds from us
        self._own: frozenset[str] = frozenset()
        self._filters: dict[str, tuple[Filter, ...]] = {}  # peer -> its export filters

    # -- inputs, each returning the commands to send ---------------------------------------------

    def set_peers(self, peers: Iterable[Peer]) -> list[str]:
        """The configured peers: clients are those of kind CLIENT with our AS. Paths of peers no
        longer configured are dropped (ExaBGP removes the neighbors themselves)."""
        peers = list(peers)
        self._ibgp = {p.address for p in peers if p.asn == self.asn}
        self._clients = {p.address for p in peers if p.asn == self.asn and p.kind == CLIENT}
        filters = {p.address: p.options.filters for p in peers if has_direction(p.options.filters, "export")}
        touched: set[str] = set(self._rib) if filters != self._filters else set()
        self._filters = filters
        for gone in [a for a in self._up if a not in self._ibgp]:
            del self._up[gone]
            self._sent.pop(gone, None)
        for prefix, paths in self._rib.items():
            for sender in [s for s in paths if s not in self._ibgp]:
                del paths[sender]
                touched.add(prefix)
        return self._reselect(touched)

    def own(self, prefixes: Iterable[str]) -> list[str]:
        """The prefixes this node announces itself: never reflected."""
        before = self._own
        self._own = frozenset(prefixes)
        return self._reselect(before ^ self._own)

    def session_up(self, peer: str, router_id: str | None) -> list[str]:
        """A peer is established: send it everything it should have (ExaBGP keeps no
        Adj-RIB-Out for it across sessions)."""
        if peer not in self._ibgp:
            return []
        self._up[peer] = router_id or peer
        self._sent[peer] = {}
        return self._reselect(set(self._rib), only=peer)

    def session_down(self, peer: str, restart_time: int = 0, now: float = 0.0) -> list[str]:
        """A peer's session is gone. Its paths stay (stale) for ``restart_time`` seconds if it
        restarts gracefully, else they go now; what it had from us is forgotten."""
        self._up.pop(peer, None)
        self._sent.pop(peer, None)
        touched: set[str] = set()
        for prefix, paths in self._rib.items():
            path = paths.get(peer)
            if path is None:
                continue
            if restart_time > 0:
                if path.stale_until is None:
                    paths[peer] = replace(path, stale_until=now + restart_time)
            else:
                del paths[peer]
            touched.add(prefix)
        return self._reselect(touched)

    def end_of_rib(self, peer: str) -> list[str]:
        """The peer has re-sent everything: its paths still stale are gone."""
        touched = {prefix for prefix, paths in self._rib.items()
                   if peer in paths and paths[peer].stale_until is not None}
        for prefix in touched:
            del self._rib[prefix][peer]
        return self._reselect(touched)

    def expire(self, now: float) -> list[str]:
        touched: set[str] = set()
        for prefix, paths in self._rib.items():
            for sender in [s for s, p in paths.items() if p.stale_until is not None and p.stale_until <= now]:
                del paths[sender]
                touched.add(prefix)
        return self._reselect(touched)

    def update(self, peer: str, prefix: str, path: Received | None) -> list[str]:
        """A path announced (``path``) or withdrawn (None) by ``peer``; a looped one counts as
        withdrawn."""
        if peer not in self._ibgp:
            return []
        paths = self._rib.setdefault(prefix, {})
        if path is None or self.looped(path):
            paths.pop(peer, None)
        else:
            paths[peer] = path
        return self._reselect({prefix})

    def looped(self, path: Received) -> bool:
        return path.originator_id == self.router_id or self.cluster_id in path.cluster_list

    def withdraw_all(self) -> list[str]:
        """Withdraw everything reflected (before a stop that must not leave routes behind)."""
        commands = [f"neighbor {peer} withdraw route {prefix}"
                    for peer, sent in self._sent.items() for prefix in sent]
        self._sent = {peer: {} for peer in self._sent}
        return commands

    def sent_count(self, peer: str) -> int:
        """How many routes ``peer`` holds from us by reflection."""
        return len(self._sent.get(peer, {}))

    def reflected(self) -> dict[str, dict[str, str]]:
        """peer -> prefix -> route text currently sent (for tests and status)."""
        return {peer: dict(sent) for peer, sent in self._sent.items()}

    # -- selection and output -----------------------------------------------------------------

    def best(self, prefix: str) -> tuple[str, Received] | None:
        paths = self._rib.get(prefix, {})
        if not paths or prefix in self._own:
            return None
        sender = min(paths, key=lambda s: self._rank(s, paths[s]))
        return sender, paths[sender]

    def _rank(self, sender: str, p: Received) -> tuple[Any, ...]:
        originator = p.originator_id or self._up.get(sender, sender)
        return (p.stale_until is not None, -p.local_pref, len(p.as_path), _ORIGINS.get(p.origin, 3),
                p.med or 0, len(p.cluster_list), _ip_key(originator), _ip_key(sender))

    def _targets(self, prefix: str, sender: str, path: Received) -> set[str]:
        originator = path.originator_id or self._up.get(sender, sender)
        out = set()
        for peer, identifier in self._up.items():
            if peer == sender or identifier == originator or peer == path.next_hop:
                continue
            filters = self._filters.get(peer)
            if filters and not accepts(filters, "export", prefix, remote=True):
                continue
            if sender in self._clients or peer in self._clients:
                out.add(peer)
        return out

    def _text(self, prefix: str, sender: str, p: Received) -> str:
        parts = [f"route {prefix} next-hop {p.next_hop} origin {p.origin} local-preference {p.local_pref}"]
        if p.med is not None:
            parts.append(f"med {p.med}")
        if p.as_path:
            parts.append(f"as-path [ {' '.join(map(str, p.as_path))} ]")
        if p.communities:
            parts.append(f"community [ {' '.join(p.communities)} ]")
        if p.large_communities:
            parts.append(f"large-community [ {' '.join(p.large_communities)} ]")
        originator = p.originator_id or self._up.get(sender, sender)
        parts.append(f"originator-id {originator}")
        parts.append(f"cluster-list [ {' '.join((self.cluster_id, *p.cluster_list))} ]")
        return " ".join(parts)

    def _reselect(self, prefixes: Iterable[str], only: str | None = None) -> list[str]:
        announce: dict[str, list[str]] = {}  # route text -> peers
        withdraw: dict[str, list[str]] = {}  # prefix -> peers
        for prefix in sorted(prefixes):
            chosen = self.best(prefix)
            targets: set[str] = set()
            text = ""
            if chosen is not None:
                targets = self._targets(prefix, *chosen)
                text = self._text(prefix, *chosen)
            for peer in [only] if only else list(self._up):
                sent = self._sent.setdefault(peer, {})
                if peer in targets:
                    if sent.get(prefix) != text:
                        sent[prefix] = text
                        announce.setdefault(text, []).append(peer)
                elif prefix in sent:
                    del sent[prefix]
                    withdraw.setdefault(prefix, []).append(peer)
            if not self._rib.get(prefix):
                self._rib.pop(prefix, None)
        commands = [f"{_neighbors(peers)} announce {text}" for text, peers in announce.items()]
        commands += [f"{_neighbors(peers)} withdraw route {prefix}" for prefix, peers in withdraw.items()]
        return commands


def _neighbors(peers: list[str]) -> str:
    return ", ".join(f"neighbor {p}" for p in sorted(peers, key=_ip_key))


def _ip_key(text: str) -> tuple[int, int]:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return (9, 0)
    return (address.version, int(address))
