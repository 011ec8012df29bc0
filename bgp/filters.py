"""BGPFilter decisions: whether a route may go to (export) or come from (import) one peer.

Pure functions over compiled filters (``compile_filter`` turns a ``BGPFilter`` resource into a
frozen ``Filter``, so that it can sit in a ``bgp.model.Peer`` and be compared). Calico's
documented semantics:

- a peer's filters (``BGPPeer.spec.filters``) are tried in the order given; inside a filter the
  rules of the route's direction and family are tried in order, and the first rule that matches
  decides (Accept or Reject);
- a filter in which no rule matches does not decide: the next filter is tried; when none decides
  the route is accepted, which means the default behaviour (export: what the node announces
  anyway, its blocks and the service CIDRs; import: every route is installed).

What a rule matches: ``cidr`` with ``matchOperator`` (In: the prefix is inside the CIDR, or equal
to it; Equal: the same prefix; NotIn / NotEqual: the opposite), narrowed by ``prefixLength``
{min, max} (the prefix's length within [min, max], min defaulting to the CIDR's own length and
max to 32/128); ``source: RemotePeers`` (a route learned from a BGP peer: every imported route,
and an exported route only when it is reflected, never this node's own blocks or services);
``interface`` (a route out of an interface matching the name, ``*`` as wildcard: this node
announces no interface routes, so such a rule never matches an export, nor any import).
Must not do I/O; imports no other module of ``bgp`` (``bgp.model`` holds these filters).
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from datastore.bgp_filter import BGPFilterRule, BGPFilterSpec

Direction = Literal["export", "import"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=1 << 15)
def network(prefix: str) -> Network:
    """``prefix`` parsed (cached: a large table is filtered per peer and per change)."""
    return ipaddress.ip_network(prefix, strict=False)


@dataclass(frozen=True)
class Rule:
    accept: bool
    operator: str = ""  # Equal | NotEqual | In | NotIn, "" with no cidr
    cidr: Network | None = None
    min_length: int | None = None
    max_length: int | None = None
    remote_only: bool = False  # source: RemotePeers
    interface: str = ""

    def matches(self, prefix: Network, *, remote: bool, interface: str | None) -> bool:
        if self.remote_only and not remote:
            return False
        if self.interface and (interface is None or not fnmatch.fnmatchcase(interface, self.interface)):
            return False
        if self.cidr is None:
            return True
        if prefix.version != self.cidr.version:
            return False
        if self.operator in ("Equal", "NotEqual"):
            hit = prefix == self.cidr and self._length_ok(prefix)
        else:
            hit = prefix.subnet_of(self.cidr) and self._length_ok(prefix)  # type: ignore[arg-type]
        return hit if self.operator in ("Equal", "In") else not hit

    def _length_ok(self, prefix: Network) -> bool:
        assert self.cidr is not None
        low = self.cidr.prefixlen if self.min_length is None else self.min_length
        high = prefix.max_prefixlen if self.max_length is None else self.max_length
        return low <= prefix.prefixlen <= high


@dataclass(frozen=True)
class Filter:
    name: str
    export_v4: tuple[Rule, ...] = ()
    import_v4: tuple[Rule, ...] = ()
    export_v6: tuple[Rule, ...] = ()
    import_v6: tuple[Rule, ...] = ()

    def decide(self, direction: Direction, prefix: Network, *, remote: bool,
               interface: str | None = None) -> bool | None:
        """True (Accept), False (Reject), or None: no rule of this filter matches."""
        rules = getattr(self, f"{direction}_v{prefix.version}")
        for rule in rules:
            if rule.matches(prefix, remote=remote, interface=interface):
                return bool(rule.accept)
        return None


def accepts(filters: Sequence[Filter], direction: Direction, prefix: str, *, remote: bool = False,
            interface: str | None = None) -> bool:
    """Whether ``prefix`` passes ``filters`` (a peer's, in order) in ``direction``."""
    if not filters:
        return True
    net = network(prefix)
    for f in filters:
        decision = f.decide(direction, net, remote=remote, interface=interface)
        if decision is not None:
            return decision
    return True


def has_direction(filters: Iterable[Filter], direction: Direction) -> bool:
    """Whether any of ``filters`` has rules for ``direction`` (else they can be skipped)."""
    return any(getattr(f, f"{direction}_v4") or getattr(f, f"{direction}_v6") for f in filters)


def compile_filter(name: str, spec: BGPFilterSpec) -> Filter:
    """A validated ``BGPFilter`` spec as a frozen ``Filter``."""

    def rules(items: Iterable[BGPFilterRule]) -> tuple[Rule, ...]:
        return tuple(
            Rule(accept=r.action == "Accept", operator=r.match_operator,
                 cidr=ipaddress.ip_network(r.cidr, strict=False) if r.cidr else None,
                 min_length=r.prefix_length.min if r.prefix_length else None,
                 max_length=r.prefix_length.max if r.prefix_length else None,
                 remote_only=r.source == "RemotePeers", interface=r.interface)
            for r in items)

    return Filter(name, rules(spec.export_v4), rules(spec.import_v4), rules(spec.export_v6), rules(spec.import_v6))
