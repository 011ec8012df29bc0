"""The NAT-outgoing manager (Felix's ``masqManager``).

Owns, in the shared ``inet tortie`` table: the chain ``nat-postrouting`` (hook postrouting, priority
srcnat) and the sets ``nat-pools-v4|v6`` (pools with ``natOutgoing``) and ``all-pools-v4|v6`` (every
pool). Traffic from a NAT-outgoing pool to a destination outside every pool leaves with the host's
address; traffic between pool addresses keeps its source. The chain is static: a pool change is
set elements only.

Shares the table with the policy manager through the driver (each declares its own named chains
and sets; the driver writes both in one table), so neither can clobber the other.
"""

from __future__ import annotations

import logging

from felix_agent.calc.model import DesiredState
from felix_agent.dataplane.nft_ruleset import Chain, Hook, Rule, Ruleset, Set, address_elements
from felix_agent.dataplane.nftables import NftTable

log = logging.getLogger(__name__)

OWNER = "masq"
CHAIN = "nat-postrouting"
FAMILIES = ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr"))


def render(nat_pools: frozenset[str], all_pools: frozenset[str]) -> Ruleset:
    """The NAT-outgoing part of the table (pure)."""
    sets: list[Set] = []
    rules: list[Rule] = []
    for version, ip, addr_type in FAMILIES:
        nat, every = f"nat-pools-v{version}", f"all-pools-v{version}"
        # every NAT pool is a pool, even if the calculation graph left it out of all_pools
        members = {nat: nat_pools, every: nat_pools | all_pools}
        sets += [
            Set(name, addr_type, ("interval",), frozenset(address_elements(members[name], version)))
            for name in (nat, every)
        ]
        rules.append(Rule(f"{ip} saddr @{nat} {ip} daddr != @{every} masquerade", f"natOutgoing IPv{version}"))
    return Ruleset(chains=(Chain(CHAIN, tuple(rules), Hook("postrouting", "nat", "srcnat")),), sets=tuple(sets))


class MasqManager:
    """``on_update`` records the pools; ``apply`` writes the set elements that changed."""

    def __init__(self, table: NftTable) -> None:
        self._table = table
        self._pools: tuple[frozenset[str], frozenset[str]] | None = None
        self._dirty = False
        self._rendered: tuple[tuple[frozenset[str], frozenset[str]], Ruleset] | None = None
        self._reloads_seen = table.reloads  # the table's reload count at this manager's last resync
        table.add_owner(OWNER)

    def on_update(self, state: DesiredState) -> None:
        """Remember the pools; no kernel I/O."""
        pools = (state.nat_pools, state.all_pools)
        if pools != self._pools:
            self._pools, self._dirty = pools, True

    def apply(self, *, resync: bool = False) -> str:
        """Reconcile the table; ``resync`` re-reads it first. Returns the transaction written ("" for none)."""
        if self._pools is None or not (self._dirty or resync):
            return ""
        if self._rendered is None or self._rendered[0] != self._pools:
            self._rendered = (self._pools, render(*self._pools))
        # The same ruleset while the pools stand: the driver then skips the table's 11,000 chains
        # (a new ruleset each resync cost a merge and diff of all of them, 0.1-0.4 s under load).
        self._table.declare(OWNER, self._rendered[1])
        if resync and self._table.reloads == self._reloads_seen and not self._table.reading():
            # Nobody read the table back since this manager's last resync. Usually the policy manager
            # has, moments ago in the same resync, and its apply wrote every owner's difference: a
            # second read of the whole shared table (seconds at 5,000 endpoints) would find nothing.
            # Nor when a background read still runs (a slow one from an earlier resync): its adoption
            # repairs every owner's objects; read here, it stopped the loop for up to 8 s under load.
            self._table.reload()
        self._reloads_seen = self._table.reloads
        written = self._table.apply()
        if written:
            log.info("NAT-outgoing updated", extra={"nat_pools": sorted(self._pools[0])})
        self._dirty = False
        return written
