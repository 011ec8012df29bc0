"""What an owner of the nftables table declares: chains of rules, base-chain hooks, sets, verdict maps.

Owns the declarative objects that ``felix_agent.dataplane.nftables.NftTable`` merges, diffs and
writes, and how each renders in nft's syntax, a rule with its hash tag (the comment by which the
driver finds its own rules again). It must not run ``nft`` or read the kernel (the driver does),
and knows nothing about policy or pools (the managers that declare do).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
TAG_LEN = 12  # hex digits of a rule's hash in its comment
MAX_COMMENT = 128  # nft refuses longer comments


@dataclass(frozen=True)
class Hook:
    """What makes a chain a base chain. ``priority`` is a standard name, optionally with an offset ("filter + 10")."""

    hook: str
    type: str = "filter"
    priority: str = "filter"
    policy: str = "accept"

    @property
    def key(self) -> tuple[str, str, int, str]:
        name, _, offset = self.priority.partition(" ")
        number = PRIORITIES[name] + (int(offset.replace(" ", "")) if offset else 0)
        return (self.hook, self.type, number, self.policy)

    def render(self) -> str:
        return f"{{ type {self.type} hook {self.hook} priority {self.priority} ; policy {self.policy} ; }}"


@dataclass(frozen=True)
class Rule:
    """One rule: ``body`` is nft syntax without a comment; the driver writes ``comment "<hash> <comment>"``."""

    body: str
    comment: str = ""

    @cached_property
    def tag(self) -> str:
        return hashlib.sha256(f"{self.body}\0{self.comment}".encode()).hexdigest()[:TAG_LEN]

    @cached_property
    def comment_text(self) -> str:
        """The comment as written to the kernel: the hash tag, then ``comment``."""
        # one line per command in the transaction, and nft's string syntax has no escapes
        text = re.sub(r"[\x00-\x1f\\]", " ", f"{self.tag} {self.comment}".strip()).replace('"', "'")
        return text.encode()[:MAX_COMMENT].decode(errors="ignore")  # nft counts bytes

    def render(self) -> str:
        return f'{self.body} comment "{self.comment_text}"'


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()
    hook: Hook | None = None

    @cached_property
    def signature(self) -> tuple[tuple[str, str, int, str] | None, tuple[str, ...]]:
        return (self.hook.key if self.hook else None, tuple(r.tag for r in self.rules))


@dataclass(frozen=True)
class Set:
    """A named set. ``elements`` are nft literals in the form nft prints them back (``10.0.0.1``,
    ``10.1.0.0/16``, ``10.0.0.1 . tcp . 80``), so that a read-back compares equal."""

    name: str
    type: str  # "ipv4_addr", "ipv4_addr . inet_proto . inet_service"
    flags: tuple[str, ...] = ()
    elements: frozenset[str] = frozenset()

    @property
    def spec(self) -> tuple[str, tuple[str, ...]]:
        return (self.type, tuple(sorted(self.flags)))

    def render(self) -> str:
        flags = f" flags {', '.join(self.flags)} ;" if self.flags else ""
        return f"{{ type {self.type} ;{flags} }}"


@dataclass(frozen=True)
class Map:
    """A named map, ``key_type : value_type``; ``elements`` maps a key literal (``"tor1a2b"``, quoted
    as nft prints it) to a value literal (``goto to-1a2b``)."""

    name: str
    key_type: str
    value_type: str = "verdict"
    elements: frozenset[tuple[str, str]] = frozenset()

    @property
    def spec(self) -> tuple[str, tuple[str, ...]]:
        return (f"{self.key_type} : {self.value_type}", ())

    def render(self) -> str:
        return f"{{ type {self.key_type} : {self.value_type} ; }}"


@dataclass(frozen=True)
class ChainDelta:
    """How a declaration's chains differ from the owner's earlier ``base`` tuple: the chains added or
    replaced, and the names of those removed. A hint that lets the driver diff only these chains
    (at 11,000 chains a walk of all of them is tens of ms per new endpoint); it is ignored unless
    ``base`` is the very tuple the owner declared last."""

    base: tuple[Chain, ...]
    upserted: tuple[Chain, ...] = ()
    removed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Ruleset:
    """One owner's share of the table. ``delta`` (optional, not part of equality): how ``chains``
    differs from the owner's previous declaration."""

    chains: tuple[Chain, ...] = ()
    sets: tuple[Set, ...] = ()
    maps: tuple[Map, ...] = ()
    delta: ChainDelta | None = field(default=None, compare=False)


def address_elements(nets: Iterable[str], version: int) -> list[str]:
    """The elements of an interval set of addresses: one family's nets, merged (nft refuses overlapping
    intervals) and written as nft prints them back (a host as a bare address)."""
    parsed = [ipaddress.ip_network(n, strict=False) for n in nets]
    merged: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
    if version == 4:
        merged = ipaddress.collapse_addresses(n for n in parsed if isinstance(n, ipaddress.IPv4Network))
    else:
        merged = ipaddress.collapse_addresses(n for n in parsed if isinstance(n, ipaddress.IPv6Network))
    return [str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n) for n in merged]
